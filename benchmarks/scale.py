"""Scale: does a command cost more when the back end holds many resources, and what does each resource cost?

* **2D resources**: 10, 1,000 and 10,000 live 16x16 BGRX resources; at each level, the 2D mix of
  benchmarks.commands (CREATE_2D, ATTACH_BACKING, TRANSFER 256x256, FLUSH, UNREF on one more resource) is timed
  — p50/p99 must stay flat — and the back end's RSS is read. Host memory per resource *beyond its pixels* is the
  RSS growth from 10 to 10,000 resources divided by the resources added, minus the 1,024 bytes of pixels each
  holds.
* **Mapped blobs**: 10 and 1,000 live host blobs (cross-domain, memfd, 64x64 XR24, each mapped into the window);
  at each level the whole blob life cycle of one more blob is timed. The blobs' pages are shmem owned by memfds,
  charged to whoever touches them (the front end here), so the back end's RSS growth per blob is its bookkeeping
  (plus one fd per blob). The front end's window (tests' ShmWindow) checks overlaps against every live mapping,
  a linear cost that is part of the measured latency at 1,000 mappings.

Writes benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from benchmarks.blob_lifecycle import BLOB_W, CycleStats, connect, expect, measure_cycles, vgpu_cmd
from benchmarks.commands import display, mix_rate
from benchmarks.common import Rate, backend_process, rss_bytes, write_result
from vgpu.protocol import CtrlType, Format, GpuFeature, ResourceCreate2D, encode_command
from vgpu.session import Session, hdr

E = CtrlType
SMALL = 16  # 16x16 BGRX: 1,024 bytes of pixels per resource
FIRST_ID = 1000  # the mix uses id 1 and the blob cycle its own ids: the live population stays out of their way
CHUNK = 64


def fill_2d(g: Session, start: int, stop: int) -> None:
    """Create resources [start, stop) in chains of CHUNK per kick (setup, not measured)."""
    fmt = Format.FORMAT_B8G8R8X8_UNORM
    for base in range(start, stop, CHUNK):
        reqs = [encode_command(ResourceCreate2D(hdr(E.CMD_RESOURCE_CREATE_2D), FIRST_ID + i, fmt, SMALL, SMALL))
                for i in range(base, min(base + CHUNK, stop))]
        for resp in g.fe.submit_batch(0, reqs, 24):
            if int.from_bytes(resp[:4], "little") != E.RESP_OK_NODATA:
                raise RuntimeError(f"CREATE_2D failed with {int.from_bytes(resp[:4], 'little'):#x}")


def scale_2d(levels: list[int], seconds: float) -> dict[str, object]:
    cmd = [sys.executable, "-m", "vgpu", "--log-level=error", f"--max-resources={max(levels) + 100}"]
    out: dict[str, object] = {}
    with backend_process(cmd) as (sock, pid):
        g = Session.open(sock, features=GpuFeature.F_EDID.mask, display=display())
        try:
            live = 0
            rss: dict[int, int] = {}
            rates: dict[int, Rate] = {}
            for level in levels:
                fill_2d(g, live, level)
                live = level
                time.sleep(0.05)
                rss[level] = rss_bytes(pid)
                rates[level] = mix_rate(sock, f"2D mix with {level} live resources", seconds, gpu=g)
        finally:
            g.close()
    lo, hi = levels[0], levels[-1]
    per_resource = (rss[hi] - rss[lo]) / (hi - lo)
    out["levels"] = levels
    out["rss_bytes"] = rss
    out["rates"] = rates
    out["rss_per_resource_bytes"] = per_resource
    out["pixels_per_resource_bytes"] = SMALL * SMALL * 4
    out["beyond_pixels_bytes"] = per_resource - SMALL * SMALL * 4
    out["p50_ratio_highest_to_lowest"] = rates[hi].p50_us / rates[lo].p50_us
    return out


def scale_blobs(levels: list[int], seconds: float) -> dict[str, object]:
    blob_bytes = BLOB_W * BLOB_W * 4
    window = (max(levels) + 16) * blob_bytes
    out: dict[str, object] = {}
    with backend_process(vgpu_cmd(window, max_memory="1G")) as (sock, pid):
        c = connect(sock)
        try:
            live = 0
            rss: dict[int, int] = {}
            fds: dict[int, int] = {}
            stats: dict[int, CycleStats] = {}
            for level in levels:
                for i in range(live, level):
                    rid = FIRST_ID + i
                    expect(c.create_blob(rid, c.requirements(BLOB_W, BLOB_W)), E.RESP_OK_NODATA, "CREATE_BLOB")
                    expect(c.map(rid, (i + 1) * blob_bytes), E.RESP_OK_MAP_INFO, "MAP_BLOB")
                live = level
                time.sleep(0.05)
                rss[level] = rss_bytes(pid)
                fds[level] = len(os.listdir(f"/proc/{pid}/fd"))
                stats[level] = measure_cycles(c, 1, 0, seconds, 10)
        finally:
            c.sess.close()
    lo, hi = levels[0], levels[-1]
    out["levels"] = levels
    out["rss_bytes"] = rss
    out["fds"] = fds
    out["cycles"] = {k: v.__dict__ for k, v in stats.items()}
    out["rss_per_mapped_blob_bytes"] = (rss[hi] - rss[lo]) / (hi - lo)
    out["fds_per_mapped_blob"] = (fds[hi] - fds[lo]) / (hi - lo)
    out["blob_bytes"] = blob_bytes
    out["p50_ratio_highest_to_lowest"] = stats[hi].p50_us / stats[lo].p50_us
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=2.0, help="measuring time per level")
    p.add_argument("--quick", action="store_true", help="levels 10/100/300 and 10/50, short measurements")
    args = p.parse_args(argv)
    seconds = 0.1 if args.quick else args.seconds
    levels_2d = [10, 100, 300] if args.quick else [10, 1000, 10000]
    levels_blob = [10, 50] if args.quick else [10, 1000]
    started = time.monotonic()
    r2d = scale_2d(levels_2d, seconds)
    rblob = scale_blobs(levels_blob, seconds)
    print(f"{'2D resources live':<22} {'mix/s':>8} {'p50 us':>8} {'p99 us':>8} {'back-end RSS MiB':>17}")
    rates = r2d["rates"]
    rss = r2d["rss_bytes"]
    assert isinstance(rates, dict) and isinstance(rss, dict)
    for level in levels_2d:
        r = rates[level]
        print(f"{level:<22} {r.ops_per_s:>8.0f} {r.p50_us:>8.1f} {r.p99_us:>8.1f} {rss[level] / 2**20:>17.1f}")
    print(f"ratio  2D mix p50 at {levels_2d[-1]} / at {levels_2d[0]} live resources "
          f"{float(str(r2d['p50_ratio_highest_to_lowest'])):.2f}")
    print(f"host memory per 2D resource: {float(str(r2d['rss_per_resource_bytes'])):.0f} bytes of RSS, of which "
          f"{r2d['pixels_per_resource_bytes']} are pixels: {float(str(r2d['beyond_pixels_bytes'])):.0f} bytes beyond")
    print(f"\n{'mapped blobs live':<22} {'cycles/s':>8} {'p50 us':>8} {'p99 us':>8} {'back-end RSS MiB':>17} "
          f"{'fds':>6}")
    cycles = rblob["cycles"]
    rss_b = rblob["rss_bytes"]
    fds = rblob["fds"]
    assert isinstance(cycles, dict) and isinstance(rss_b, dict) and isinstance(fds, dict)
    for level in levels_blob:
        cs = cycles[level]
        print(f"{level:<22} {cs['cycles_per_s']:>8.0f} {cs['p50_us']:>8.1f} {cs['p99_us']:>8.1f} "
              f"{rss_b[level] / 2**20:>17.1f} {fds[level]:>6}")
    print(f"ratio  blob life cycle p50 at {levels_blob[-1]} / at {levels_blob[0]} mapped blobs "
          f"{float(str(rblob['p50_ratio_highest_to_lowest'])):.2f}")
    print(f"back end per mapped blob: {float(str(rblob['rss_per_mapped_blob_bytes'])):.0f} bytes of RSS "
          f"(the {rblob['blob_bytes']} bytes of the buffer are shmem, not in this figure), "
          f"{float(str(rblob['fds_per_mapped_blob'])):.2f} fds")
    elapsed = time.monotonic() - started
    print(f"scale: {elapsed:.1f} s")
    if not args.quick:
        print(f"wrote {write_result('scale', {'resources_2d': r2d, 'mapped_blobs': rblob, 'seconds': elapsed})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
