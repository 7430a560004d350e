"""Guest memory behind a resource: the scatter list of ATTACH_BACKING or CREATE_BLOB, validated and gathered.

Entries are checked once, vectorised, when attached (inside guest memory, not over the rings); the translation
to host views is redone whenever the memory table changes, because QEMU may replace it under a live resource.
Gathering copies whole entries with numpy slices — the per-entry loop is the only Python on the path, and when
the span is made of whole pages of one region (the common case: one guest page per entry) it is a single
fancy-index copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..protocol import MemEntries
from ..vhost_user.memory import GuestMemory, GuestMemoryError, MappedRegion

PAGE = 4096


class BackingError(Exception):
    """The scatter list names memory the guest does not own, or a range past its end."""


@dataclass
class _Resolved:
    generation: int
    region: list[MappedRegion]
    offset: npt.NDArray[np.int64]  # offset of each entry inside its region's mapping (skew included)
    region_index: npt.NDArray[np.int64]
    single_region_pages: bool


@dataclass
class Backing:
    addr: npt.NDArray[np.uint64]
    length: npt.NDArray[np.uint32]
    ends: npt.NDArray[np.int64] = field(init=False)  # cumulative end offset of each entry
    _resolved: _Resolved | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.ends = np.cumsum(self.length, dtype=np.int64)

    @classmethod
    def from_entries(cls, entries: MemEntries) -> Backing:
        return cls(np.asarray(entries.addr, dtype=np.uint64), np.asarray(entries.length, dtype=np.uint32))

    @property
    def size(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def validate(self, memory: GuestMemory, forbidden: list[tuple[int, int]]) -> None:
        """Every entry non-empty, inside one region, and clear of `forbidden` guest-physical ranges (rings)."""
        if len(self.addr) == 0:
            return
        if np.any(self.length == 0):
            raise BackingError("zero-length backing entry")
        self._resolve(memory)
        starts = self.addr.astype(np.int64)
        stops = starts + self.length.astype(np.int64)
        for lo, hi in forbidden:
            hit = (starts < hi) & (stops > lo)
            if np.any(hit):
                i = int(np.argmax(hit))
                raise BackingError(f"backing entry {i} at {int(self.addr[i]):#x} overlaps a virtqueue ring")

    def _resolve(self, memory: GuestMemory) -> _Resolved:
        r = self._resolved
        if r is not None and r.generation == memory.generation:
            return r
        regions = sorted(memory.regions, key=lambda m: m.desc.guest_phys_addr)
        if not regions:
            raise BackingError("no guest memory")
        starts = np.array([m.desc.guest_phys_addr for m in regions], dtype=np.uint64)
        sizes = np.array([m.desc.memory_size for m in regions], dtype=np.uint64)
        idx = np.searchsorted(starts, self.addr, side="right").astype(np.int64) - 1
        if np.any(idx < 0):
            raise BackingError("backing entry below guest memory")
        off = self.addr - starts[idx]
        inside = off + self.length.astype(np.uint64) <= sizes[idx]
        if not np.all(inside):
            i = int(np.argmin(inside))
            raise BackingError(f"backing entry {i} at {int(self.addr[i]):#x} +{int(self.length[i]):#x} is not inside "
                               "guest memory")
        skews = np.array([m.skew for m in regions], dtype=np.int64)
        offset = off.astype(np.int64) + skews[idx]
        pages = bool(np.all(idx == idx[0]) and np.all(self.length == PAGE) and np.all(offset % PAGE == 0))
        r = _Resolved(memory.generation, regions, offset, idx, pages)
        self._resolved = r
        return r

    def _checked(self, memory: GuestMemory, start: int, n: int) -> _Resolved:
        if start < 0 or start + n > self.size:
            raise BackingError(f"range [{start}, +{n}) is past the {self.size}-byte backing")
        try:
            return self._resolve(memory)
        except GuestMemoryError as e:
            raise BackingError(str(e)) from e

    def _pieces(self, r: _Resolved, start: int, n: int) -> Iterator[tuple[npt.NDArray[np.uint8], int, int, int]]:
        """(region bytes, offset in them, position in the range, length) for each entry the range touches."""
        i = int(np.searchsorted(self.ends, start, side="right"))
        skip = start - (int(self.ends[i]) - int(self.length[i]))
        pos = 0
        while pos < n:
            take = min(int(self.length[i]) - skip, n - pos)
            yield _bytes(r.region[int(r.region_index[i])]), int(r.offset[i]) + skip, pos, take
            pos += take
            skip = 0
            i += 1

    def gather(self, memory: GuestMemory, start: int, out: npt.NDArray[np.uint8]) -> None:
        """Copy backing bytes [start, start + len(out)) into `out`."""
        n = len(out)
        if n == 0:
            return
        r = self._checked(memory, start, n)
        first = int(np.searchsorted(self.ends, start, side="right"))
        last = int(np.searchsorted(self.ends, start + n - 1, side="right"))
        if r.single_region_pages and last > first:
            entry_start = int(self.ends[first]) - int(self.length[first])
            self._gather_pages(r, first, last, start - entry_start, out)
            return
        for mapping, src, pos, take in self._pieces(r, start, n):
            out[pos:pos + take] = mapping[src:src + take]

    def scatter(self, memory: GuestMemory, start: int, data: bytes) -> None:
        """Write `data` into backing bytes [start, start + len(data)) (answers the device writes for the guest,
        such as a cross-domain query ring)."""
        if not data:
            return
        r = self._checked(memory, start, len(data))
        src = np.frombuffer(data, dtype=np.uint8)
        for mapping, dst, pos, take in self._pieces(r, start, len(data)):
            mapping[dst:dst + take] = src[pos:pos + take]

    def file_ranges(self, memory: GuestMemory, size: int) -> list[tuple[int, int, int]]:
        """(region fd, offset in that file, length) covering the first `size` bytes: what a udmabuf is made of."""
        r = self._checked(memory, 0, size)
        out = []
        pos = i = 0
        while pos < size:
            take = min(int(self.length[i]), size - pos)
            region = r.region[int(r.region_index[i])]
            out.append((region.fd, region.desc.mmap_offset - region.skew + int(r.offset[i]), take))
            pos += take
            i += 1
        return out

    def _gather_pages(self, r: _Resolved, first: int, last: int, skip: int, out: npt.NDArray[np.uint8]) -> None:
        mapping = _bytes(r.region[int(r.region_index[first])])
        pages = mapping[: len(mapping) // PAGE * PAGE].reshape(-1, PAGE)
        page_idx = r.offset[first:last + 1] // PAGE
        n = len(out)
        head = PAGE - skip
        out[:head] = pages[page_idx[0], skip:]
        full = page_idx[1:-1]
        body = len(full) * PAGE
        if body:
            np.take(pages, full, axis=0, out=out[head:head + body].reshape(-1, PAGE))
        tail = n - head - body
        out[head + body:] = pages[page_idx[-1], :tail]


def _bytes(region: MappedRegion) -> npt.NDArray[np.uint8]:
    arr: npt.NDArray[Any] = np.frombuffer(region.mapping, dtype=np.uint8)
    return arr
