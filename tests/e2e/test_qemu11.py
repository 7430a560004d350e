"""End to end: QEMU 11.1 (sid chroot) boots the 6.12 guest with its generic vhost-user device against *our* back end.

Why this device: ``vhost-user-gpu-pci`` builds the guest's feature word from QEMU's own flags, so RESOURCE_BLOB never
reaches a guest through it. QEMU 11.1's ``vhost-user-test-device-pci`` (virtio id 16) passes the back end's
features and config space through: the guest's driver sees ``+resource_blob`` and then backs its dumb buffers and
fbcon framebuffer with guest blobs shown through SET_SCANOUT_BLOB — the path this test checks pixel for pixel.
The generic device carries no vhost-user-gpu display socket, so the pictures our back end writes
(``--scanout-png``) are the only view of the scanout.

In CI (``CI=true``) every lab component, QEMU 11.1 included, must provision; outside CI a missing component skips
the test with a reason naming it.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import BOOT_TIMEOUT, MARK, rgb_of
from vgpu.gpu import png
from vgpu.procfs import fd_count, settled_fd_count, wait_until
from vgpu_lab import initramfs, patterns, provision
from vgpu_lab.qemu import (
    Backend,
    GuestRun,
    run_guest,
    socket_dir,
)
from vgpu_lab.sid import SidQemu

#: Steps of kms_pattern that must succeed whatever the display path (the cursor ones are reported, see below).
REQUIRED_STEPS = ("open", "resources", "connector", "crtc", "dumb", "addfb", "modeset", "dirtyfb", "done")
CURSOR_STEPS = ("cursor", "cursor-move")


@dataclass(frozen=True)
class Boot:
    """One boot of the guest against our back end, shared by the checks below (a boot costs ~6 s)."""

    guest: GuestRun
    backend_output: str
    pictures: Path
    wall: float
    idle_fds: int
    released: bool
    held_fds: list[str]

    @property
    def context(self) -> str:
        return self.guest.describe() + f"\n--- back end\n{self.backend_output}"


@pytest.fixture(scope="module")
def boot(lab: provision.Lab, qemu11: SidQemu, tmp_path_factory: pytest.TempPathFactory) -> Boot:
    work = tmp_path_factory.mktemp("qemu11")
    pics = work / "pictures"
    # fbcon first (text on tty0), then the KMS client; the guest sleeps so fbcon's frame is flushed.
    command = f"/bin/sh -c 'echo {MARK} > /dev/tty0; sleep 1; /bin/kms_pattern 500'"
    initrd = initramfs.build_initramfs(
        work / "initrd.gz", busybox=lab.busybox, command=command, modules_dir=lab.kernel.modules_dir,
        modules=initramfs.VIRTIO_GPU_MODULES, files={"/bin/kms_pattern": lab.guest_programs["kms_pattern"]},
    )
    log_level = os.environ.get("VGPU_E2E_LOG_LEVEL", "info")
    backend = [sys.executable, "-m", "vgpu", "--socket-path={sock}", f"--scanout-png={pics}", "--png-rate=20",
               "--png-history", f"--log-level={log_level}"]
    with socket_dir() as d:
        sock = d / "vgpu.sock"
        # QEMU runs in the chroot: the socket, the kernel and the initrd must be at the same paths in there.
        config = qemu11.config([d, lab.kernel.root, work])
        with Backend(backend, sock) as proc:
            assert proc.pid is not None
            pid = proc.pid
            # The socket appears before the server is fully set up: take the idle count once it holds still.
            idle = settled_fd_count(pid)
            started = time.monotonic()
            guest = run_guest(kernel=lab.kernel.vmlinuz, initrd=initrd, socket_path=sock, config=config,
                              timeout=BOOT_TIMEOUT, serial_log=work / "serial.log")
            wall = time.monotonic() - started
            # QEMU has exited: the back end must be back to its idle fds (no memory table, rings, sockets).
            released = wait_until(lambda: fd_count(pid) == idle, 10)
            held = sorted(os.listdir(f"/proc/{pid}/fd"))
    print(f"QEMU {qemu11.version}: boot + fbcon + KMS + poweroff against vgpu: {wall:.2f} s wall")
    return Boot(guest=guest, backend_output=proc.output, pictures=pics, wall=wall, idle_fds=idle,
                released=released, held_fds=held)


def test_guest_blobs_fbcon_and_kms_frame_through_qemu11_generic_device(boot: Boot) -> None:
    guest, context = boot.guest, boot.context
    assert not guest.timed_out and guest.returncode == 0 and guest.guest_status == 0, context
    features = re.search(r"\[drm\] features: (.*)", guest.dmesg)
    assert features, context
    print(f"guest: [drm] features: {features.group(1).strip()}")
    # The generic device passes our features through: EDID and RESOURCE_BLOB both reach the guest, so its dumb
    # buffers and the fbcon framebuffer are guest blobs shown with SET_SCANOUT_BLOB.
    assert "+edid" in features.group(1) and "+resource_blob" in features.group(1), context
    assert re.search(r"\[drm\] number of scanouts: 1", guest.dmesg), context
    assert re.search(r"\[drm\] Initialized virtio_gpu ", guest.dmesg), context

    lines = guest.guest_lines()
    print("\n".join(lines))
    for step in REQUIRED_STEPS:
        assert any(line.startswith(f"VGPU-GUEST {step} ok") for line in lines), f"{step}\n{context}"
    m = re.search(r"VGPU-GUEST modeset ok (\d+)x(\d+)", "\n".join(lines))
    assert m, context
    width, height = int(m.group(1)), int(m.group(2))

    history = sorted(boot.pictures.glob("scanout-0-*.png"))
    assert history, context
    frames = [png.decode(p.read_bytes()) for p in history]
    # fbcon: some picture before the KMS frame has text (non-background pixels) in its top rows.
    assert any(f[:64].reshape(-1, 3).any(axis=1).sum() > 50 for f in frames), f"no console text seen\n{context}"
    # The KMS client's frame, every pixel: one of the pictures is exactly the guest's pattern.
    want = rgb_of(patterns.frame_pixels(width, height))
    assert any(f.shape == want.shape and np.array_equal(f, want) for f in frames), \
        f"no picture matches the {width}x{height} pattern among {len(frames)}\n{context}"
    assert boot.released, f"back end still holds {boot.held_fds} (idle had {boot.idle_fds})\n{context}"


def test_cursor_from_a_guest_blob(boot: Boot) -> None:
    """The cursor bo is a dumb buffer too, so with +resource_blob it is a guest blob (64x64 B8G8R8A8, no 2D size).

    The cursor ioctls succeed in the guest whatever the device answers (cursor commands are fire and forget), so
    the evidence is our picture of the cursor: the cursor queue reaches our back end even though the generic
    device carries no display socket.
    """
    lines = boot.guest.guest_lines()
    for step in CURSOR_STEPS:
        assert any(line.startswith(f"VGPU-GUEST {step} ok") for line in lines), f"{step}\n{boot.context}"
    refusals = [line for line in boot.backend_output.splitlines() if "cursor" in line]
    cursor_png = boot.pictures / "cursor-0.png"
    assert cursor_png.is_file(), "no cursor picture; back end said:\n" + "\n".join(refusals)
    cursor = png.decode(cursor_png.read_bytes())
    assert np.array_equal(cursor, rgb_of(patterns.cursor_pixels()))
