"""2D command throughput and transfer bandwidth, side by side in one run.

* Mix: RESOURCE_CREATE_2D, ATTACH_BACKING (64 scattered pages), TRANSFER_TO_HOST_2D 256x256, RESOURCE_FLUSH,
  RESOURCE_UNREF — each command one chain, through the same front end — against our back end and QEMU's C
  `vhost-user-gpu`.  Reported as mixes per second and the ratio.
* Transfer: TRANSFER_TO_HOST_2D of a 1920x1080 BGRA resource backed by 2025 scattered 4 KiB pages, against the
  floor of copying the same bytes once with numpy (memory to memory).  Reported as GB/s and the ratio.

Writes benchmarks/results/gpu_2d.json."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from benchmarks.common import Rate, backend, measure, write_result
from tests.gpu_helpers import Gpu, hdr
from vgpu.protocol import (
    CtrlHdr,
    CtrlType,
    DisplayOne,
    Format,
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
from vgpu.vhost_user.frontend import Display

QEMU_BACKEND = "/usr/lib/qemu/vhost-user-gpu"
VGPU = [sys.executable, "-m", "vgpu", "--log-level=error"]
E = CtrlType
X = Format.FORMAT_B8G8R8X8_UNORM


def display() -> Display:
    """A front-end display of one 1280x800 output (what QEMU's back end needs before it serves commands)."""
    return Display(lambda: responses.display_info(CtrlHdr(0), [DisplayOne(Rect(0, 0, 1280, 800), True)]),
                   lambda scanout: b"")


def mix_rate(sock: str, label: str, seconds: float, gpu: Gpu | None = None) -> Rate:
    """The mix on resource id 1; on `gpu` when given (kept open: the scale benchmark reuses its connection)."""
    g = gpu or Gpu.connect(sock, features=GpuFeature.F_EDID.mask, display=display())
    try:
        b = g.backing(256 * 256 * 4)
        reqs = [
            encode_command(ResourceCreate2D(hdr(E.CMD_RESOURCE_CREATE_2D), 1, X, 256, 256)),
            encode_command(ResourceAttachBacking(hdr(E.CMD_RESOURCE_ATTACH_BACKING), 1, b.entries)),
            encode_command(TransferToHost2D(hdr(E.CMD_TRANSFER_TO_HOST_2D), Rect(0, 0, 256, 256), 0, 1)),
            encode_command(ResourceFlush(hdr(E.CMD_RESOURCE_FLUSH), Rect(0, 0, 256, 256), 1)),
            encode_command(ResourceUnref(hdr(E.CMD_RESOURCE_UNREF), 1)),
        ]

        def one() -> None:
            for r in reqs:
                resp = g.fe.submit(0, r, 24)
                if int.from_bytes(resp[:4], "little") != E.RESP_OK_NODATA:
                    raise RuntimeError(f"{label}: command failed with {int.from_bytes(resp[:4], 'little'):#x}")

        return measure(label, 1, one, seconds)
    finally:
        if gpu is None:
            g.close()


def transfer_rate(sock: str, seconds: float) -> tuple[float, float]:
    """(GB/s of TRANSFER_TO_HOST_2D, GB/s of the numpy floor) for 1920x1080 from scattered pages."""
    w, h = 1920, 1080
    nbytes = w * h * 4
    g = Gpu.connect(sock, features=GpuFeature.F_EDID.mask)
    try:
        b = g.image_2d(1, w, h, X)
        req = encode_command(TransferToHost2D(hdr(E.CMD_TRANSFER_TO_HOST_2D), Rect(0, 0, w, h), 0, 1))
        ours = measure("transfer", 1, lambda: g.fe.submit(0, req, 24), seconds)
        # The floor: the same bytes gathered once from the same scattered pages, by numpy, in this process.
        ram = np.frombuffer(g.ram.map, np.uint8)
        pages = np.array(b.pages, dtype=np.int64) // 4096
        out = np.empty(len(pages) * 4096, np.uint8).reshape(-1, 4096)
        view = ram[: len(ram) // 4096 * 4096].reshape(-1, 4096)

        def copy_once() -> None:
            np.take(view, pages, axis=0, out=out)

        floor = measure("floor", 1, copy_once, seconds)
        return nbytes * ours.ops_per_s / 1e9, nbytes * floor.ops_per_s / 1e9
    finally:
        g.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    seconds = 0.1 if args.quick else args.seconds
    rates: list[Rate] = []
    with backend(VGPU) as sock:
        rates.append(mix_rate(sock, "vgpu 2D mix", seconds))
        ours_gbs, floor_gbs = transfer_rate(sock, seconds)
    have_qemu = os.path.exists(QEMU_BACKEND)
    if have_qemu:
        with backend([QEMU_BACKEND]) as sock:
            rates.append(mix_rate(sock, "QEMU C vhost-user-gpu 2D mix", seconds))
    print(f"{'case':<34} {'mixes/s':>9} {'p50 us':>9} {'p99 us':>9}")
    for r in rates:
        print(f"{r.name:<34} {r.ops_per_s:>9.0f} {r.p50_us:>9.1f} {r.p99_us:>9.1f}")
    ratios = {"transfer 1920x1080 / numpy floor": ours_gbs / floor_gbs}
    if have_qemu:
        ratios["2D mix vgpu / QEMU"] = rates[0].ops_per_s / rates[1].ops_per_s
    else:
        print(f"2D mix ratio not taken: {QEMU_BACKEND} is not installed (tools/test provisions it)")
    print(f"transfer 1920x1080 BGRA, 2025 scattered pages: {ours_gbs:.2f} GB/s; numpy floor {floor_gbs:.2f} GB/s")
    for k, v in ratios.items():
        print(f"ratio  {k:<40} {v:.2f}")
    if not args.quick:
        result = {"rates": rates, "transfer_gbs": ours_gbs, "floor_gbs": floor_gbs, "ratios": ratios}
        print(f"wrote {write_result('gpu_2d', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
