"""Control-queue command rates, ours vs QEMU's C back end vs the no-op floor, through the same front end.

* ``display_info``: GET_DISPLAY_INFO, one chain per kick, waiting for the used ring each time (batch 1).  Both GPU
  back ends answer it by asking the front end's display socket, as QEMU's does.
* ``create_unref``: RESOURCE_CREATE_2D of 64 resources (64x64 BGRX) in one kick, waiting for all 64 used entries,
  then RESOURCE_UNREF of the 64 in one kick: 128 commands per call, 64 per kick.
* ``mix_2d``: the 2D mix a guest does per small surface — CREATE_2D 256x256, ATTACH_BACKING of 64 scattered pages,
  TRANSFER_TO_HOST_2D 256x256, RESOURCE_FLUSH, UNREF — each command its own chain and kick.

The floor gets byte-for-byte the same chains; its device writes each request back into the answer buffer, so its
rate is the harness plus the thinnest Python back end.  Writes benchmarks/results/<name>.json per benchmark.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from benchmarks import sides as sd
from benchmarks.common import Rate, measure
from vgpu.protocol import (
    CtrlHdr,
    CtrlType,
    DisplayOne,
    Format,
    GetDisplayInfo,
    GpuFeature,
    Rect,
    ResourceAttachBacking,
    ResourceCreate2D,
    ResourceFlush,
    ResourceUnref,
    TransferToHost2D,
    encode_command,
    responses,
)
from vgpu.session import Session, hdr
from vgpu.vhost_user.frontend import Display

E = CtrlType
X = Format.FORMAT_B8G8R8X8_UNORM
NAMES = ["display_info", "create_unref", "mix_2d"]
BATCH = 64
SMALL = 64  # create_unref: 64x64 BGRX, 16 KiB of pixels each


def display(width: int = 1920, height: int = 1080) -> Display:
    """A front-end display of one output (QEMU's back end needs it before it serves commands).  The answer is
    built once: the front end's cost is the harness, and the harness should be as thin as it can be."""
    info = responses.display_info(CtrlHdr(0), [DisplayOne(Rect(0, 0, width, height), True)])
    return Display(lambda: info, lambda scanout: b"")


def connect(key: str, sock: str, ram_size: int = 64 << 20) -> Session:
    """The same front end for every side; the floor has no display socket (it is no GPU)."""
    return Session.open(sock, features=GpuFeature.F_EDID.mask, ram_size=ram_size,
                       display=None if key == "floor" else display())


def expect_ok(resps: list[bytes], what: str, want: int = E.RESP_OK_NODATA) -> None:
    for r in resps:
        t = int.from_bytes(r[:4], "little")
        if t != want:
            raise RuntimeError(f"{what}: answered {t:#x}, expected {want:#x}")


def caller(key: str, g: Session, batches: list[list[bytes]], resp_size: int, want: int,
           what: str) -> Callable[[], None]:
    """One call: each batch in one kick, waiting for all of it.  The floor's answers are echoes, not checked."""
    submit = g.fe.submit_batch
    check = key != "floor"

    def run() -> None:
        for reqs in batches:
            resps = submit(0, reqs, resp_size)
            if check:
                expect_ok(resps, what, want)
    return run


def mix_requests(g: Session, rid: int = 1, size: int = 256) -> list[bytes]:
    """The five commands of the 2D mix on resource `rid`, backed by scattered pages of g's RAM."""
    b = g.backing(size * size * 4)
    return [
        encode_command(ResourceCreate2D(hdr(E.CMD_RESOURCE_CREATE_2D), rid, X, size, size)),
        encode_command(ResourceAttachBacking(hdr(E.CMD_RESOURCE_ATTACH_BACKING), rid, b.entries)),
        encode_command(TransferToHost2D(hdr(E.CMD_TRANSFER_TO_HOST_2D), Rect(0, 0, size, size), 0, rid)),
        encode_command(ResourceFlush(hdr(E.CMD_RESOURCE_FLUSH), Rect(0, 0, size, size), rid)),
        encode_command(ResourceUnref(hdr(E.CMD_RESOURCE_UNREF), rid)),
    ]


def mix_rate(sock: str, label: str, seconds: float, gpu: Session | None = None, size: int = 256) -> Rate:
    """The mix on one back end alone (the scale benchmark's yardstick, which compares a back end with itself)."""
    g = gpu or Session.open(sock, features=GpuFeature.F_EDID.mask, display=display())
    try:
        run = caller("ours", g, [[r] for r in mix_requests(g, 1, size)], 24, E.RESP_OK_NODATA, label)
        return measure(label, 1, run, seconds)
    finally:
        if gpu is None:
            g.close()


def _plan(name: str, key: str, g: Session) -> tuple[Callable[[], None], int]:
    """(one call, commands per call) of benchmark `name` on side `key`."""
    if name == "display_info":
        req = encode_command(GetDisplayInfo(hdr(E.CMD_GET_DISPLAY_INFO)))
        return caller(key, g, [[req]], 408, E.RESP_OK_DISPLAY_INFO, name), 1
    if name == "create_unref":
        creates = [encode_command(ResourceCreate2D(hdr(E.CMD_RESOURCE_CREATE_2D), 1 + i, X, SMALL, SMALL))
                   for i in range(BATCH)]
        unrefs = [encode_command(ResourceUnref(hdr(E.CMD_RESOURCE_UNREF), 1 + i)) for i in range(BATCH)]
        return caller(key, g, [creates, unrefs], 24, E.RESP_OK_NODATA, name), 2 * BATCH
    reqs = mix_requests(g)
    return caller(key, g, [[r] for r in reqs], 24, E.RESP_OK_NODATA, name), len(reqs)


TITLES = {
    "display_info": "GET_DISPLAY_INFO, batch 1 (one chain per kick)",
    "create_unref": f"RESOURCE_CREATE_2D + RESOURCE_UNREF {SMALL}x{SMALL}, {BATCH} commands per kick",
    "mix_2d": "2D mix: create, attach 64 scattered pages, transfer 256x256, flush, unref (batch 1)",
}


def run_one(name: str, settings: sd.Settings) -> dict[str, object]:
    cmds = {"ours": sd.vgpu_command(profile=sd.profile_path(settings, name)), "floor": sd.ECHO,
            sd.SLEEPING: sd.sleeping_command()}
    if sd.have_qemu():
        cmds["qemu"] = [sd.QEMU_BACKEND]
    with sd.started(cmds) as procs:
        gpus = {k: connect(k, sock) for k, (sock, _pid) in procs.items()}
        try:
            sides = []
            for k, g in gpus.items():
                run, ops = _plan(name, k, g)
                sides.append(sd.Side(k, sd.LABELS[k], run, ops, procs[k][1]))
            stats = sd.interleave(sides, settings.rounds, settings.slice_s)
        finally:
            for g in gpus.values():
                g.close()
    ratios = {"ours / floor": sd.ratio(stats, "ours", "floor")}
    if "qemu" in stats:
        ratios["ours / qemu"] = sd.ratio(stats, "ours", "qemu")
        ratios[sd.SLEEPING_RATIO] = sd.ratio(stats, sd.SLEEPING, "qemu")
        ratios["qemu / floor"] = sd.ratio(stats, "qemu", "floor")
    sd.print_sides(TITLES[name], "commands/s", stats)
    sd.print_ratios(ratios)
    if "qemu" not in stats:
        print(f"ratio vs QEMU not taken: {sd.QEMU_BACKEND} is not installed")
    return {"title": TITLES[name], "unit": "commands/s", "sides": stats, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    settings = sd.parse(__doc__ or "", argv, NAMES)
    for name in settings.only or NAMES:
        sd.save(settings, name, run_one(name, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
