"""Guest side of the cache-attribute benchmark: every strategy's answer, what each query costs, and bandwidth.

Why a probe of its own (next to :mod:`vgpu_lab.dmabuf_probe`, which checks *correctness* for the e2e test): the
benchmark needs, on the same real buffers the static ``dmabuf_info`` program made and whose page-table truth it
already printed, the answer of each strategy — the kernel query, our :class:`~vgpu.blob.resolve.Resolver` with the
allocator knowledge vgpu would have had it made the buffer (once on this kernel, once as if the kernel said
ENOTTY like every stock kernel), and the legacy driver-name heuristic — plus the price of each kind of question
(the ioctl, fdinfo, opening a DRM node for DRM_IOCTL_VERSION), which only exists here because the host has no
DRM device and no dma-buf exporter. It also measures read/write bandwidth of write-combined and cached mappings,
to show what TCG can and cannot tell about a wrong answer.

One machine-readable line per fact, ``VGPU-GUEST cm <json>``, ending with ``VGPU-GUEST cm-done ok``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import json
import mmap
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from vgpu.blob import uapi
from vgpu.blob.allocators import (
    BaseAllocator,
    DmaHeapAllocator,
    MemfdAllocator,
    UdmabufAllocator,
    VgemAllocator,
    find_drm_node,
)
from vgpu.blob.dmabuf import KernelAnswer, KernelAnswerKind, drm_version, query_map_attr, read_fdinfo
from vgpu.blob.resolve import Resolver, legacy_heuristic
from vgpu.blob.types import HostBuffer, Unresolved
from vgpu_lab.dmabuf_probe import ENV_FDS, parse_fds

PREFIX = "VGPU-GUEST cm"
PTDUMP = "/sys/kernel/debug/page_tables/current_kernel"
#: The allocator whose documented knowledge vgpu would have for each buffer the C program makes (made the same way:
#: a sealed memfd turned into a udmabuf, a system-heap allocation, a vgem dumb buffer exported with PRIME).
ALLOCATOR_OF: dict[str, type[BaseAllocator]] = {
    "udmabuf": UdmabufAllocator,
    "system-heap": DmaHeapAllocator,
    "vgem": VgemAllocator,
    "memfd": MemfdAllocator,
}
#: The DRM driver behind each PRIME export (the C program found the node by DRM_IOCTL_VERSION name).
DRM_DRIVER_OF = {"vgem": "vgem", "virtio-gpu": "virtio_gpu", "vgem-moving": "vgem", "vgem-incoherent": "vgem"}
#: Our patch's vgem test exporters: they exist only on the patched kernel, so "kernel silent" does not apply.
TEST_EXPORTERS = ("vgem-moving", "vgem-incoherent")
TEST_MOVE = "/sys/module/vgem/parameters/test_move"
ENOTTY_ANSWER = KernelAnswer(KernelAnswerKind.ENOTTY, errno=errno.ENOTTY)
PAT_TABLE = ("WB", "WC", "UC-", "UC", "WB", "WP", "UC-", "WT")
_RANGE = re.compile(r"^0x([0-9a-f]+)-0x([0-9a-f]+)\s")


def emit(kind: str, **fields: object) -> None:
    print(f"{PREFIX} {json.dumps({'kind': kind, **fields}, separators=(',', ':'))}", flush=True)


def _resolve(resolver: Resolver, buffer: HostBuffer) -> tuple[str, str]:
    try:
        r = resolver.resolve(buffer)
    except Unresolved:
        return "refused", "-"
    return r.attr.name, r.provenance.value


def strategies(name: str, fd: int) -> dict[str, object]:
    """Every strategy's answer for one borrowed fd (never closed here: the C program owns it)."""
    exporter = read_fdinfo(fd).exporter
    answer = query_map_attr(fd)
    alloc = ALLOCATOR_OF.get(name)
    drm_driver = DRM_DRIVER_OF.get(name)
    buffer = HostBuffer(
        fd=fd, size=os.fstat(fd).st_size, allocator=alloc.name if alloc else "external", exporter=exporter,
        allocator_attr=alloc.cache_attr if alloc else None, allocator_reason=alloc.cache_reason if alloc else "",
        drm_driver=drm_driver,
    )
    ours, ours_prov = _resolve(Resolver(), buffer)
    opted, opted_prov = _resolve(Resolver(map_changing=True), buffer)
    stock, stock_prov = _resolve(Resolver(kernel_query=lambda _fd: ENOTTY_ANSWER), buffer)
    if name in TEST_EXPORTERS:
        stock, stock_prov = "n/a", "no such exporter on a stock kernel"
    heuristic_name = drm_driver or exporter
    legacy = legacy_heuristic(heuristic_name).name if exporter is not None and heuristic_name else "n/a"
    kernel, said = answer, answer.code
    if name == "vgem-moving":
        # The attribute alone, as an earlier revision's reader takes it, is worst when asked in the cached
        # placement: move there, ask, move back (the C program left the buffer write-combined).
        with open(TEST_MOVE, "w") as f:
            f.write("1")
        kernel = query_map_attr(fd)
        with open(TEST_MOVE, "w") as f:
            f.write("1")
        said = f"{answer.code} now, {kernel.code} after a move"
    return {
        "name": name, "exporter": exporter or "-", "drm_driver": drm_driver or "-",
        "kernel": kernel.attr.name if kernel.attr is not None else kernel.code, "kernel_said": said,
        "ours": ours, "ours_provenance": ours_prov, "ours_opted_in": opted, "ours_opted_in_provenance": opted_prov,
        "ours_stock": stock, "ours_stock_provenance": stock_prov,
        "legacy": legacy, "legacy_name": heuristic_name or "-",
    }


def timed(fn: Callable[[], object], runs: int) -> dict[str, float]:
    """Median and p99 of ``runs`` single calls, in microseconds (each call timed on its own)."""
    fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    samples.sort()
    return {"median_us": statistics.median(samples) / 1e3,
            "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))] / 1e3, "runs": runs}


def raw_ioctl(fd: int) -> Callable[[], object]:
    """The bare DMA_BUF_IOCTL_INFO call, the errno swallowed: what the kernel itself costs from Python."""
    arg = bytearray(16)
    arg[0] = uapi.DMA_BUF_INFO_MAP_ATTR

    def call() -> object:
        try:
            return fcntl.ioctl(fd, uapi.DMA_BUF_IOCTL_INFO, arg, True)
        except OSError as exc:
            return exc.errno

    return call


def raw_fdinfo(fd: int) -> Callable[[], object]:
    path = f"/proc/self/fdinfo/{fd}"

    def call() -> object:
        with open(path, "rb") as f:
            return f.read()

    return call


def drm_name(path: str) -> Callable[[], object]:
    """Open the node, ask DRM_IOCTL_VERSION its driver name (libdrm's two calls, as vgpu does), close it."""

    def call() -> object:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            return drm_version(fd).name
        finally:
            os.close(fd)

    return call


def costs(fds: dict[str, int], runs: int) -> None:
    for name in ("udmabuf", "vgem", "memfd"):
        if name not in fds:
            continue
        fd = fds[name]
        emit("cost", case=f"DMA_BUF_IOCTL_INFO, bare ioctl ({name})", **timed(raw_ioctl(fd), runs))
        emit("cost", case=f"DMA_BUF_IOCTL_INFO, vgpu query_map_attr ({name})",
             **timed(functools.partial(query_map_attr, fd), runs))
    if "vgem" in fds:
        fd = fds["vgem"]
        emit("cost", case="fdinfo, bare read (vgem)", **timed(raw_fdinfo(fd), runs))
        emit("cost", case="fdinfo, vgpu read_fdinfo (vgem)", **timed(functools.partial(read_fdinfo, fd), runs))
    path, seen = find_drm_node("vgem")
    if path is None:
        emit("cost-missing", case="DRM node + DRM_IOCTL_VERSION", reason="; ".join(seen) or "no /dev/dri/card*")
    else:
        emit("cost", case="open DRM node + DRM_IOCTL_VERSION name + close", **timed(drm_name(path), runs))


def pte_type(address: int) -> str:
    """The memory type of our own PTE at ``address`` from the kernel's page-table dump (as dmabuf_info.c does)."""
    try:
        with open(PTDUMP, encoding="ascii", errors="replace") as f:
            for line in f:
                m = _RANGE.match(line)
                if m and int(m.group(1), 16) <= address < int(m.group(2), 16):
                    words = line.split()
                    pat = "PAT" in words and words[-1] == "pte"
                    return PAT_TABLE[(pat << 2) | (("PCD" in words) << 1) | ("PWT" in words)]
    except OSError as exc:
        return f"no ptdump ({exc.strerror})"
    return "not found"


def _through(m: mmap.mmap, seconds: float) -> tuple[str, dict[str, float]]:
    """(PTE type, GB/s of reading and of writing) through one mapping; no view of it outlives the call."""
    import numpy as np  # only here: the other measurements must not pay numpy's import under TCG

    words = np.frombuffer(m, dtype=np.uint64)
    words[:] = 1  # fault every page in before timing and before reading the PTE
    pte = pte_type(ctypes.addressof(ctypes.c_char.from_buffer(m)))
    out = {}
    ops: dict[str, Callable[[], object]] = {"read": words.sum, "write": functools.partial(words.fill, 7)}
    for what, op in ops.items():
        n, t0 = 0, time.perf_counter()
        while True:
            op()
            n += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds and n >= 3:
                break
        out[f"{what}_gbs"] = n * len(m) / elapsed / 1e9
    return pte, out


def bandwidth(size: int, seconds: float) -> None:
    """Read and write bandwidth through an mmap of a WC (vgem) and a cached (udmabuf, memfd) buffer."""
    for cls in (VgemAllocator, UdmabufAllocator, MemfdAllocator):
        state = cls.available()
        if not state:
            emit("bw-missing", allocator=cls.name, reason=state.reason)
            continue
        with cls() as alloc:
            buffer = alloc.allocate(size)
            try:
                with mmap.mmap(buffer.fd, buffer.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
                    pte, out = _through(m, seconds)
                emit("bw", allocator=cls.name, attr=cls.cache_attr.name, pte=pte, size=buffer.size, **out)
            finally:
                buffer.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Options come from the environment (the C program exec()s us): VGPU_CM_RUNS, VGPU_CM_BW_SIZE, VGPU_CM_BW_S."""
    del argv
    try:
        pairs = parse_fds(os.environ.get(ENV_FDS, ""))
    except ValueError as exc:
        print(f"{PREFIX}-done fail {exc}", flush=True)
        return 1
    fds = dict(pairs)
    for name, fd in pairs:
        emit("row", **strategies(name, fd))
    costs(fds, int(os.environ.get("VGPU_CM_RUNS", "2000")))
    bw_size = int(os.environ.get("VGPU_CM_BW_SIZE", str(4 << 20)))
    if bw_size > 0:
        bandwidth(bw_size, float(os.environ.get("VGPU_CM_BW_S", "0.5")))
    print(f"{PREFIX}-done ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
