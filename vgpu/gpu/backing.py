"""Guest memory behind a resource: the scatter list of ATTACH_BACKING or CREATE_BLOB, validated, planned, copied.

Entries are checked once, vectorised, when attached (inside guest memory, not over the rings).  The copy plan —
each entry's place in its region, entries that follow each other in the same file merged into runs, and the page
rows of the common one-region, whole-page layout — is worked out once per memory table and reused by every
transfer; QEMU may replace the table under a live resource, so a new generation means a new plan.

Bytes move one of two ways:

* through a contiguous *alias* (vgpu/vhost_user/alias.py): the backing's runs mapped again, back to back, so a
  transfer is one memcpy and a sub-rectangle one strided 2D numpy copy, at the speed of copying contiguous memory;
* otherwise through the region mappings: one slice per run when a range touches few runs, else one numpy.take
  over page rows (0.35-0.6 of memcpy speed on scattered 4 KiB pages, as measured by benchmarks/transfer_copy.py).

An alias costs 10-40 us per run to build (mmap, which splits the reservation, plus the first touch of each page;
measured under load on a 2-core VM) and saves 50-600 ns per page copied afterwards, so a backing gets one only
once it has paid about that much in slower copies (the ski-rental rule: never more than twice the cost of knowing
the future).  A resource attached, transferred once and freed never pays for one; a framebuffer sent every frame
gets one within a few seconds.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeAlias

import numpy as np

from ..protocol import MemEntries
from ..vhost_user.alias import AliasRefused, Contiguous
from ..vhost_user.memory import GuestMemory, GuestMemoryError, MappedRegion

if TYPE_CHECKING:
    import numpy.typing as npt

PAGE: Final = 4096
_U64_MAX: Final = (1 << 64) - 1
#: A one-region table ending at or below this cannot hold an entry (of at most 2**32 - 1 bytes) that wraps.
_NO_WRAP: Final = (1 << 64) - (1 << 32)
#: Runs touched through the region mappings, per run of the backing, before an alias is built: about where an
#: alias run's cost (10-40 us) meets what it saves per copy (50-600 ns, see above).
ALIAS_AFTER_PIECES_PER_RUN: Final = 128
#: Up to this many runs a slice each beats numpy.take's set-up.
_FEW_RUNS: Final = 4
#: Rows of a partial-width copy staged at a time through the region mappings: small enough to stay in cache.
_STAGE_BYTES: Final = 1 << 20

log = logging.getLogger("vgpu.gpu.backing")

I64: TypeAlias = "npt.NDArray[np.int64]"
U8: TypeAlias = "npt.NDArray[np.uint8]"


class BackingError(Exception):
    """The scatter list names memory the guest does not own, or a range past its end."""


class Forbidden:
    """Guest-physical ranges no backing may touch (the rings), merged into disjoint sorted ranges once, so that an
    attach asks one sorted search rather than comparing every entry with every range."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        merged: list[list[int]] = []
        for lo, hi in sorted(r for r in ranges if r[0] < r[1]):
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.ranges = [(lo, hi) for lo, hi in merged]
        self._lo = np.array([r[0] for r in merged], dtype=np.uint64)
        self._hi = np.array([r[1] for r in merged], dtype=np.uint64)

    def first_overlap(self, addr: npt.NDArray[np.uint64], length: npt.NDArray[np.uint32],
                      span: tuple[int, int]) -> int | None:
        """The first entry [addr, addr + length) that overlaps a range, or None.  The entries lie inside guest
        memory (checked first), so addr + length does not wrap; `span` is [lowest start, highest end) of them all,
        and a list whose span misses every range (the rings are a few pages) needs no look at its entries."""
        lo, hi = span
        if not any(a < hi and lo < b for a, b in self.ranges):
            return None
        # The only range an entry can overlap first is the first one ending after the entry's start (the ranges
        # are disjoint and sorted); it overlaps if it also starts before the entry's end.
        i = np.searchsorted(self._hi, addr, side="right")
        inside = i < len(self._hi)
        hit = inside & (self._lo[np.minimum(i, len(self._hi) - 1)] < addr + length)
        return int(np.argmax(hit)) if hit.any() else None


@dataclass(frozen=True)
class _Table:
    """One generation of the memory table as arrays (regions by guest-physical address), built once per table
    rather than once per attach: the attach path is a few dozen numpy calls and each costs about a microsecond."""

    generation: int
    regions: list[MappedRegion]
    starts: npt.NDArray[np.uint64]
    sizes: npt.NDArray[np.uint64]
    ends: npt.NDArray[np.uint64]
    skews: I64
    files: bool  # every region is a file an alias can map again
    on_demand: bool  # some region is never mapped whole (Xen grants mapped on demand)


_TABLES: weakref.WeakKeyDictionary[GuestMemory, _Table] = weakref.WeakKeyDictionary()


def _table(memory: GuestMemory) -> _Table:
    t = _TABLES.get(memory)
    if t is not None and t.generation == memory.generation:
        return t
    regions = sorted(memory.regions, key=lambda m: m.desc.guest_phys_addr)
    t = _Table(memory.generation, regions,
               np.array([m.desc.guest_phys_addr for m in regions], dtype=np.uint64),
               np.array([m.desc.memory_size for m in regions], dtype=np.uint64),
               # (A region reaching the very top of the address space ends at the last address: an entry ending
               # exactly there then wraps and is refused, which costs nothing real.)
               np.array([min(m.desc.guest_phys_addr + m.desc.memory_size, _U64_MAX) for m in regions],
                        dtype=np.uint64),
               np.array([m.skew for m in regions], dtype=np.int64), all(m.file_backed for m in regions),
               any(m.on_demand for m in regions))
    _TABLES[memory] = t
    return t


@dataclass
class _Plan:
    """How to reach every byte of the backing under one memory table."""

    memory: GuestMemory
    generation: int
    region: list[MappedRegion]
    offset: I64  # offset of each entry inside its region's mapping (skew included)
    region_index: I64
    run_ends: I64  # cumulative end offset of each run (entries contiguous in one file, merged)
    run_len: I64
    run_region: I64
    run_offset: I64  # offset of each run inside its region's mapping
    page_rows: I64 | None  # page row, in the one region's mapping, of each backing page; None unless that layout
    single_pages: bool  # page_rows is one page per entry, no two of them merged (the common guest layout)
    aliasable: bool  # runs can be mapped back to back (page aligned, every region a file)
    on_demand: bool  # in regions that are never mapped whole (Xen grants): reachable only through a held mapping

    @property
    def runs(self) -> int:
        return len(self.run_len)

    def file_runs(self) -> list[tuple[int, int, int]]:
        """(fd, file offset, length) of every run: what an alias is made of."""
        out = []
        for reg, off, n in zip(self.run_region.tolist(), self.run_offset.tolist(), self.run_len.tolist(),
                               strict=True):
            region = self.region[reg]
            out.append((region.fd, region.desc.mmap_offset - region.skew + off, n))
        return out


@dataclass
class Backing:
    addr: npt.NDArray[np.uint64]
    length: npt.NDArray[np.uint32]
    ends: I64 = field(init=False)  # cumulative end offset of each entry
    #: See ALIAS_AFTER_PIECES_PER_RUN; a test or benchmark may set it (0: alias at the first copy).
    alias_after: int = field(default=ALIAS_AFTER_PIECES_PER_RUN, init=False)
    _plan: _Plan | None = field(default=None, init=False, repr=False)
    #: A contiguous mapping of the backing: an alias of file pages (made once copies have paid for it), or, in
    #: Xen grant regions mapped on demand, the backing's grants mapped when it was attached and held until closed.
    _alias: Contiguous | None = field(default=None, init=False, repr=False)
    _moved: int = field(default=0, init=False, repr=False)  # runs copied the slow way since the last alias attempt

    _span: tuple[int, int] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.ends = self.length.cumsum(dtype=np.int64)

    @property
    def span(self) -> tuple[int, int]:
        """The guest-physical span [lo, hi) of all entries: a cheap first test of whether removed memory touches
        it.  Worked out when first asked (memory removal, a debug log line), not for every attach."""
        if self._span is None:
            self._span = (int(self.addr.min()), int((self.addr + self.length.astype(np.uint64)).max())) \
                if len(self.addr) else (0, 0)
        return self._span

    @classmethod
    def from_entries(cls, entries: MemEntries) -> Backing:
        return cls(np.asarray(entries.addr, dtype=np.uint64), np.asarray(entries.length, dtype=np.uint32))

    @property
    def size(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    @property
    def has_alias(self) -> bool:
        return self._alias is not None and self._alias.is_open

    def close(self) -> None:
        """Unmap the alias now (the resource is losing this backing).  Dropping the last reference does the same,
        later; the backing stays usable either way."""
        self._drop_alias()

    def describe(self) -> str:
        """For the log: where in guest memory this backing lies (memory hot-plug is checked against these)."""
        lo, hi = self.span
        return f"{len(self.addr)} entries, {self.size} bytes, gpa [{lo:#x}, {hi:#x})"

    def touches(self, start: int, size: int) -> bool:
        """Whether any entry overlaps guest-physical [start, start + size)."""
        first, last = self.span
        if last <= start or start + size <= first:
            return False
        # Unsigned throughout (guest addresses may use all 64 bits): an entry ends after `start` if it begins at or
        # after it, or begins less than its length before it.
        a, n, lo = self.addr, self.length.astype(np.uint64), np.uint64(start)
        ends_after = (a >= lo) | ((lo - a) < n)
        return bool(np.any((a < np.uint64(min(start + size, (1 << 64) - 1))) & ends_after))

    def resolves(self, memory: GuestMemory) -> bool:
        """Whether every entry lies in the current memory table (the plan is kept for the next copy)."""
        try:
            self._resolve(memory)
        except BackingError:
            return False
        return True

    def validate(self, memory: GuestMemory, forbidden: Forbidden) -> None:
        """Every entry non-empty, inside one region, and clear of the `forbidden` guest-physical ranges (rings)."""
        if len(self.addr) == 0:
            return
        if self.length.min() == 0:
            raise BackingError("zero-length backing entry")
        self._ready(memory)
        i = forbidden.first_overlap(self.addr, self.length, self.span)
        if i is not None:
            raise BackingError(f"backing entry {i} at {int(self.addr[i]):#x} overlaps a virtqueue ring")

    # --- copies -----------------------------------------------------------------------------------------------

    def gather(self, memory: GuestMemory, start: int, out: U8) -> None:
        """Copy backing bytes [start, start + len(out)) into `out` (one-dimensional)."""
        n = len(out)
        if n == 0:
            return
        p = self._checked(memory, start, n)
        src = self._alias_bytes()
        if src is not None:
            np.copyto(out, src[start:start + n])
            return
        self._gather(memory, p, start, out)

    def _gather(self, memory: GuestMemory, p: _Plan, start: int, out: U8) -> None:
        """`gather` through the region mappings, the range checked and `out` not empty."""
        n = len(out)
        if p.single_pages and not (start | n) % PAGE and n >= _FEW_RUNS * PAGE:
            # The scattered guest pages of a whole-page range (a whole-resource transfer): nothing to search for,
            # as many runs touched as pages.
            self._take_pages(p, start, out)
            self._meter(memory, p, n // PAGE)
            return
        first, last = self._runs_touched(p, start, n)
        if p.page_rows is not None and last - first >= _FEW_RUNS:
            self._take_pages(p, start, out)
        else:
            for mapping, src_off, pos, take in self._pieces(p, first, start, n):
                out[pos:pos + take] = mapping[src_off:src_off + take]
        self._meter(memory, p, last - first + 1)

    def gather_rows(self, memory: GuestMemory, start: int, src_stride: int, row_bytes: int, out2d: U8) -> None:
        """Copy `len(out2d)` rows of `row_bytes` bytes, `src_stride` apart from backing byte `start` on, into the
        (rows, row_bytes) array `out2d` — which may itself be a strided window, such as a rectangle of an image."""
        rows = self._check_rows(start, src_stride, row_bytes, out2d.shape[0])
        if out2d.shape != (rows, row_bytes):
            raise ValueError(f"destination is {out2d.shape}, not ({rows}, {row_bytes})")
        if rows == 0 or row_bytes == 0:
            return
        p = self._checked(memory, start, (rows - 1) * src_stride + row_bytes)
        src = self._alias_bytes()
        if src is not None:
            np.copyto(out2d, _rows(src, start, src_stride, row_bytes, rows))
            return
        if src_stride == row_bytes and out2d.flags.c_contiguous:
            self._gather(memory, p, start, out2d.reshape(-1))
            return
        # Through the region mappings: a few rows at a time via a small staging buffer that stays in cache.
        step = max(1, _STAGE_BYTES // src_stride)
        stage = np.empty(min(rows, step) * src_stride, dtype=np.uint8)
        for y in range(0, rows, step):
            k = min(step, rows - y)
            part = stage[:(k - 1) * src_stride + row_bytes]
            self.gather(memory, start + y * src_stride, part)
            out2d[y:y + k] = _rows(part, 0, src_stride, row_bytes, k)

    def read(self, memory: GuestMemory, start: int, n: int) -> U8:
        """Backing bytes [start, start + n), read-only: a view of the alias when there is one (no copy), else a
        fresh copy.  Hold it no longer than the command: a view keeps the alias mapped."""
        self._checked(memory, start, n)
        src = self._alias_bytes()
        if src is not None:
            return src[start:start + n]
        out = np.empty(n, dtype=np.uint8)
        self.gather(memory, start, out)
        out.flags.writeable = False
        return out

    def read_rows(self, memory: GuestMemory, start: int, src_stride: int, row_bytes: int, rows: int) -> U8:
        """(rows, row_bytes) read-only: a strided view of the alias when there is one, else a fresh copy."""
        self._check_rows(start, src_stride, row_bytes, rows)
        if rows and row_bytes:
            self._checked(memory, start, (rows - 1) * src_stride + row_bytes)
            src = self._alias_bytes()
            if src is not None:
                return _rows(src, start, src_stride, row_bytes, rows)
        out = np.empty((rows, row_bytes), dtype=np.uint8)
        self.gather_rows(memory, start, src_stride, row_bytes, out)
        out.flags.writeable = False
        return out

    def scatter(self, memory: GuestMemory, start: int, data: bytes) -> None:
        """Write `data` into backing bytes [start, start + len(data)) (answers the device writes for the guest,
        such as a cross-domain query ring, and TRANSFER_FROM_HOST_3D)."""
        if not data:
            return
        n = len(data)
        p = self._checked(memory, start, n)
        if self._alias is not None and self._alias.is_open:
            self._alias.write(start, data)
            return
        src = np.frombuffer(data, dtype=np.uint8)
        first, last = self._runs_touched(p, start, n)
        for mapping, dst, pos, take in self._pieces(p, first, start, n):
            mapping[dst:dst + take] = src[pos:pos + take]
        self._meter(memory, p, last - first + 1)

    def file_ranges(self, memory: GuestMemory, size: int) -> list[tuple[int, int, int]]:
        """(region fd, offset in that file, length) covering the first `size` bytes: what a udmabuf is made of."""
        r = self._checked(memory, 0, size)
        if not all(region.file_backed for region in r.region):
            raise BackingError("guest memory mapped through Xen (grants, foreign frames) is no file to wrap")
        out = []
        pos = i = 0
        while pos < size:
            take = min(int(self.length[i]), size - pos)
            region = r.region[int(r.region_index[i])]
            out.append((region.fd, region.desc.mmap_offset - region.skew + int(r.offset[i]), take))
            pos += take
            i += 1
        return out

    # --- planning ---------------------------------------------------------------------------------------------

    def _resolve(self, memory: GuestMemory) -> _Plan:
        p = self._plan
        if p is not None and p.memory is memory and p.generation == memory.generation:
            return p
        self._drop_alias()
        t = _table(memory)
        if not t.regions:
            raise BackingError("no guest memory")
        addr, length = self.addr, self.length.astype(np.uint64)
        stop = addr + length
        if len(t.regions) == 1 and int(t.ends[0]) <= _NO_WRAP:
            # One region [start, end) that no entry can wrap past: three reductions decide every entry at once
            # (an entry starting at or past `end` is outside, so none that passes can wrap either), and they give
            # the span the ring check and the hot-plug check want.
            start, end = int(t.starts[0]), int(t.ends[0])
            lo, top, hi = int(addr.min()), int(addr.max()), int(stop.max())
            if lo < start or top >= end or hi > end:
                _refuse(addr, length, (addr < t.starts[0]) | (stop > t.ends[0]) | (addr >= t.ends[0]))
            self._span = (lo, hi)
            off = (addr - t.starts[0]).view(np.int64)
            skew = int(t.skews[0])
            p = _plan(memory, t, off + skew if skew else off, _zeros(len(addr)), self.length.astype(np.int64),
                      self.ends, addr[1:] == stop[:-1])
        else:
            # The last region starting at or below each entry; an entry below all of them gets index -1, whose
            # region starts above it, so its offset wraps and fails the check below like any other outsider.
            idx = np.searchsorted(t.starts, addr, side="right").astype(np.int64) - 1
            off = addr - t.starts[idx]
            room = t.sizes[idx]
            # In unsigned arithmetic that cannot wrap: the entry fits if length <= room and off <= room - length.
            outside = (length > room) | (off > room - np.minimum(length, room))
            if outside.any():
                _refuse(addr, length, outside)
            offset, length64 = off.astype(np.int64) + t.skews[idx], self.length.astype(np.int64)
            follows = (offset[1:] == offset[:-1] + length64[:-1]) & (idx[1:] == idx[:-1])
            p = _plan(memory, t, offset, idx, length64, self.ends, follows)
        self._plan = p
        return p

    def _checked(self, memory: GuestMemory, start: int, n: int) -> _Plan:
        if start < 0 or n < 0 or start + n > self.size:
            raise BackingError(f"range [{start}, +{n}) is past the {self.size}-byte backing")
        return self._ready(memory)

    def _ready(self, memory: GuestMemory) -> _Plan:
        """The plan, and for memory mapped on demand the held mapping of every page (map and hold: made at
        attach, again only after the memory table changed)."""
        try:
            p = self._resolve(memory)
            if p.on_demand and not self.has_alias:
                self._alias = memory.pin(self.addr, self.length)
            return p
        except GuestMemoryError as e:
            raise BackingError(str(e)) from e

    def _check_rows(self, start: int, src_stride: int, row_bytes: int, rows: int) -> int:
        if rows < 0 or row_bytes < 0 or src_stride < row_bytes or start < 0:
            raise BackingError(f"{rows} rows of {row_bytes} bytes, {src_stride} apart, at {start}")
        return rows

    # --- the alias --------------------------------------------------------------------------------------------

    def _alias_bytes(self) -> U8 | None:
        a = self._alias
        if a is None or not a.is_open:
            return None
        arr: npt.NDArray[Any] = np.frombuffer(a.view(), dtype=np.uint8)
        return arr

    def _meter(self, memory: GuestMemory, p: _Plan, runs: int) -> None:
        """Count runs copied the slow way; once they have cost about what an alias costs, build one."""
        if not p.aliasable or p.runs < 2:
            return  # one run is already one contiguous copy
        self._moved += runs
        if self._moved < self.alias_after * p.runs:
            return
        self._moved = 0  # a refusal (the budget is spent) is retried only after as much copying again
        try:
            self._alias = memory.aliases.build(p.file_runs())
        except AliasRefused as e:
            log.debug("no alias for a %d-run backing: %s", p.runs, e)

    def _drop_alias(self) -> None:
        if self._alias is not None:
            self._alias.release()
            self._alias = None
        self._moved = 0

    # --- through the region mappings ----------------------------------------------------------------------------

    @staticmethod
    def _runs_touched(p: _Plan, start: int, n: int) -> tuple[int, int]:
        first = int(np.searchsorted(p.run_ends, start, side="right"))
        last = int(np.searchsorted(p.run_ends, start + n - 1, side="right"))
        return first, last

    @staticmethod
    def _pieces(p: _Plan, i: int, start: int, n: int) -> list[tuple[U8, int, int, int]]:
        """(region bytes, offset in them, position in the range, length) for each run the range touches."""
        out = []
        skip = start - (int(p.run_ends[i]) - int(p.run_len[i]))
        pos = 0
        while pos < n:
            take = min(int(p.run_len[i]) - skip, n - pos)
            out.append((_bytes(p.region[int(p.run_region[i])]), int(p.run_offset[i]) + skip, pos, take))
            pos += take
            skip = 0
            i += 1
        return out

    @staticmethod
    def _take_pages(p: _Plan, start: int, out: U8) -> None:
        assert p.page_rows is not None
        pages = _pages(p)
        n = len(out)
        if not (start | n) % PAGE:
            # Whole pages (a whole-resource transfer): one take, no partial first and last page.
            np.take(pages, p.page_rows[start // PAGE:(start + n) // PAGE], axis=0, out=out.reshape(-1, PAGE),
                    mode="clip")
            return
        rows = p.page_rows[start // PAGE:(start + n - 1) // PAGE + 1]
        skip = start % PAGE
        head = PAGE - skip
        out[:head] = pages[rows[0], skip:]
        body = (len(rows) - 2) * PAGE
        # mode="clip": the rows were checked when planned, and "raise" would copy through a buffer (half speed).
        np.take(pages, rows[1:-1], axis=0, out=out[head:head + body].reshape(-1, PAGE), mode="clip")
        out[head + body:] = pages[rows[-1], :n - head - body]


def _plan(memory: GuestMemory, t: _Table, offset: I64, idx: I64, length: I64, ends: I64,
          follows: npt.NDArray[np.bool_]) -> _Plan:
    """Entries that continue each other in one file (`follows[i]`: entry i + 1 starts where entry i ends, in the
    same region) merged into runs, and the page rows if any.  The common guest scatter list — whole pages, none
    adjacent — has as many runs as entries, so the entries' own arrays serve as the runs' and nothing is gathered."""
    separate = not follows.any()
    if separate:
        run_len, run_ends, run_region, run_offset = length, ends, idx, offset
    else:
        first = np.flatnonzero(np.concatenate(([True], ~follows)))
        run_len = np.add.reduceat(length, first)
        run_ends = np.cumsum(run_len)
        run_region, run_offset = idx[first], offset[first]
    whole_pages = not (int(np.bitwise_or.reduce(run_offset)) | int(np.bitwise_or.reduce(run_len))) & (PAGE - 1)
    one_region = len(t.regions) == 1
    page_rows = None
    single_pages = False
    if whole_pages and (one_region or not run_region.any()):
        n = len(length)
        if separate and int(ends[-1]) == n * PAGE and int(length.max()) == PAGE:
            page_rows = run_offset // PAGE  # one page per run (none longer, so none shorter): the row is the run's
            single_pages = True
        else:
            per_run = run_len // PAGE
            page_rows = np.repeat(run_offset // PAGE - (run_ends - run_len) // PAGE, per_run) + np.arange(
                int(per_run.sum()), dtype=np.int64)
    # An alias places whole pages: after the first run, every run starts on a page of its file and of the alias.
    if whole_pages:
        aliasable = t.files
    else:
        head = int(run_offset[0]) % PAGE
        aliasable = bool(((run_offset[1:] % PAGE == 0) & ((head + run_ends[:-1]) % PAGE == 0)).all()) and t.files
    on_demand = t.on_demand and any(t.regions[i].on_demand for i in np.unique(run_region).tolist())
    return _Plan(memory, memory.generation, t.regions, offset, idx, run_ends, run_len, run_region, run_offset,
                 page_rows, single_pages, aliasable, on_demand)


_ZEROS: I64 = np.zeros(0, dtype=np.int64)


def _zeros(n: int) -> I64:
    """n zeros (every entry's region index in a one-region table), sliced from one read-only array."""
    global _ZEROS
    if len(_ZEROS) < n:
        _ZEROS = np.zeros(max(n, 1024), dtype=np.int64)
        _ZEROS.setflags(write=False)
    return _ZEROS[:n]


def _refuse(addr: npt.NDArray[np.uint64], length: npt.NDArray[np.uint64], outside: npt.NDArray[np.bool_]) -> NoReturn:
    i = int(np.argmax(outside))
    raise BackingError(f"backing entry {i} at {int(addr[i]):#x} +{int(length[i]):#x} is not inside guest memory")


def _rows(src: U8, start: int, stride: int, row_bytes: int, rows: int) -> U8:
    """Read-only (rows, row_bytes) window of `src`; the callers checked that it lies inside."""
    window = src[start:start + (rows - 1) * stride + row_bytes]
    out: npt.NDArray[Any] = np.lib.stride_tricks.as_strided(window, shape=(rows, row_bytes), strides=(stride, 1),
                                                           writeable=False)
    return out


def _pages(p: _Plan) -> U8:
    """The mapping of the plan's one region as rows of a page (what page_rows index)."""
    mapping = _bytes(p.region[int(p.run_region[0])])
    return mapping[: len(mapping) // PAGE * PAGE].reshape(-1, PAGE)


def _bytes(region: MappedRegion) -> U8:
    arr: npt.NDArray[Any] = np.frombuffer(region.mapping, dtype=np.uint8)
    return arr
