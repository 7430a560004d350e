"""Contiguous aliases of guest memory: scattered guest pages mapped a second time, back to back, in one range.

Why: a resource's backing is usually one 4 KiB guest page per entry, scattered over a region.  Copying it page by
page pays a page-table walk and a prefetcher restart per page (numpy.take reaches about 0.6 of memcpy speed on
768 scattered pages); once the same pages are mapped in order into one address range, a transfer is one
contiguous copy at memcpy speed.  Every region is a file (a memfd) whose fd we already hold, so each run of
consecutive file pages is mapped again with MAP_FIXED|MAP_SHARED over a PROT_NONE reservation (through libc:
Python's mmap has no MAP_FIXED).  MAP_SHARED maps the very pages the guest uses, so writes through an alias
reach the guest.

What keeps it safe:

* The reservation is a Python mmap object.  Closing (or freeing) it unmaps the whole range, every run in it, and it
  refuses to close while a view exported from it is alive: no view can outlive the mapping.
* A mapping holds its own reference to its file, independent of the region's fd and mapping.  The table drops
  every alias whenever the memory table changes; only a view taken before the change can pin one, and it then
  keeps reading (and the alias keeps alive) the pages that file held — stale guest bytes, never unmapped memory.
  The one fault left is the one every region mapping already has: a front end that shrinks its own memfd.
* Each run is one VMA, and once a process holds vm.max_map_count of them the kernel refuses every mmap — ours,
  and also the next region or dma-buf mapping.  Guests choose how scattered their memory is, so the table caps
  the VMAs aliases may hold in total (`default_budget`) and refuses beyond it; callers then copy page by page.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref
from collections.abc import Sequence
from typing import Final, Protocol

import numpy as np

PAGE: Final = mmap.PAGESIZE
#: The kernel's default vm.max_map_count (DEFAULT_MAX_MAP_COUNT), when /proc does not say.
DEFAULT_MAX_MAP_COUNT: Final = 65530

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_MAP_FIXED: Final = 0x10
_MAP_FAILED: Final = ctypes.c_void_p(-1).value


class Contiguous(Protocol):
    """A backing's bytes mapped back to back in one range: an :class:`Alias` of file pages, or a held mapping of
    Xen grants (vgpu/vhost_user/xen_memory.py)."""

    size: int

    @property
    def is_open(self) -> bool: ...

    def view(self) -> memoryview: ...

    def write(self, pos: int, data: bytes) -> None: ...

    def release(self) -> None: ...


class AliasRefused(Exception):
    """This alias cannot or may not be built; the caller copies through the region mappings instead."""


def default_budget() -> int:
    """VMAs all aliases of one connection may hold: a quarter of vm.max_map_count.

    The rest of the process needs the other three quarters: Python and its libraries hold a few hundred VMAs,
    each guest region one, each mapped host blob or dma-buf one or more — and a refused mmap there fails a
    command or the connection, where a refused alias only costs speed.  One back-end process serves one front end
    at a time, so a per-connection budget is a per-process one."""
    try:
        with open("/proc/sys/vm/max_map_count", encoding="ascii") as f:
            limit = int(f.read())
    except (OSError, ValueError):
        limit = DEFAULT_MAX_MAP_COUNT
    return max(0, limit // 4)


class Alias:
    """One contiguous alias: `size` bytes at `address`, made of runs of guest files."""

    def __init__(self, table: AliasTable, reservation: mmap.mmap, skew: int, size: int, vmas: int) -> None:
        self._table = table
        self._map: mmap.mmap | None = reservation
        self._skew = skew
        self.size = size
        self.vmas = vmas
        self.address = _address(reservation) + skew
        # Gives the VMAs back to the budget exactly once: at close, or when the reservation is freed unclosed.
        self._give_back = weakref.finalize(reservation, table._give_back, vmas)

    @property
    def is_open(self) -> bool:
        return self._map is not None

    def view(self) -> memoryview:
        """Read-only bytes [0, size).  While the view (or anything made from it) lives, the alias stays mapped."""
        if self._map is None:
            raise ValueError("alias is closed")
        return memoryview(self._map)[self._skew:self._skew + self.size]

    def write(self, pos: int, data: bytes) -> None:
        """Store `data` at alias byte `pos`: into the guest's own pages (MAP_SHARED)."""
        if self._map is None:
            raise ValueError("alias is closed")
        if pos < 0 or pos + len(data) > self.size:
            raise ValueError(f"write of {len(data)} bytes at {pos} passes the {self.size}-byte alias")
        # The reservation's buffer is read-only to Python (it was mapped PROT_NONE), so write through its address;
        # the mapping cannot go away meanwhile: only this thread closes it.
        ctypes.memmove(self.address + pos, data, len(data))

    def release(self) -> None:
        """Drop the alias now; if a view still pins it, it is unmapped by the table's next collect()."""
        self._table._release(self)

    def try_close(self) -> bool:
        """Unmap the whole range; False while a view still pins it."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                return False
            self._map = None
            self._give_back()
        return True


class AliasTable:
    """The aliases made from one connection's guest memory: the VMA budget they share, and dropping them all
    when the memory table changes (their runs name files and offsets of the old table)."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = default_budget() if budget is None else budget
        self.vmas = 0  # held by aliases that are still mapped
        self._live: weakref.WeakSet[Alias] = weakref.WeakSet()
        self._retired: list[Alias] = []

    def build(self, runs: Sequence[tuple[int, int, int]]) -> Alias:
        """Map `runs` — (fd, file offset, length), in order — back to back into one new range.

        The first run may start inside a page (the alias then starts at that byte); every later run must start on
        a page boundary both in its file and in the alias, because mmap places whole pages."""
        if not runs:
            raise AliasRefused("nothing to alias")
        if self.vmas + len(runs) > self.budget:
            raise AliasRefused(f"{len(runs)} more mappings would pass the budget of {self.budget} "
                               f"({self.vmas} in use)")
        placed: list[tuple[int, int, int]] = []  # (alias offset, file offset, fd), page aligned
        pos = runs[0][1] % PAGE
        for i, (fd, offset, length) in enumerate(runs):
            if fd < 0:
                raise AliasRefused(f"run {i} has no file to map")
            if length <= 0 or offset < 0:
                raise AliasRefused(f"run {i} is empty or before its file")
            head = pos % PAGE
            if i and (head or offset % PAGE):
                raise AliasRefused(f"run {i} (file offset {offset:#x}, alias offset {pos:#x}) is not page aligned")
            placed.append((pos - head, offset - head, fd))
            pos += length
        total = -(-pos // PAGE) * PAGE
        # PROT_NONE: until every run is in place, and if one fails, nothing here is readable.
        reservation = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE, prot=0)
        try:
            base = _address(reservation)
            for i, (at, offset, fd) in enumerate(placed):
                end = placed[i + 1][0] if i + 1 < len(placed) else total
                got = _libc.mmap(base + at, end - at, mmap.PROT_READ | mmap.PROT_WRITE,
                                 mmap.MAP_SHARED | _MAP_FIXED, fd, offset)
                if got == _MAP_FAILED or got != base + at:
                    err = ctypes.get_errno()
                    raise AliasRefused(f"mapping run {i} failed: {os.strerror(err)}")
        except BaseException:
            reservation.close()  # unmaps the runs already placed too
            raise
        alias = Alias(self, reservation, runs[0][1] % PAGE, pos - runs[0][1] % PAGE, len(runs))
        self.vmas += len(runs)
        self._live.add(alias)
        return alias

    def invalidate(self) -> None:
        """Drop every alias (the memory table changed)."""
        for alias in list(self._live):
            self._release(alias)

    @property
    def has_garbage(self) -> bool:
        return bool(self._retired)

    def collect(self) -> int:
        """Unmap dropped aliases no view pins any more; returns how many are still pinned."""
        self._retired = [a for a in self._retired if not a.try_close()]
        return len(self._retired)

    def _release(self, alias: Alias) -> None:
        self._live.discard(alias)
        if not alias.try_close() and alias not in self._retired:
            self._retired.append(alias)

    def _give_back(self, vmas: int) -> None:
        self.vmas -= vmas


def _address(m: mmap.mmap) -> int:
    """Start address of a mapping (ctypes.from_buffer wants a writable buffer; numpy reads any)."""
    addr: int = np.frombuffer(m, dtype=np.uint8).ctypes.data
    return addr
