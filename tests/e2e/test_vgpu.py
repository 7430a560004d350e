"""End to end: a real QEMU 10 boots the 6.12 Linux guest with `-device vhost-user-gpu-pci` against *our* back end.

What the guest's own driver says (features, scanouts), what fbcon and a KMS client draw (the PNG pictures of our
scanout, pixel for pixel), the cursor image the guest set (as sent to the display socket), and that the back end
holds nothing after the guest powers off.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np

from tests.e2e.conftest import BOOT_TIMEOUT, MARK, rgb_of
from vgpu.gpu import png
from vgpu.procfs import fd_count, open_fds, wait_until
from vgpu_lab import initramfs, patterns, provision
from vgpu_lab.qemu import Backend, QemuConfig, run_guest, socket_dir


def test_linux_guest_on_our_backend(lab: provision.Lab, tmp_path: Path) -> None:
    pics = tmp_path / "pictures"
    # fbcon first (text on tty0), then the KMS client; the guest sleeps so fbcon's frame is flushed.
    command = f"/bin/sh -c 'echo {MARK} > /dev/tty0; sleep 1; /bin/kms_pattern 500'"
    initrd = initramfs.build_initramfs(
        tmp_path / "initrd.gz", busybox=lab.busybox, command=command, modules_dir=lab.kernel.modules_dir,
        modules=initramfs.VIRTIO_GPU_MODULES, files={"/bin/kms_pattern": lab.guest_programs["kms_pattern"]},
    )
    backend = [sys.executable, "-m", "vgpu", "--socket-path={sock}", f"--scanout-png={pics}", "--png-rate=20",
               "--png-history", "--log-level=info"]
    with socket_dir() as d:
        sock = d / "vgpu.sock"
        with Backend(backend, sock) as proc:
            assert proc.pid is not None
            idle = fd_count(proc.pid)
            started = time.monotonic()
            guest = run_guest(kernel=lab.kernel.vmlinuz, initrd=initrd, socket_path=sock,
                              config=QemuConfig(qemu=lab.qemu.system), timeout=BOOT_TIMEOUT,
                              serial_log=tmp_path / "serial.log")
            wall = time.monotonic() - started
            # QEMU has exited: the back end must be back to its idle fds (no memory table, rings, sockets).
            pid = proc.pid
            released = wait_until(lambda: fd_count(pid) == idle, 10)
            held = sorted(open_fds(pid))
        context = guest.describe() + f"\n--- back end\n{proc.output}"
    print(f"boot + fbcon + KMS + poweroff against vgpu: {wall:.2f} s wall")

    assert not guest.timed_out and guest.returncode == 0 and guest.guest_status == 0, context
    features = re.search(r"\[drm\] features: (.*)", guest.dmesg)
    assert features, context
    # We offer EDID, RESOURCE_UUID and RESOURCE_BLOB; QEMU's vhost-user-gpu front end builds the guest's feature
    # word from its own flags (VIRGL and EDID only), so the guest sees +edid and never +resource_blob here.  The
    # blob path reaches a guest through QEMU 11.1's generic vhost-user device instead.
    assert "+edid" in features.group(1) and "-resource_blob" in features.group(1), context
    assert "-virgl" in features.group(1), context
    assert re.search(r"\[drm\] Initialized virtio_gpu ", guest.dmesg), context
    lines = guest.guest_lines()
    for step in ("modeset", "dirtyfb", "cursor", "cursor-move", "done"):
        assert any(line.startswith(f"VGPU-GUEST {step} ok") for line in lines), f"{step}\n{context}"
    m = re.search(r"VGPU-GUEST modeset ok (\d+)x(\d+)", "\n".join(lines))
    assert m, context
    width, height = int(m.group(1)), int(m.group(2))

    history = sorted(pics.glob("scanout-0-*.png"))
    assert history, context
    frames = [png.decode(p.read_bytes()) for p in history]
    # fbcon: some picture before the KMS frame has text (non-background pixels) in its top rows.
    assert any(f[:64].reshape(-1, 3).any(axis=1).sum() > 50 for f in frames), "no console text seen"
    # The KMS client's frame, every pixel: one of the pictures is exactly the guest's pattern.
    want = rgb_of(patterns.frame_pixels(width, height))
    assert any(f.shape == want.shape and np.array_equal(f, want) for f in frames), \
        f"no picture matches the {width}x{height} pattern among {len(frames)}"
    # The cursor image the guest set, as sent on the display socket.
    cursor = png.decode((pics / "cursor-0.png").read_bytes())
    assert np.array_equal(cursor, rgb_of(patterns.cursor_pixels()))
    assert released, f"back end still holds {held} (idle had {idle})"
