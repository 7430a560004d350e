"""End-to-end tests: each boots a real Linux guest under a real QEMU (the ``e2e`` marker's definition), so every test
in this folder carries the marker, applied here; ``pytest -m "not e2e"`` leaves the folder out and builds and boots
nothing. The lab components the boots share are provisioned once per session by the fixtures below; in CI
(``CI=true``) a component that cannot be provisioned fails the test, elsewhere it skips, naming the component.
Provisioning runs with pytest's capture suspended, so a long step (the patched kernel's build on a cold cache,
an apt install) shows its progress in the terminal or the CI log as it happens.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import pytest

from tests.conftest import unavailable
from vgpu_lab import guest, kernel_build, provision
from vgpu_lab.guest_kernel import GuestKernel
from vgpu_lab.kernel_build import PatchedKernel
from vgpu_lab.shell import ProvisionError
from vgpu_lab.sid import SidQemu

HERE = Path(__file__).resolve().parent
BOOT_TIMEOUT = 180.0
#: What the guest writes on tty0 before the KMS client runs, so fbcon's frame is told apart.
MARK = "VGPU-FBCON-TEXT"

T = TypeVar("T")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.e2e)
            # One worker boots the guests one after another: they share the session's lab components, and two
            # emulated guests at once on two cores would only slow each other past their timeouts.
            item.add_marker(pytest.mark.xdist_group("e2e"))


def component(name: str, make: Callable[[], T]) -> T:
    """Provision one lab component; fail in CI, skip (naming it) elsewhere."""
    try:
        return make()
    except (ProvisionError, kernel_build.KernelBuildError, guest.GuestBuildError, OSError) as exc:
        unavailable(f"lab component {name!r} unavailable: {exc}")


@contextlib.contextmanager
def shown(request: pytest.FixtureRequest) -> Iterator[None]:
    """Suspend pytest's capture (of this process's stdout and stderr) while provisioning."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        yield
        return
    with capman.global_and_fixture_disabled():
        yield


def rgb_of(xrgb: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint8]:
    """(h, w) 0xAARRGGBB words as (h, w, 3) R, G, B bytes (what our PNG holds)."""
    out = np.empty((*xrgb.shape, 3), np.uint8)
    out[..., 0] = (xrgb >> 16) & 0xFF
    out[..., 1] = (xrgb >> 8) & 0xFF
    out[..., 2] = xrgb & 0xFF
    return out


@pytest.fixture(scope="session")
def provisioner() -> provision.Provisioner:
    return component("cache", provision.Provisioner)


@pytest.fixture(scope="session")
def lab(request: pytest.FixtureRequest, provisioner: provision.Provisioner) -> provision.Lab:
    """QEMU 10 with its C back end, Debian's 6.12 kernel, busybox and the static guest programs."""
    started = time.monotonic()
    with shown(request):
        result = provision.Lab(
            qemu=component("qemu", provisioner.qemu),
            kernel=component("kernel", provisioner.guest_kernel),
            busybox=component("busybox", provisioner.busybox),
            guest_programs=component("guest programs", provisioner.guest_programs),
        )
    print(f"provisioning took {time.monotonic() - started:.2f} s")
    return result


@pytest.fixture(scope="session")
def qemu11(request: pytest.FixtureRequest, provisioner: provision.Provisioner) -> SidQemu:
    """QEMU >= 11.1 in the sid chroot: the generic vhost-user device with a shared-memory BAR."""
    with shown(request):
        return component("qemu11 (QEMU >= 11.1 in a sid chroot)", provisioner.qemu11)


@dataclass(frozen=True)
class Rig:
    """What the dma-buf boots need: QEMU, busybox, the ``dmabuf_info`` program, the patched and the stock kernel."""

    provisioner: provision.Provisioner
    qemu: provision.Qemu
    busybox: Path
    program: Path
    patched: PatchedKernel
    #: How long asking for the patched kernel took (a build on a cold cache, a lookup after).
    build_seconds: float
    stock: GuestKernel


@pytest.fixture(scope="session")
def rig(request: pytest.FixtureRequest, provisioner: provision.Provisioner, lab: provision.Lab) -> Rig:
    program = component("guest program dmabuf_info",
                        lambda: guest.build_program("dmabuf_info", provisioner.cache, gcc=provisioner.toolchain()))
    started = time.monotonic()
    with shown(request):  # about 6 minutes on a cold cache (tools/test builds it before pytest, with progress)
        patched = component("patched kernel", lambda: kernel_build.patched_kernel(provisioner.cache))
    return Rig(provisioner, lab.qemu, lab.busybox, program, patched, time.monotonic() - started, lab.kernel)
