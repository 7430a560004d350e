"""Pixel traffic, ours vs QEMU's C back end vs floors, through the same front end, side by side in one run.

* ``transfer_scattered``: TRANSFER_TO_HOST_2D of a whole 1024x768 BGRX resource (3 MiB) whose backing is 768 4 KiB
  pages picked at random across a 256 MiB guest RAM, one command per kick.  Floors: one contiguous copy of the same
  3 MiB by numpy in this process (what the bytes cost to move at all), and the no-op device given the same chain
  (what the command's round trip costs).
* ``frames_1080p``: a 1920x1080 frame shown on scanout 0 — TRANSFER_TO_HOST_2D of the whole frame from 2025
  scattered pages and RESOURCE_FLUSH, both chains in one kick, as a guest's page flip — frames per second.  Each
  flush sends the frame to the front end's display socket (8 MiB inline, VHOST_USER_GPU_UPDATE) from both back
  ends alike; the front end drops it on arrival.

Writes benchmarks/results/<name>.json per benchmark.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable

import numpy as np

from benchmarks import sides as sd
from benchmarks.commands import caller, display, expect_ok
from vgpu.protocol import (
    CtrlType,
    Format,
    GpuFeature,
    Rect,
    ResourceAttachBacking,
    ResourceCreate2D,
    ResourceFlush,
    SetScanout,
    TransferToHost2D,
    encode_command,
)
from vgpu.session import PAGE, Backing, Session, hdr
from vgpu.vhost_user.frontend import Display
from vgpu.vhost_user.message import Message

E = CtrlType
X = Format.FORMAT_B8G8R8X8_UNORM
NAMES = ["transfer_scattered", "frames_1080p"]
RAM = 256 << 20
SIZES = {"transfer_scattered": (1024, 768), "frames_1080p": (1920, 1080)}
LABELS = {**sd.LABELS, "copy": "floor: numpy contiguous copy, same bytes"}


class SinkDisplay(Display):
    """A display that forgets what it was shown once it arrived: a frame benchmark would otherwise keep every
    8 MiB frame in the event log."""

    def handle(self, msg: Message) -> None:
        super().handle(msg)
        with self.cond:
            for e in self.events:
                for fd in e.fds:
                    os.close(fd)
            self.events.clear()


def scattered(g: Session, nbytes: int, seed: int = 7) -> Backing:
    """Backing pages spread at random over (nearly) the whole guest RAM, in random order: the worst case a guest
    kernel's page allocator can hand a driver."""
    npages = (nbytes + PAGE - 1) // PAGE
    span = (g.ram.size - (8 << 20)) // PAGE  # the rings and the command buffers live in the first pages
    base = g.ram.alloc(span * PAGE, PAGE)
    pages = [base + i * PAGE for i in random.Random(seed).sample(range(span), npages)]
    return Backing([(p, PAGE) for p in pages], nbytes)


def connect(key: str, sock: str, frames: bool) -> Session:
    disp = None if key == "floor" else (SinkDisplay(display().display_info, lambda s: b"") if frames else display())
    return Session.open(sock, features=GpuFeature.F_EDID.mask, ram_size=RAM, display=disp)


def prepare(name: str, key: str, g: Session) -> Callable[[], None]:
    """Create the resource, attach scattered pages (and show it, for frames); one call = one transfer / frame."""
    w, h = SIZES[name]
    b = scattered(g, w * h * 4)
    full = Rect(0, 0, w, h)
    setup = [encode_command(ResourceCreate2D(hdr(E.CMD_RESOURCE_CREATE_2D), 1, X, w, h)),
             encode_command(ResourceAttachBacking(hdr(E.CMD_RESOURCE_ATTACH_BACKING), 1, b.entries))]
    xfer = encode_command(TransferToHost2D(hdr(E.CMD_TRANSFER_TO_HOST_2D), full, 0, 1))
    if name == "frames_1080p":
        setup.append(encode_command(SetScanout(hdr(E.CMD_SET_SCANOUT), full, 0, 1)))
        batches = [[xfer, encode_command(ResourceFlush(hdr(E.CMD_RESOURCE_FLUSH), full, 1))]]
    else:
        batches = [[xfer]]
    for req in setup:
        resp = g.fe.submit(0, req, 24)
        if key != "floor":
            expect_ok([resp], f"{name} set-up")
    return caller(key, g, batches, 24, E.RESP_OK_NODATA, name)


def numpy_copy(nbytes: int) -> Callable[[], None]:
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)

    def run() -> None:
        np.copyto(dst, src)
    return run


def run_one(name: str, settings: sd.Settings) -> dict[str, object]:
    w, h = SIZES[name]
    frames = name == "frames_1080p"
    cmds = {"ours": sd.vgpu_command(profile=sd.profile_path(settings, name)), "floor": sd.ECHO}
    if frames:
        cmds[sd.SLEEPING] = sd.sleeping_command()
    if sd.have_qemu():
        cmds["qemu"] = [sd.QEMU_BACKEND]
    with sd.started(cmds) as procs:
        gpus = {k: connect(k, sock, frames) for k, (sock, _pid) in procs.items()}
        try:
            sides = [sd.Side(k, LABELS[k], prepare(name, k, g), 1, procs[k][1]) for k, g in gpus.items()]
            if not frames:
                sides.append(sd.Side("copy", LABELS["copy"], numpy_copy(w * h * 4), 1))
            stats = sd.interleave(sides, settings.rounds, settings.slice_s)
        finally:
            for g in gpus.values():
                g.close()
    ratios = {"ours / floor": sd.ratio(stats, "ours", "floor")}
    if "copy" in stats:
        ratios["ours / copy"] = sd.ratio(stats, "ours", "copy")
    if "qemu" in stats:
        ratios["ours / qemu"] = sd.ratio(stats, "ours", "qemu")
        if sd.SLEEPING in stats:
            ratios[sd.SLEEPING_RATIO] = sd.ratio(stats, sd.SLEEPING, "qemu")
        if "copy" in stats:
            ratios["qemu / copy"] = sd.ratio(stats, "qemu", "copy")
    unit = "frames/s" if frames else "transfers/s"
    title = (f"{w}x{h} frames: TRANSFER_TO_HOST_2D + RESOURCE_FLUSH from {w * h * 4 // PAGE} scattered pages"
             if frames else f"TRANSFER_TO_HOST_2D {w}x{h} from {w * h * 4 // PAGE} scattered 4 KiB pages of 256 MiB")
    sd.print_sides(title, unit, stats)
    gbs = {k: st.ops_per_s * w * h * 4 / 1e9 for k, st in stats.items()}
    print("GB/s  " + ", ".join(f"{k} {v:.2f}" for k, v in gbs.items()))
    sd.print_ratios(ratios)
    return {"title": title, "unit": unit, "bytes_per_op": w * h * 4, "gb_per_s": gbs, "sides": stats,
            "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    settings = sd.parse(__doc__ or "", argv, NAMES)
    for name in settings.only or NAMES:
        sd.save(settings, name, run_one(name, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
