"""The host-blob life cycle through our front end: latency of each step and of the whole, commands per second.

One life cycle is what a guest does for every host-visible buffer: cross-domain GET_IMAGE_REQUIREMENTS (SUBMIT_3D,
which allocates the host buffer), RESOURCE_CREATE_BLOB (HOST3D), RESOURCE_MAP_BLOB (cache attribute resolved,
SHMEM_MAP to the front end and its ack), RESOURCE_UNMAP_BLOB (SHMEM_UNMAP) and RESOURCE_UNREF — five commands,
each one chain through the same front end the other benchmarks use.

There is no ratio to QEMU's C back end: it has no blobs, no context types and no shared-memory window (it offers
neither VIRTIO_GPU_F_RESOURCE_BLOB nor VIRGL/CONTEXT_INIT), so the operation does not exist there.

Writes benchmarks/results/blob_lifecycle.json.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass

from benchmarks.common import backend_process, percentiles, write_result
from tests.gpu_helpers import Gpu, resp_type
from tests.test_gpu_host_blob import FEATURES, Client, h
from vgpu.protocol import CtrlType, ResourceUnmapBlob, ResourceUnref

E = CtrlType
STEPS = ("requirements (SUBMIT_3D)", "CREATE_BLOB HOST3D", "MAP_BLOB", "UNMAP_BLOB", "UNREF")
BLOB_W = BLOB_H = 64  # XR24: 16 KiB, page-aligned


def vgpu_cmd(window: int, max_memory: str = "1G") -> list[str]:
    return [sys.executable, "-m", "vgpu", "--log-level=error", "--context-types=cross-domain", "--allocator=memfd",
            f"--host-visible-size={window}", f"--max-host-memory={max_memory}", "--map-timeout=5"]


def connect(sock: str) -> Client:
    g = Gpu.connect(sock, features=FEATURES)
    g.fe.reserve_shm()
    c = Client(g)
    c.start()
    return c


def expect(resp: bytes, want: int, step: str) -> None:
    if resp_type(resp) != want:
        raise RuntimeError(f"{step}: answered {resp_type(resp):#x}, expected {want:#x}")


def one_cycle(c: Client, rid: int, offset: int) -> list[float]:
    """One full life cycle; seconds per step."""
    t = [time.perf_counter()]
    reqs = c.requirements(BLOB_W, BLOB_H)
    t.append(time.perf_counter())
    expect(c.blob(rid, reqs), E.RESP_OK_NODATA, STEPS[1])
    t.append(time.perf_counter())
    expect(c.map(rid, offset), E.RESP_OK_MAP_INFO, STEPS[2])
    t.append(time.perf_counter())
    expect(c.gpu.cmd(ResourceUnmapBlob(h(E.CMD_RESOURCE_UNMAP_BLOB), rid)), E.RESP_OK_NODATA, STEPS[3])
    t.append(time.perf_counter())
    expect(c.gpu.cmd(ResourceUnref(h(E.CMD_RESOURCE_UNREF, 0), rid)), E.RESP_OK_NODATA, STEPS[4])
    t.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(t)]


@dataclass
class CycleStats:
    cycles: int
    cycles_per_s: float
    commands_per_s: float
    p50_us: float
    p99_us: float
    steps: dict[str, tuple[float, float]]  # step -> (p50 us, p99 us)


def measure_cycles(c: Client, rid: int, offset: int, seconds: float, min_cycles: int = 20) -> CycleStats:
    one_cycle(c, rid, offset)  # warm up
    per_step: list[list[float]] = [[] for _ in STEPS]
    totals: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(totals) < min_cycles:
        steps = one_cycle(c, rid, offset)
        for i, s in enumerate(steps):
            per_step[i].append(s)
        totals.append(sum(steps))
    elapsed = time.perf_counter() - start
    p50, p99 = percentiles(totals)
    step_stats = {}
    for name, samples in zip(STEPS, per_step, strict=True):
        s50, s99 = percentiles(samples)
        step_stats[name] = (s50 * 1e6, s99 * 1e6)
    n = len(totals)
    return CycleStats(n, n / elapsed, len(STEPS) * n / elapsed, p50 * 1e6, p99 * 1e6, step_stats)


def print_stats(label: str, st: CycleStats) -> None:
    print(f"{label}: {st.cycles_per_s:.0f} life cycles/s = {st.commands_per_s:.0f} commands/s; "
          f"life cycle p50 {st.p50_us:.0f} us, p99 {st.p99_us:.0f} us ({st.cycles} cycles)")
    for name, (p50, p99) in st.steps.items():
        print(f"  {name:<26} p50 {p50:>8.1f} us  p99 {p99:>8.1f} us")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    seconds = 0.1 if args.quick else args.seconds
    with backend_process(vgpu_cmd(16 << 20)) as (sock, _pid):
        c = connect(sock)
        try:
            st = measure_cycles(c, 1, 0, seconds, 5 if args.quick else 20)
        finally:
            c.gpu.close()
    print_stats("vgpu host-blob life cycle (cross-domain, memfd, 64x64 XR24)", st)
    print("QEMU C vhost-user-gpu: no ratio — it has no blobs, no context types and no shared-memory window")
    if not args.quick:
        print(f"wrote {write_result('blob_lifecycle', {'vgpu': st.__dict__, 'qemu': 'no blob support'})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
