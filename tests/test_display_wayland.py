"""`--display wayland` against a real compositor: Debian's weston, headless with the pixman renderer, started
privately per test; what it shows is read back with its screenshooter (`vgpu_lab.wayland_capture`).

Our back end runs as its own process, driven by our front end playing the VMM and the guest (no guest kernel): a
2D frame, the cursor, a scanout switched off, a flood of flushes, a front end that leaves, a compositor that dies.
Start-up without a compositor (none there, or one that never answers) must end the back end with a clear error.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from tests.conftest import require, start_backend
from vgpu import status
from vgpu.conformance.process import BackendProcess
from vgpu.procfs import fd_count, wait_until
from vgpu.protocol import CtrlType, CursorPos, Format, MoveCursor, Rect, TransferToHost2D, UpdateCursor
from vgpu.session import Backing, Session, hdr, pattern
from vgpu_lab import patterns
from vgpu_lab.wayland_capture import Capture, find
from vgpu_lab.weston import BACKGROUND, WESTON, HeadlessWeston

W, H = 320, 200
BACKGROUND_RGB = np.array([(BACKGROUND >> 16) & 0xFF, (BACKGROUND >> 8) & 0xFF, BACKGROUND & 0xFF], np.uint8)


def rgb_of_bgrx(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """What a compositor shows of x8r8g8b8 pixels: R, G, B (the X byte ignored)."""
    return np.ascontiguousarray(pixels[..., 2::-1])


def cursor_rgb() -> npt.NDArray[np.uint8]:
    argb = patterns.cursor_pixels().view(np.uint8).reshape(64, 64, 4)
    return rgb_of_bgrx(argb)


@pytest.fixture
def weston() -> Iterator[HeadlessWeston]:
    require(str(WESTON), "weston (Debian bookworm), the compositor the display is shown on")
    with HeadlessWeston(width=1024, height=768) as w:
        yield w


def backend_for(weston: HeadlessWeston, tmp_path: Path) -> BackendProcess:
    cmd = [sys.executable, "-m", "vgpu", "--log-level=info", "--display=wayland",
           f"--wayland-display={weston.socket_path}", f"--status-socket={tmp_path / 'status'}"]
    return start_backend(cmd, tmp_path, "vgpu-wayland")


@pytest.fixture
def backend(weston: HeadlessWeston, tmp_path: Path) -> Iterator[BackendProcess]:
    b = backend_for(weston, tmp_path)
    yield b
    b.stop()


def windows(tmp_path: Path) -> list[dict[str, Any]]:
    doc = status.query(str(tmp_path / "status"))
    (display,) = doc["displays"]
    assert display["display"] == "wayland" and display["lost"] is None, display
    return list(display["windows"])


def capture_until(weston: HeadlessWeston, pred: Any, timeout: float = 10.0) -> npt.NDArray[np.uint8]:
    """The compositor's output once `pred(frame)` holds (frames reach it paced, a little after our commands)."""
    with Capture(weston.env) as cap:
        deadline = time.monotonic() + timeout
        while True:
            frame = cap.rgb()
            if pred(frame) or time.monotonic() > deadline:
                return frame
            time.sleep(0.05)


def redraw(gpu: Session, b: Backing, rid: int, img: npt.NDArray[np.uint8]) -> None:
    """The guest draws `img` into the backing and transfers all of it (a flush then shows what it names)."""
    gpu.write_backing(b, img.tobytes())
    h, w = img.shape[:2]
    gpu.ok(TransferToHost2D(hdr(CtrlType.CMD_TRANSFER_TO_HOST_2D), Rect(0, 0, w, h), 0, rid))


def cursor_image(gpu: Session, rid: int) -> None:
    argb = patterns.cursor_pixels().view(np.uint8).reshape(64, 64, 4)
    gpu.image_2d(rid, 64, 64, Format.FORMAT_B8G8R8A8_UNORM, argb)


def test_frame_and_cursor_on_weston_pixel_for_pixel(weston: HeadlessWeston, backend: BackendProcess,
                                                    tmp_path: Path) -> None:
    gpu = Session.open(backend.socket_path)
    try:
        img = pattern(W, H, seed=3)
        b = gpu.image_2d(1, W, H, Format.FORMAT_B8G8R8X8_UNORM, img)
        gpu.show(1, 0, Rect(0, 0, W, H))
        gpu.flush(1, Rect(0, 0, W, H))
        want = rgb_of_bgrx(img)
        frame = capture_until(weston, lambda f: find(f, want) is not None)
        at = find(frame, want)
        assert at is not None, f"the guest's frame is not on the compositor's output\n{backend.log()}"

        # The cursor: a subsurface above the window, its hot spot (3, 4) at the guest's position (50, 40).
        cursor_image(gpu, 2)
        gpu.ok(UpdateCursor(hdr(CtrlType.CMD_UPDATE_CURSOR), CursorPos(0, 50, 40), 2, 3, 4), queue=1)
        x0, y0 = at[0] + 47, at[1] + 36

        def cursor_at(f: npt.NDArray[np.uint8], x: int, y: int) -> bool:
            return bool(np.array_equal(f[y:y + 64, x:x + 64], cursor_rgb()))

        frame = capture_until(weston, lambda f: cursor_at(f, x0, y0))
        assert cursor_at(frame, x0, y0), f"no cursor at {(x0, y0)}\n{backend.log()}"
        # Everywhere else the window still shows the frame, every pixel.
        window = frame[at[1]:at[1] + H, at[0]:at[0] + W].copy()
        window[36:36 + 64, 47:47 + 64] = want[36:36 + 64, 47:47 + 64]
        assert np.array_equal(window, want)

        # MOVE_CURSOR: the cursor moves, and the frame shows again where it was.
        gpu.ok(MoveCursor(hdr(CtrlType.CMD_MOVE_CURSOR), CursorPos(0, 200, 100)), queue=1)
        x1, y1 = at[0] + 197, at[1] + 96
        frame = capture_until(weston, lambda f: cursor_at(f, x1, y1))
        assert cursor_at(frame, x1, y1)
        assert np.array_equal(frame[y0:y0 + 64, x0:x0 + 64], want[36:36 + 64, 47:47 + 64])
        (win,) = windows(tmp_path)
        assert (win["width"], win["height"], win["buffer"], win["cursor"]) == (W, H, "wl_shm", True)

        # A partial update: only that rectangle changes on screen.
        img2 = img.copy()
        img2[10:30, 100:180] = pattern(80, 20, seed=9)
        redraw(gpu, b, 1, img2)
        gpu.flush(1, Rect(100, 10, 80, 20))
        want2 = rgb_of_bgrx(img2)
        frame = capture_until(weston, lambda f: bool(np.array_equal(f[at[1] + 10:at[1] + 30, at[0] + 100:at[0] + 180],
                                                                    want2[10:30, 100:180])))
        assert np.array_equal(frame[at[1]:at[1] + 90, at[0]:at[0] + W], want2[:90])
    finally:
        gpu.close()


def test_window_closes_when_scanout_is_disabled_and_when_the_vmm_leaves(weston: HeadlessWeston,
                                                                       backend: BackendProcess,
                                                                       tmp_path: Path) -> None:
    idle = fd_count(backend.pid)
    gpu = Session.open(backend.socket_path)
    img = pattern(W, H, seed=5)
    want = rgb_of_bgrx(img)
    try:
        gpu.image_2d(1, W, H, Format.FORMAT_B8G8R8X8_UNORM, img)
        gpu.show(1, 0, Rect(0, 0, W, H))
        gpu.flush(1, Rect(0, 0, W, H))
        assert find(capture_until(weston, lambda f: find(f, want) is not None), want) is not None
        gpu.show(0, 0, Rect(0, 0, 0, 0))  # SET_SCANOUT resource 0: the scanout is off
        frame = capture_until(weston, lambda f: bool((f == BACKGROUND_RGB).all()))
        assert (frame == BACKGROUND_RGB).all(), "a window is still shown after the scanout was disabled"
        assert windows(tmp_path) == []
        # On again, then the VMM goes away: the window goes with it.
        gpu.show(1, 0, Rect(0, 0, W, H))
        gpu.flush(1, Rect(0, 0, W, H))
        assert find(capture_until(weston, lambda f: find(f, want) is not None), want) is not None
    finally:
        gpu.close()
    frame = capture_until(weston, lambda f: bool((f == BACKGROUND_RGB).all()))
    assert (frame == BACKGROUND_RGB).all(), "a window outlived its front end"
    assert wait_until(lambda: windows(tmp_path) == [], 5)
    # Everything the connection and its window held is released (the compositor connection stays).
    assert backend.settle_fds(idle) == idle, backend.log()


def test_flushes_faster_than_frames_are_coalesced_never_waited_for(weston: HeadlessWeston, backend: BackendProcess,
                                                                  tmp_path: Path) -> None:
    """Pacing by frame callbacks: every flush is answered at once, at most one commit is ever in flight, and the
    last frame the guest flushed is what ends up on screen."""
    gpu = Session.open(backend.socket_path)
    try:
        b = gpu.image_2d(1, W, H, Format.FORMAT_B8G8R8X8_UNORM, pattern(W, H))
        gpu.show(1, 0, Rect(0, 0, W, H))
        n = 200
        last = pattern(W, H)
        for i in range(n):
            last = pattern(W, H, seed=i)
            redraw(gpu, b, 1, last)
            gpu.flush(1, Rect(0, 0, W, H))
        (win,) = windows(tmp_path)
        assert win["updates"] == n
        assert win["commits"] <= win["frames"] + 1, win  # one frame in flight at most
        assert win["commits"] < n, f"{win}: every flush was committed, nothing was paced"
        want = rgb_of_bgrx(last)
        assert find(capture_until(weston, lambda f: find(f, want) is not None), want) is not None, backend.log()
        print(f"{n} flushes -> {win['commits']} commits, {win['frames']} frame callbacks")
    finally:
        gpu.close()


def test_compositor_gone_costs_the_display_not_the_vmm(weston: HeadlessWeston, backend: BackendProcess,
                                                       tmp_path: Path) -> None:
    gpu = Session.open(backend.socket_path)
    try:
        gpu.image_2d(1, W, H, Format.FORMAT_B8G8R8X8_UNORM, pattern(W, H))
        gpu.show(1, 0, Rect(0, 0, W, H))
        gpu.flush(1, Rect(0, 0, W, H))
        weston.stop()
        assert wait_until(lambda: "lost the compositor" in backend.log(), 10), backend.log()
        for _ in range(5):  # still served, every command answered OK
            gpu.flush(1, Rect(0, 0, W, H))
        gpu.show(0, 0, Rect(0, 0, 0, 0))
        assert backend.alive()
        doc = status.query(str(tmp_path / "status"))
        assert doc["displays"][0]["lost"] is not None
    finally:
        gpu.close()


def run_without_display(args: list[str], tmp_path: Path, env: dict[str, str] | None = None
                        ) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "vgpu", f"--socket-path={tmp_path / 'vgpu.sock'}", *args],
                          capture_output=True, text=True, timeout=60, env=env)
    return proc, time.monotonic() - started


def test_no_compositor_is_a_clear_error_at_start(tmp_path: Path) -> None:
    proc, _ = run_without_display(["--display=wayland", f"--wayland-display={tmp_path / 'nothing-here'}"],
                                  tmp_path)
    assert proc.returncode == 1
    assert f"--display wayland: no Wayland compositor at {tmp_path / 'nothing-here'}" in proc.stderr
    assert not (tmp_path / "vgpu.sock").exists()
    # No WAYLAND_DISPLAY and no XDG_RUNTIME_DIR: the message says which is missing.
    env = {k: v for k, v in os.environ.items() if k not in ("WAYLAND_DISPLAY", "XDG_RUNTIME_DIR")}
    proc, _ = run_without_display(["--display=wayland"], tmp_path, env)
    assert proc.returncode == 1 and "XDG_RUNTIME_DIR is not set" in proc.stderr, proc.stderr


def test_a_hung_compositor_is_a_clear_error_at_start_not_a_hang(weston: HeadlessWeston, tmp_path: Path) -> None:
    weston.pause()  # accepts the connection (the kernel does), never answers
    try:
        proc, took = run_without_display(["--display=wayland", f"--wayland-display={weston.socket_path}"],
                                         tmp_path)
    finally:
        weston.resume()
    assert proc.returncode == 1, proc.stderr
    assert "did not answer the registry in time" in proc.stderr, proc.stderr
    print(f"a stopped compositor: the back end gave up after {took:.1f} s")


def test_fps_benchmark_quick_runs_both_sides(tmp_path: Path) -> None:
    """`python -m benchmarks.wayland_fps` in short: both sides present frames through weston (the full run's
    figures are committed in benchmarks/results/wayland_fps.json)."""
    require(str(WESTON), "weston (Debian bookworm), the compositor the benchmark presents to")
    r = subprocess.run([sys.executable, "-m", "benchmarks.wayland_fps", "--quick"], capture_output=True, text=True,
                       timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr
    m = re.search(r"ours ([\d.]+) frames/s presented .* plain wl_shm client ([\d.]+) frames/s", r.stdout)
    assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, r.stdout + r.stderr
    assert "wrote " not in r.stdout
