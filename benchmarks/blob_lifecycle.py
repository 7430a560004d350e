"""The host-blob life cycle, ours vs its floors, side by side in one run: cycles per second and each step's latency.

One life cycle is what a guest does for every host-visible buffer: cross-domain GET_IMAGE_REQUIREMENTS (SUBMIT_3D,
which allocates the host buffer), RESOURCE_CREATE_BLOB (HOST3D), RESOURCE_MAP_BLOB (cache attribute resolved,
SHMEM_MAP to the front end and its ack), RESOURCE_UNMAP_BLOB (SHMEM_UNMAP) and RESOURCE_UNREF — five commands,
each one chain through the same front end the other benchmarks use; a 64x64 XR24 buffer (16 KiB, memfd).

Floors, measured in the same rounds:

* syscall floor: what the cycle cannot avoid, done in this process — memfd_create + ftruncate of the same 16 KiB,
  the front end's SHMEM_MAP handling (its window maps the fd over the reserved range), its SHMEM_UNMAP handling and
  close;
* transport floor: the no-op echo device given five chains, two of which ask it to SHMEM_MAP / SHMEM_UNMAP a fresh
  memfd of the same size over the back-end channel — our vhost-user layer with no GPU in it.

There is no ratio to QEMU's C back end: it has no blobs, no context types and no shared-memory window (it offers
neither VIRTIO_GPU_F_RESOURCE_BLOB nor VIRGL/CONTEXT_INIT), so the operation does not exist there.

Writes benchmarks/results/blob_lifecycle.json.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks import sides as sd
from benchmarks.common import percentiles
from vgpu.protocol import CtrlType, ResourceUnmapBlob, ResourceUnref
from vgpu.session import CROSS_DOMAIN_FEATURES, CrossDomainGuest, Session, rtype
from vgpu.vhost_user.shm_window import ShmMapping, ShmWindow

E = CtrlType
STEPS = ("requirements (SUBMIT_3D)", "CREATE_BLOB HOST3D", "MAP_BLOB", "UNMAP_BLOB", "UNREF")
BLOB_W = BLOB_H = 64  # XR24: 16 KiB, page-aligned


def vgpu_cmd(window: int, max_memory: str = "1G") -> list[str]:
    return [sys.executable, "-m", "vgpu", "--log-level=error", "--context-types=cross-domain", "--allocator=memfd",
            f"--host-visible-size={window}", f"--max-host-memory={max_memory}", "--map-timeout=5"]


def connect(sock: str) -> CrossDomainGuest:
    g = Session.open(sock, features=CROSS_DOMAIN_FEATURES, shm=True)
    c = CrossDomainGuest(g)
    c.start()
    return c


def expect(resp: bytes, want: int, step: str) -> None:
    if rtype(resp) != want:
        raise RuntimeError(f"{step}: answered {rtype(resp):#x}, expected {want:#x}")


def one_cycle(c: CrossDomainGuest, rid: int, offset: int) -> list[float]:
    """One full life cycle; seconds per step."""
    t = [time.perf_counter()]
    reqs = c.requirements(BLOB_W, BLOB_H)
    t.append(time.perf_counter())
    expect(c.create_blob(rid, reqs), E.RESP_OK_NODATA, STEPS[1])
    t.append(time.perf_counter())
    expect(c.map(rid, offset), E.RESP_OK_MAP_INFO, STEPS[2])
    t.append(time.perf_counter())
    expect(c.sess.cmd(ResourceUnmapBlob(c.h(E.CMD_RESOURCE_UNMAP_BLOB), rid)), E.RESP_OK_NODATA, STEPS[3])
    t.append(time.perf_counter())
    expect(c.sess.cmd(ResourceUnref(c.h(E.CMD_RESOURCE_UNREF, 0), rid)), E.RESP_OK_NODATA, STEPS[4])
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


def measure_cycles(c: CrossDomainGuest, rid: int, offset: int, seconds: float, min_cycles: int = 20) -> CycleStats:
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


WINDOW = 16 << 20
BLOB_BYTES = BLOB_W * BLOB_H * 4


def ours_side(c: CrossDomainGuest, steps: list[list[float]]) -> Callable[[], None]:
    def run() -> None:
        for i, t in enumerate(one_cycle(c, 1, 0)):
            steps[i].append(t)
    return run


def transport_side(sock: str) -> tuple[Session, Callable[[], None]]:
    g = Session.open(sock, features=0)
    g.fe.reserve_shm()
    chains = [b"requirements", b"create blob", f"map 0 {BLOB_BYTES}".encode(), f"unmap 0 {BLOB_BYTES}".encode(),
              b"unref"]

    def run() -> None:
        for req in chains:
            answer = g.fe.submit(0, req, 24)
            if answer.startswith(b"err"):
                raise RuntimeError(f"echo device: {answer!r}")
    return g, run


def syscall_side() -> tuple[ShmWindow, Callable[[], None]]:
    window = ShmWindow(1, WINDOW)
    m = ShmMapping(0, BLOB_BYTES, 0, 1)

    def run() -> None:
        fd = os.memfd_create("vgpu-blob-floor", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, BLOB_BYTES)
            window.map(fd, m)
            window.unmap(m)
        finally:
            os.close(fd)
    return window, run


def main(argv: list[str] | None = None) -> int:
    settings = sd.parse(__doc__ or "", argv, ["blob_lifecycle"], slice_s=0.6)
    cmds = {"ours": [*sd.vgpu_command(profile=sd.profile_path(settings, "blob_lifecycle")),
                     *vgpu_cmd(WINDOW)[4:]],
            "transport": [*sd.ECHO[:3], "--log-level=error", f"--shm-size={WINDOW}"]}
    steps: list[list[float]] = [[] for _ in STEPS]
    with sd.started(cmds) as procs:
        c = connect(procs["ours"][0])
        tg, transport = transport_side(procs["transport"][0])
        window, syscalls = syscall_side()
        try:
            stats = sd.interleave([
                sd.Side("ours", "vgpu blob life cycle (5 commands)", ours_side(c, steps), 1, procs["ours"][1]),
                sd.Side("transport", "transport floor: echo device, SHMEM_MAP/UNMAP", transport, 1,
                        procs["transport"][1]),
                sd.Side("syscalls", "syscall floor: memfd, ftruncate, map, unmap", syscalls, 1),
            ], settings.rounds, settings.slice_s)
        finally:
            c.sess.close()
            tg.close()
            window.close()
    ratios = {"ours / syscall floor": sd.ratio(stats, "ours", "syscalls"),
              "ours / transport floor": sd.ratio(stats, "ours", "transport")}
    sd.print_sides("host-blob life cycle (cross-domain, memfd, 64x64 XR24)", "cycles/s", stats)
    step_us = {name: [x * 1e6 for x in percentiles(samples)] for name, samples in zip(STEPS, steps, strict=True)}
    for name, (p50, p99) in step_us.items():
        print(f"  {name:<26} p50 {p50:>8.1f} us  p99 {p99:>8.1f} us")
    sd.print_ratios(ratios)
    print("QEMU C vhost-user-gpu: no ratio — it has no blobs, no context types and no shared-memory window")
    sd.save(settings, "blob_lifecycle", {
        "title": "host-blob life cycle: requirements, CREATE_BLOB HOST3D, MAP_BLOB, UNMAP_BLOB, UNREF",
        "unit": "cycles/s", "sides": stats, "ratios": ratios, "steps_us": step_us, "qemu": "no blob support"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
