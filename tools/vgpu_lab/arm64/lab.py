"""Provisioning the arm64 guest, idempotently: QEMU 11.1 (the sid chroot, whose packages include
``qemu-system-arm``), the cross compiler, the arm64 kernel build and busybox, ``blob_map`` and ``vgpu_pte.ko``.

Cold, on this machine kind: 26 s with the cross compiler already there (arm64 lists 2 s, 110 MB of packages 2 s,
unpacking them, the module 3 s), plus 11 s to install the cross compiler; warm, 0.5 s of file checks.
``python -m vgpu_lab.provision arm64`` runs it.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from vgpu_lab.initramfs import busybox_applets
from vgpu_lab.shell import ProvisionError
from vgpu_lab.sid import SidQemu

from . import build
from .packages import Arm64Kernel, ArmApt, cached_arm64_kernel, fetch_arm64_kernel, select_abi

#: Debian's cross compiler for arm64 and the arm64 C library it links statically.
CROSS_PACKAGES = ("gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross")
#: The guest programs the arm64 guest runs.
PROGRAMS = ("blob_map",)


class Provisioner(Protocol):
    """What this needs of :class:`vgpu_lab.provision.Provisioner` (which calls into this module, so the dependency
    is named by shape, not imported)."""

    cache: Path
    etc_apt: Path

    def locked(self) -> AbstractContextManager[None]: ...

    def apt_install(self, packages: Sequence[str], *, what: str, target_release: str | None = None) -> None: ...

    def ensure_apt(self) -> None: ...

    def apt_update(self, *, force: bool = False) -> bool: ...

    def installed_versions(self, packages: Sequence[str]) -> dict[str, str]: ...

    def busybox(self) -> Path: ...

    def qemu11(self, root: Path | None = None) -> SidQemu: ...


@dataclasses.dataclass(frozen=True)
class Arm64Lab:
    """Everything an arm64 boot needs."""

    qemu: SidQemu
    kernel: Arm64Kernel
    #: busybox's applet paths: the arm64 binary cannot list them on this host, the host's busybox of the same
    #: Debian version can (same source, same configuration).
    applets: tuple[str, ...]
    programs: dict[str, Path]
    pte_module: Path


def cross_gcc(provisioner: Provisioner) -> Path:
    """``aarch64-linux-gnu-gcc`` with a static arm64 libc, installed from Debian when missing."""
    with provisioner.locked():
        if shutil.which(build.CROSS_GCC) is None or len(provisioner.installed_versions(CROSS_PACKAGES)) < 2:
            provisioner.apt_install(CROSS_PACKAGES, what="arm64 (cross compiler)")
        gcc = shutil.which(build.CROSS_GCC)
        if gcc is None:
            raise ProvisionError(f"arm64: {build.CROSS_GCC} is not on PATH after installing {CROSS_PACKAGES}")
        return Path(gcc)


def arm64_kernel(provisioner: Provisioner) -> Arm64Kernel:
    """The arm64 6.12 build, its headers and busybox, unpacked once into ``<cache>/arm64``."""
    with provisioner.locked():
        cached = cached_arm64_kernel(provisioner.cache)
        if cached is not None:
            return cached
        provisioner.ensure_apt()  # the host's lists, for linux-kbuild
        apt = ArmApt(provisioner.cache / "arm64" / "apt", provisioner.etc_apt)
        apt.update()
        try:
            return fetch_arm64_kernel(provisioner.cache, apt, *select_abi(apt))
        except ProvisionError:
            # A stale list names versions the mirror no longer has, or the host's lists lag the arm64 ones (the
            # kbuild package comes from the host's): refresh both once, then decide again.
            refreshed = apt.update(force=True)
            if not provisioner.apt_update(force=True) and not refreshed:
                raise
            return fetch_arm64_kernel(provisioner.cache, apt, *select_abi(apt))


def _applets(provisioner: Provisioner, kernel: Arm64Kernel) -> tuple[str, ...]:
    host = provisioner.busybox()
    host_version = provisioner.installed_versions(["busybox-static"]).get("busybox-static", "")

    def upstream(version: str) -> str:
        return version.split(":", 1)[-1].rsplit("-", 1)[0]

    if upstream(host_version) != upstream(kernel.busybox_version):
        raise ProvisionError(f"arm64: the host's busybox-static {host_version} and the guest's "
                             f"{kernel.busybox_version} differ, so the host cannot list the guest's applets")
    return tuple(busybox_applets(host))


def provision_arm64(provisioner: Provisioner) -> Arm64Lab:
    with provisioner.locked():
        qemu = provisioner.qemu11()
        gcc = cross_gcc(provisioner)
        kernel = arm64_kernel(provisioner)
        return Arm64Lab(
            qemu=qemu,
            kernel=kernel,
            applets=_applets(provisioner, kernel),
            programs={name: build.guest_program(name, provisioner.cache, gcc) for name in PROGRAMS},
            pte_module=build.pte_module(provisioner.cache, kernel, gcc),
        )
