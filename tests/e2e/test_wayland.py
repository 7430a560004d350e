"""End to end: a QEMU 11.1 guest on the generic vhost-user device, shown by our back end on a real compositor.

The generic ``vhost-user-test-device-pci`` carries no display socket, so without a display of our own nobody sees
this guest.  Here our back end runs with ``--display wayland`` against a headless weston (pixman renderer) and the
guest boots to fbcon, prints a line on its console, then runs ``kms_pattern``: a KMS frame and a cursor moved to
(100, 80).  While the guest holds the picture, the test reads weston's output with its screenshooter: the console
text, then the guest's pattern pixel for pixel with the guest's cursor over it.  When the guest is gone, so is the
window.

Set ``VGPU_SCREENSHOT_DIR`` to keep the captures (the README's screenshot is one of them); by default they stay in
the test's temporary directory.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from tests.conftest import require
from tests.e2e.conftest import BOOT_TIMEOUT, MARK, rgb_of
from tests.e2e.test_qemu11 import REQUIRED_STEPS
from vgpu.gpu import png
from vgpu_lab import initramfs, patterns, provision
from vgpu_lab.qemu import Backend, GuestRun, run_guest, socket_dir
from vgpu_lab.sid import SidQemu
from vgpu_lab.wayland_capture import Capture, find
from vgpu_lab.weston import BACKGROUND, WESTON, HeadlessWeston

#: The guest's display (our --resolution): small enough that weston's 1920x1080 output holds the whole window.
WIDTH, HEIGHT = 1024, 768
HOLD_MS = 8000
BACKGROUND_RGB = np.array([(BACKGROUND >> 16) & 0xFF, (BACKGROUND >> 8) & 0xFF, BACKGROUND & 0xFF], np.uint8)


@dataclass
class Seen:
    """What the compositor showed while the guest ran."""

    console: npt.NDArray[np.uint8] | None = None
    frame: npt.NDArray[np.uint8] | None = None
    frame_at: tuple[int, int] | None = None
    with_cursor: bool = False
    captures: int = 0
    notes: list[str] = field(default_factory=list)


def expected_window() -> npt.NDArray[np.uint8]:
    """The guest's frame with its cursor drawn at (100, 80): what the window must show, every pixel."""
    want = rgb_of(patterns.frame_pixels(WIDTH, HEIGHT))
    x, y, n = patterns.CURSOR_X, patterns.CURSOR_Y, patterns.CURSOR_SIZE
    want[y:y + n, x:x + n] = rgb_of(patterns.cursor_pixels())
    return want


def console_text(shot: npt.NDArray[np.uint8]) -> bool:
    """fbcon's window with text: pixels that are neither the background nor the console's black."""
    other = ~(np.all(shot == BACKGROUND_RGB, axis=2) | np.all(shot == 0, axis=2))
    return int(other.sum()) > 50


def watch(weston: HeadlessWeston, guest_done: threading.Event) -> Seen:
    """Capture until the guest has shown its frame with the cursor (or ended)."""
    seen = Seen()
    frame_only = rgb_of(patterns.frame_pixels(WIDTH, HEIGHT))
    corner = frame_only[:64, :64]  # the cursor sits at (100, 80): this part is the frame's in any case
    want = expected_window()
    with Capture(weston.env) as cap:
        while not guest_done.is_set():
            shot = cap.rgb()
            seen.captures += 1
            if seen.console is None and console_text(shot) and find(shot, corner) is None:
                seen.console = shot
            at = find(shot, corner)
            if at is not None:
                x, y = at
                window = shot[y:y + HEIGHT, x:x + WIDTH]
                if window.shape == want.shape and np.array_equal(window, want):
                    seen.frame, seen.frame_at, seen.with_cursor = shot, at, True
                    return seen
                if window.shape == want.shape and np.array_equal(window, frame_only):
                    seen.frame, seen.frame_at = shot, at  # the frame, its cursor not yet there
            time.sleep(0.1)
    return seen


def save(directory: Path, name: str, rgb: npt.NDArray[np.uint8] | None) -> None:
    if rgb is not None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(png.encode(rgb))


def test_qemu11_guest_console_kms_frame_and_cursor_in_a_weston_window(lab: provision.Lab, qemu11: SidQemu,
                                                                      tmp_path: Path) -> None:
    require(str(WESTON), "weston (Debian bookworm), the compositor the display is shown on")
    command = f"/bin/sh -c 'echo {MARK} > /dev/tty0; sleep 2; /bin/kms_pattern {HOLD_MS}; sleep 1'"
    initrd = initramfs.build_initramfs(
        tmp_path / "initrd.gz", busybox=lab.busybox, command=command, modules_dir=lab.kernel.modules_dir,
        modules=initramfs.VIRTIO_GPU_MODULES, files={"/bin/kms_pattern": lab.guest_programs["kms_pattern"]},
    )
    with HeadlessWeston(width=1920, height=1080) as weston, socket_dir() as d:
        sock = d / "vgpu.sock"
        backend = [sys.executable, "-m", "vgpu", "--socket-path={sock}", "--display=wayland",
                   f"--wayland-display={weston.socket_path}", f"--resolution={WIDTH}x{HEIGHT}", "--log-level=info"]
        config = qemu11.config([d, lab.kernel.root, tmp_path])
        done = threading.Event()
        result: list[GuestRun] = []

        def boot() -> None:
            try:
                result.append(run_guest(kernel=lab.kernel.vmlinuz, initrd=initrd, socket_path=sock,
                                        config=config, timeout=BOOT_TIMEOUT, serial_log=tmp_path / "serial.log"))
            finally:
                done.set()

        with Backend(backend, sock) as proc:
            guest_thread = threading.Thread(target=boot, name="guest")
            guest_thread.start()
            seen = watch(weston, done)
            guest_thread.join(BOOT_TIMEOUT + 30)
            # The guest is gone: its window must be too (whatever the guest disabled on the way out).
            with Capture(weston.env) as cap:
                deadline = time.monotonic() + 10
                after = cap.rgb()
                while not (after == BACKGROUND_RGB).all() and time.monotonic() < deadline:
                    time.sleep(0.1)
                    after = cap.rgb()
        output = proc.output
    (guest,) = result
    context = guest.describe() + f"\n--- back end\n{output}\n--- weston\n{weston.output_log[-3000:]}"
    shots = Path(os.environ.get("VGPU_SCREENSHOT_DIR") or tmp_path / "screenshots")
    save(shots, "wayland-console.png", seen.console)
    save(shots, "wayland-kms-frame.png", seen.frame)
    print(f"{seen.captures} captures; console seen: {seen.console is not None}; frame at {seen.frame_at}, "
          f"cursor: {seen.with_cursor}; screenshots in {shots}")

    assert not guest.timed_out and guest.guest_status == 0, context
    lines = guest.guest_lines()
    for step in REQUIRED_STEPS:
        assert any(line.startswith(f"VGPU-GUEST {step} ok") for line in lines), f"{step}\n{context}"
    assert f"VGPU-GUEST modeset ok {WIDTH}x{HEIGHT}" in lines, context
    assert seen.console is not None, f"the console never reached the compositor\n{context}"
    assert seen.frame is not None, f"the guest's KMS frame never reached the compositor\n{context}"
    assert seen.with_cursor, f"the frame was shown, but never with the guest's cursor at (100, 80)\n{context}"
    assert (after == BACKGROUND_RGB).all(), f"a window outlived the guest\n{context}"
    assert "wayland: scanout 0: a 1024x768 window" in output, context
    # kms_pattern's RMFB switches the scanout off (the kernel disables the CRTC) before fbcon takes it back.
    assert "wayland: scanout 0 off: its window closes" in output, context
    print("\n".join(line for line in output.splitlines() if "wayland" in line))
