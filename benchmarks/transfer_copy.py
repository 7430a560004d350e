"""Gathering scattered guest pages against the copy floor, side by side in one process.

For a 1024x768 and a 1920x1080 BGRA image backed by scattered 4 KiB pages of a 256 MiB memfd (768 and 2025 pages),
the median of each way to move the same bytes into one contiguous image:

* floor: one contiguous copy of as many bytes, from the same memfd;
* a Python per-page slice loop, numpy.take over page rows (default mode, as the gather used to call it);
* ours: `Backing.gather` cold (a fresh backing: plan plus first copy), warm through the region mappings, and warm
  through its contiguous alias; the alias's one-time cost (build plus first touch) and how many slow copies pay
  for it; and a 2D sub-rectangle through `gather_rows` against a strided copy of contiguous memory.

This measures the copy primitive alone; the whole command against QEMU's C back end, through one front end, is
`benchmarks.transfers`.  The copies are timed in turns, each after the caches were flushed (see `round_robin`).
Ratios, never timed assertions.
Writes benchmarks/results/transfer_copy.json (not with --quick)."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from benchmarks.common import write_result
from vgpu.gpu.backing import ALIAS_AFTER_PIECES_PER_RUN, Backing
from vgpu.vhost_user.memory import GuestMemory, RegionDesc

PAGE = 4096
RAM = 256 << 20
GPA = 1 << 32
U8 = npt.NDArray[np.uint8]
EVICT = 64 << 20  # twice the last-level cache of the machine these numbers were first taken on


def round_robin(ways: dict[str, Callable[[], object]], reps: int, cold: bool) -> dict[str, float]:
    """Median seconds of each way, taken in turns (one run of each per round) so that a neighbour's load falls on
    all of them alike.  Each timed run follows either an untimed run of the same way (hot: the bytes sit in the
    cache, as when a frame is sent again at once) or a flush of the caches by writing EVICT bytes (cold).  Either
    way every way meets the cache as the others do: several read the same guest pages."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    scratch = np.empty(EVICT, dtype=np.uint8)
    for i in range(reps):
        for name, fn in ways.items():
            if cold:
                scratch.fill(i & 0xFF)
            else:
                fn()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def case(memory: GuestMemory, ram: U8, width: int, height: int, reps: int, seed: int) -> dict[str, float]:
    """GB/s of every way (see the module doc), and the alias's one-time cost, for one image size."""
    nbytes = width * height * 4
    npages = -(-nbytes // PAGE)
    rng = np.random.default_rng(seed)
    pages = rng.choice(RAM // PAGE, npages, replace=False)  # distinct pages in random order: nothing merges
    addr = pages.astype(np.uint64) * PAGE + GPA
    length = np.full(npages, PAGE, dtype=np.uint32)
    out = np.empty(npages * PAGE, dtype=np.uint8)[:nbytes]
    full = np.empty((npages, PAGE), dtype=np.uint8)
    rows = ram[: RAM // PAGE * PAGE].reshape(-1, PAGE)
    lo = int(rng.integers(0, RAM - nbytes) // PAGE * PAGE)

    # The alias's one-time cost: built at a copy once alias_after allows (0 here), first touched by the next.
    builds, touches = [], []
    for _ in range(max(3, reps // 10)):
        b = Backing(addr, length)
        b.gather(memory, 0, out)  # plan, and fault in the region pages as any earlier copy would have
        b.alias_after = 0
        t0 = time.perf_counter()
        b.gather(memory, 0, out)
        t1 = time.perf_counter()
        b.gather(memory, 0, out)
        t2 = time.perf_counter()
        assert b.has_alias
        builds.append(t1 - t0)
        touches.append(t2 - t1)
        b.close()

    def slice_loop() -> None:
        for i, p in enumerate(pages.tolist()):
            n = min(PAGE, nbytes - i * PAGE)
            out[i * PAGE:i * PAGE + n] = ram[p * PAGE:p * PAGE + n]

    def cold() -> None:
        Backing(addr, length).gather(memory, 0, out)

    slow = Backing(addr, length)
    slow.alias_after = 1 << 40  # never: the steady state through the region mappings
    warm = Backing(addr, length)
    warm.alias_after = 0
    warm.gather(memory, 0, out)
    assert warm.has_alias
    # A sub-rectangle (half the width and height, from the middle) into a strided window of an image.
    image = np.empty((height, width * 4), dtype=np.uint8)
    stride, row, h = width * 4, width * 2, height // 2
    window = image[height // 4:height // 4 + h, width:width + row]
    start = (height // 4) * stride + width
    contiguous = ram[lo:lo + h * stride].reshape(h, stride)[:, :row]
    ways: dict[str, Callable[[], object]] = {
        "floor: one contiguous copy": lambda: np.copyto(out, ram[lo:lo + nbytes]),
        "Python per-page slice loop": slice_loop,
        "numpy.take over page rows": lambda: np.take(rows, pages, axis=0, out=full),
        "ours cold (fresh backing: plan + copy)": cold,
        "ours warm, region mappings": lambda: slow.gather(memory, 0, out),
        "ours warm, alias": lambda: warm.gather(memory, 0, out),
        "2D rect floor: strided copy": lambda: np.copyto(window, contiguous),
        "ours 2D rect, alias (gather_rows)": lambda: warm.gather_rows(memory, start, stride, row, window),
    }
    seconds = round_robin(ways, reps, cold=False)
    cold_seconds = round_robin(ways, max(3, reps // 2), cold=True)
    warm.gather(memory, 0, out)
    assert np.array_equal(out, np.take(rows, pages, axis=0).reshape(-1)[:nbytes]), "gathered bytes differ"
    slow.close()
    warm.close()
    gbs = {name: (h * row if "2D" in name else nbytes) / s / 1e9 for name, s in seconds.items()}
    gbs.update({f"{name} [cold]": (h * row if "2D" in name else nbytes) / s / 1e9 for name, s in cold_seconds.items()})
    gbs["alias build ms"] = statistics.median(builds) * 1e3
    gbs["alias first touch ms"] = statistics.median(touches) * 1e3
    # Full-image copies through the region mappings before the default policy builds the alias.
    gbs["copies before the alias"] = float(ALIAS_AFTER_PIECES_PER_RUN)
    return gbs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--reps", type=int, default=50, help="runs per median")
    p.add_argument("--quick", action="store_true", help="few runs, write nothing")
    args = p.parse_args(argv)
    reps = 5 if args.quick else args.reps
    fd = os.memfd_create("vgpu-transfer-copy", os.MFD_CLOEXEC)
    memory = GuestMemory(1)
    try:
        os.ftruncate(fd, RAM)
        memory.set_table([RegionDesc(GPA, RAM, 0x7F0000000000, 0)], [os.dup(fd)])
        ram = np.frombuffer(memory.regions[0].mapping, dtype=np.uint8)
        ram[:] = np.random.default_rng(1).integers(0, 256, RAM, dtype=np.uint8)
        results = {f"{w}x{h}": case(memory, ram, w, h, reps, seed) for seed, (w, h) in
                   enumerate(((1024, 768), (1920, 1080)))}
        del ram
    finally:
        memory.close()
        os.close(fd)
    ratios: dict[str, float] = {}
    for size, gbs in results.items():
        floor = gbs["floor: one contiguous copy"]
        print(f"{size} BGRA from {-(-int(np.prod([int(x) for x in size.split('x')])) * 4 // PAGE)} scattered pages")
        print(f"  {'':<42} {'hot: after a run of itself':>32} | {'cold: after a cache flush':>31}")
        for name, v in gbs.items():
            if name.endswith(" ms"):
                print(f"  {name:<42} {v:8.2f} ms")
            elif name.startswith("copies"):
                print(f"  {name:<42} {v:8.0f}")
            elif not name.endswith("[cold]"):
                base_name = "2D rect floor: strided copy" if "2D" in name else "floor: one contiguous copy"
                base, cold, cold_base = gbs[base_name], gbs[f"{name} [cold]"], gbs[f"{base_name} [cold]"]
                print(f"  {name:<42} {v:8.2f} GB/s {v / base:5.2f} x floor | cold {cold:6.2f} GB/s "
                      f"{cold / cold_base:5.2f} x floor")
        ratios[f"{size} ours warm alias / floor"] = gbs["ours warm, alias"] / floor
        ratios[f"{size} ours warm alias / floor, cold caches"] = (gbs["ours warm, alias [cold]"]
                                                                  / gbs["floor: one contiguous copy [cold]"])
        ratios[f"{size} ours warm region mappings / floor"] = gbs["ours warm, region mappings"] / floor
        ratios[f"{size} ours 2D rect / strided floor"] = (gbs["ours 2D rect, alias (gather_rows)"]
                                                          / gbs["2D rect floor: strided copy"])
    for k, v in ratios.items():
        print(f"ratio  {k:<48} {v:.2f}")
    if not args.quick:
        print(f"wrote {write_result('transfer_copy', {'gbs': results, 'ratios': ratios})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
