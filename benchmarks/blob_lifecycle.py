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
from vgpu.protocol import (
    CTRL_HDR_SIZE,
    BlobMem,
    CtrlType,
    MemEntries,
    ResourceCreateBlob,
    ResourceMapBlob,
    ResourceUnmapBlob,
    ResourceUnref,
    SubmitCmd,
    encode_command,
)
from vgpu.protocol.cross_domain import CrossDomainGetImageRequirements, CrossDomainImageRequirements
from vgpu.session import (
    CROSS_DOMAIN_FEATURES,
    MAP_INFO_RESP_SIZE,
    MAPPABLE,
    XR24,
    CrossDomainGuest,
    Session,
    rtype,
)
from vgpu.vhost_user.layout import flatten
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


class Cycle:
    """The five commands of one life cycle on resource `rid` at window `offset`, encoded once: the front end is the
    harness and must cost no more than it has to (construct's build and parse of the cross-domain messages cost
    about as much as the back end's whole MAP_BLOB).  Only CREATE_BLOB changes per cycle (its blob_id)."""

    def __init__(self, c: CrossDomainGuest, rid: int, offset: int) -> None:
        self.c, self.rid = c, rid
        body = CrossDomainGetImageRequirements.build(dict(hdr=dict(cmd=2, ring_idx=0, cmd_size=24), width=BLOB_W,
                                                          height=BLOB_H, drm_format=XR24, flags=0x11))
        self.requirements = encode_command(SubmitCmd(c.h(E.CMD_SUBMIT_3D), bytes(body)))
        self.map = encode_command(ResourceMapBlob(c.h(E.CMD_RESOURCE_MAP_BLOB), rid, offset))
        self.unmap = encode_command(ResourceUnmapBlob(c.h(E.CMD_RESOURCE_UNMAP_BLOB), rid))
        self.unref = encode_command(ResourceUnref(c.h(E.CMD_RESOURCE_UNREF, 0), rid))

    def create_blob(self) -> bytes:
        """CREATE_BLOB of the buffer the last requirements answer named (its size and blob_id, from the query
        ring, read with the struct codec derived from the layout)."""
        c = self.c
        v = _REQUIREMENTS.st.unpack(c.sess.ram.read(c.ring, _REQUIREMENTS.size))
        return encode_command(ResourceCreateBlob(c.h(E.CMD_RESOURCE_CREATE_BLOB), self.rid, BlobMem.BLOB_MEM_HOST3D,
                                                 MAPPABLE, v[_REQ_BLOB_ID], v[_REQ_SIZE], _NO_ENTRIES))


_REQUIREMENTS = flatten(CrossDomainImageRequirements)
_REQ_SIZE, _REQ_BLOB_ID = _REQUIREMENTS.index("size"), _REQUIREMENTS.index("blob_id")
_NO_ENTRIES = MemEntries.of([])


def one_cycle(c: CrossDomainGuest | Cycle, rid: int, offset: int) -> list[float]:
    """One full life cycle; seconds per step."""
    cy = c if isinstance(c, Cycle) else Cycle(c, rid, offset)
    submit = cy.c.sess.fe.submit
    t = [time.perf_counter()]
    expect(submit(0, cy.requirements, CTRL_HDR_SIZE), E.RESP_OK_NODATA, STEPS[0])
    t.append(time.perf_counter())
    expect(submit(0, cy.create_blob(), CTRL_HDR_SIZE), E.RESP_OK_NODATA, STEPS[1])
    t.append(time.perf_counter())
    expect(submit(0, cy.map, MAP_INFO_RESP_SIZE), E.RESP_OK_MAP_INFO, STEPS[2])
    t.append(time.perf_counter())
    expect(submit(0, cy.unmap, CTRL_HDR_SIZE), E.RESP_OK_NODATA, STEPS[3])
    t.append(time.perf_counter())
    expect(submit(0, cy.unref, CTRL_HDR_SIZE), E.RESP_OK_NODATA, STEPS[4])
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


def measure_cycles(guest: CrossDomainGuest, rid: int, offset: int, seconds: float, min_cycles: int = 20
                   ) -> CycleStats:
    c = Cycle(guest, rid, offset)
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


def ours_side(guest: CrossDomainGuest, steps: list[list[float]]) -> Callable[[], None]:
    c = Cycle(guest, 1, 0)

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
