"""1920x1080 frames per second through a real compositor: our `--display wayland` against a plain wl_shm client.

Both present a 1920x1080 window on the same headless weston 10 (pixman renderer, 1920x1080 output) in interleaved
slices, so the machine's noise hits both alike; a frame counts when the compositor's frame callback for it came
back (for us: the window's `frames` in the status document).  Ours is driven like a guest that draws as fast as it
can: TRANSFER_TO_HOST_2D of the whole frame from scattered guest pages, then RESOURCE_FLUSH, again and again, with
our front end; the back end presents paced by frame callbacks, so flushes between two callbacks coalesce.  The
floor is the least a Python client can do per frame: copy 8 MB of pixels into a free wl_shm buffer (numpy),
attach, damage, ask for the frame callback, commit, wait for it.  The ratio is the median of per-round ratios.

    python -m benchmarks.wayland_fps [--quick] [--rounds N] [--slice SECONDS]

Results: benchmarks/results/wayland_fps.json (not with --quick).
"""

from __future__ import annotations

import argparse
import mmap
import os
import select
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pywayland.client.display import Display
from pywayland.protocol.wayland import WlCompositor, WlShm
from pywayland.protocol.xdg_shell import XdgWmBase

from benchmarks.common import REPO, write_result
from vgpu import status
from vgpu.protocol import CtrlType, Format, Rect, ResourceFlush, TransferToHost2D
from vgpu.session import Session, hdr, pattern
from vgpu_lab.qemu import Backend
from vgpu_lab.weston import HeadlessWeston

W, H = 1920, 1080


class PlainClient:
    """The floor: one xdg toplevel, two wl_shm buffers, a numpy copy per frame, paced by frame callbacks."""

    def __init__(self, socket_path: Path) -> None:
        self.display = Display(str(socket_path))
        self.display.connect()
        offered: dict[str, int] = {}
        registry = self.display.get_registry()
        registry.dispatcher["global"] = lambda _r, name, iface, _v: offered.__setitem__(iface, name)
        self.display.roundtrip()
        self.compositor = registry.bind(offered["wl_compositor"], WlCompositor, 4)
        self.shm = registry.bind(offered["wl_shm"], WlShm, 1)
        self.wm = registry.bind(offered["xdg_wm_base"], XdgWmBase, 1)
        self.wm.dispatcher["ping"] = lambda wm, serial: wm.pong(serial)
        self.surface = self.compositor.create_surface()
        self.xdg = self.wm.get_xdg_surface(self.surface)
        self.toplevel = self.xdg.get_toplevel()
        self.toplevel.set_title("plain wl_shm client")
        self.configured = False
        self.xdg.dispatcher["configure"] = self._configure
        self.surface.commit()
        while not self.configured:
            self.display.dispatch(block=True)
        size = W * H * 4
        fd = os.memfd_create("floor", os.MFD_CLOEXEC)
        os.ftruncate(fd, 2 * size)
        self.map = mmap.mmap(fd, 2 * size)
        pool = self.shm.create_pool(fd, 2 * size)
        os.close(fd)
        self.buffers = [pool.create_buffer(i * size, W, H, W * 4, WlShm.format.xrgb8888.value) for i in range(2)]
        pool.destroy()
        self.busy = [False, False]
        for i, b in enumerate(self.buffers):
            b.dispatcher["release"] = lambda _b, i=i: self._release(i)
        self.views = [np.frombuffer(self.map, np.uint8, size, i * size).reshape(H, W, 4) for i in range(2)]
        self.frames = 0
        self.done = True

    def _release(self, i: int) -> None:
        self.busy[i] = False

    def _configure(self, xdg: Any, serial: int) -> None:
        xdg.ack_configure(serial)
        self.configured = True

    def _frame_done(self, _cb: Any, _time: int) -> None:
        self.done = True
        self.frames += 1

    def run(self, frame: npt.NDArray[np.uint8], seconds: float) -> int:
        """Present frames for `seconds`; returns how many frame callbacks came back."""
        start = self.frames
        end = time.monotonic() + seconds
        fd = self.display.get_fd()
        while time.monotonic() < end:
            if self.done and False in self.busy:
                i = self.busy.index(False)
                self.views[i][...] = frame
                self.busy[i] = True
                self.done = False
                self.surface.attach(self.buffers[i], 0, 0)
                self.surface.damage_buffer(0, 0, W, H)
                cb = self.surface.frame()
                cb.dispatcher["done"] = self._frame_done
                self.surface.commit()
                self._cb = cb
            self.display.flush()
            if select.select([fd], [], [], 0.05)[0]:
                self.display.read()
            self.display.dispatch(block=False)
        return self.frames - start

    def close(self) -> None:
        self.views = []
        self.display.disconnect()


class Ours:
    """Our back end with --display wayland, driven by our front end like a guest redrawing a 1080p frame."""

    def __init__(self, weston: HeadlessWeston, workdir: Path) -> None:
        self.status_path = workdir / "status"
        sock = workdir / "vgpu.sock"
        self.backend = Backend([sys.executable, "-m", "vgpu", "--socket-path={sock}", "--display=wayland",
                                f"--wayland-display={weston.socket_path}", f"--status-socket={self.status_path}",
                                "--log-level=warning"], sock).start()
        self.gpu = Session.open(str(sock), ram_size=128 << 20)
        self.gpu.image_2d(1, W, H, Format.FORMAT_B8G8R8X8_UNORM, pattern(W, H))
        self.gpu.show(1, 0, Rect(0, 0, W, H))
        self.transfer = TransferToHost2D(hdr(CtrlType.CMD_TRANSFER_TO_HOST_2D), Rect(0, 0, W, H), 0, 1)
        self.flush = ResourceFlush(hdr(CtrlType.CMD_RESOURCE_FLUSH), Rect(0, 0, W, H), 1)

    def window(self) -> dict[str, Any]:
        doc = status.query(str(self.status_path))
        (win,) = doc["displays"][0]["windows"]
        return dict(win)

    def run(self, seconds: float) -> tuple[int, int]:
        """Frames presented (frame callbacks) and frames the guest flushed, in `seconds`."""
        before = self.window()["frames"]
        flushed = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.gpu.ok(self.transfer)
            self.gpu.ok(self.flush)
            flushed += 1
        return self.window()["frames"] - before, flushed

    def close(self) -> None:
        self.gpu.close()
        self.backend.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.wayland_fps", description=__doc__)
    p.add_argument("--quick", action="store_true", help="one short round, nothing written")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--slice", type=float, default=2.0, help="seconds per side per round")
    args = p.parse_args(argv)
    rounds, slice_s = (1, 0.5) if args.quick else (args.rounds, args.slice)
    frame = pattern(W, H, seed=1)
    ours_rates: list[float] = []
    floor_rates: list[float] = []
    flush_rates: list[float] = []
    with HeadlessWeston(width=W, height=H) as weston, tempfile.TemporaryDirectory(prefix="vgpu-wl-bench-") as d:
        floor = PlainClient(weston.socket_path)
        ours = Ours(weston, Path(d))
        try:
            for _ in range(rounds):
                floor_rates.append(floor.run(frame, slice_s) / slice_s)
                presented, flushed = ours.run(slice_s)
                ours_rates.append(presented / slice_s)
                flush_rates.append(flushed / slice_s)
        finally:
            ours.close()
            floor.close()
    ratios = [o / f for o, f in zip(ours_rates, floor_rates, strict=True) if f]
    result: dict[str, object] = {
        "benchmark": "wayland_fps", "rounds": rounds, "slice_s": slice_s, "quick": args.quick,
        "title": "1920x1080 frames/s presented through weston 10 (headless, pixman): --display wayland vs a "
                 "plain wl_shm client",
        "unit": "frames/s", "compositor": "weston 10.0.1 --backend=headless-backend.so --use-pixman, 1920x1080",
        "ours": {"frames_per_s": statistics.median(ours_rates), "round_rates": ours_rates,
                 "guest_flushes_per_s": statistics.median(flush_rates), "round_flush_rates": flush_rates},
        "floor": {"frames_per_s": statistics.median(floor_rates), "round_rates": floor_rates},
        "ratio": statistics.median(ratios) if ratios else None, "round_ratios": ratios,
    }
    print(f"ours {statistics.median(ours_rates):.1f} frames/s presented "
          f"(guest flushed {statistics.median(flush_rates):.1f}/s), plain wl_shm client "
          f"{statistics.median(floor_rates):.1f} frames/s: ratio {result['ratio']:.2f}")
    if not args.quick:
        print(f"wrote {write_result('wayland_fps', result).relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
