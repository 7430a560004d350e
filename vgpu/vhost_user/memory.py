"""Guest memory as the front end shares it: regions mmapped from the fds it sends, with bounds-checked translation.

Two address spaces matter.  Descriptor buffers carry guest-physical addresses; ring addresses in SET_VRING_ADDR are
the front end's own virtual addresses.  Both are translated through the same region list, and a range is valid only
if it lies wholly inside one region: guest RAM regions are not contiguous in either space, so a range that spans two
of them is a guest (or front-end) bug, never something to stitch together.

Regions are replaced while commands may still hold views into them (QEMU can send SET_MEM_TABLE mid-command), so a
removed region is *retired*: it leaves the lookup table at once and its mapping is closed by `collect()` once no view
into it remains.  Contiguous aliases made from the regions (alias.py) are dropped the same way on every change.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import stat
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Final

from .alias import AliasTable

PAGE_SIZE: Final = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_MAP_FIXED: Final = 0x10
# The mmap module names MAP_NORESERVE only from Python 3.13; 0x4000 is its value in the generic Linux ABI (x86, arm,
# riscv, s390, loongarch).  Elsewhere the placeholder below goes without it and is merely charged while it exists.
_GENERIC_ABI: Final = ("x86_64", "i686", "aarch64", "armv7l", "riscv64", "s390x", "loongarch64")
_MAP_NORESERVE: Final[int] = getattr(mmap, "MAP_NORESERVE", 0x4000 if platform.machine() in _GENERIC_ABI else 0)


class GuestMemoryError(Exception):
    """An address range that no region covers, or a region the front end should not have sent."""


def map_shared(fd: int, length: int, offset: int) -> mmap.mmap:
    """``mmap.mmap(fd, length, MAP_SHARED, offset=offset)`` read-write, without a second fd.

    ``mmap.mmap(fd, ...)`` dup()s the fd it maps (CPython before 3.13 cannot be told not to), so a region that
    keeps its fd — it must: udmabuf creation over guest RAM names the memfd — would hold two per region.  So the
    mmap object is made anonymous (no fd) over the right length and the file is mapped over the very same
    addresses with MAP_FIXED: the object still exports buffers, refuses ``close()`` while a view pins it, and its
    ``close()`` unmaps the file's pages.  The placeholder must be writable for the object to export writable
    buffers; it is never touched and asks for no commit charge (MAP_NORESERVE: a guest's RAM may be as large as
    the host's, which the kernel's overcommit heuristic refuses to charge at once), so it costs no memory.
    """
    mm = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE)
    anchor = ctypes.c_char.from_buffer(mm)
    addr = ctypes.addressof(anchor)
    del anchor  # releases the buffer export again: the object must stay closable
    res = _libc.mmap(addr, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED, fd, offset)
    if res != addr:  # with MAP_FIXED that is MAP_FAILED, and the placeholder is still in place
        err = ctypes.get_errno()
        mm.close()
        raise OSError(err, f"mmap of fd {fd} at offset {offset:#x}: {os.strerror(err)}")
    return mm


@dataclass(frozen=True, slots=True)
class RegionDesc:
    """A region as described on the wire (SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(eq=False)
class MappedRegion:
    """One mapped region; owns its fd (the only one it holds: see :func:`map_shared`) and its mapping."""

    desc: RegionDesc
    fd: int
    _map: mmap.mmap | None = field(default=None, repr=False)
    _skew: int = 0

    @classmethod
    def open(cls, desc: RegionDesc, fd: int) -> MappedRegion:
        """Map `fd`; takes ownership of `fd` whether or not the mapping succeeds."""
        try:
            if desc.memory_size <= 0:
                raise GuestMemoryError("zero-sized memory region")
            if desc.memory_size > (1 << 48) or desc.mmap_offset > (1 << 62):
                raise GuestMemoryError("memory region size or offset out of range")
            # mmap offsets must be page aligned; map from the page below and remember the skew.
            skew = desc.mmap_offset % PAGE_SIZE
            base = desc.mmap_offset - skew
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and desc.mmap_offset + desc.memory_size > st.st_size:
                raise GuestMemoryError(
                    f"region [{desc.mmap_offset:#x}, +{desc.memory_size:#x}) is past the end of its file "
                    f"({st.st_size:#x} bytes)"
                )
            try:
                mm = map_shared(fd, desc.memory_size + skew, base)
            except (OSError, ValueError, OverflowError) as e:
                raise GuestMemoryError(f"cannot map region: {e}") from e
            return cls(desc, fd, mm, skew)
        except BaseException:
            os.close(fd)
            raise

    def view(self, offset: int, length: int) -> memoryview:
        assert self._map is not None
        start = self._skew + offset
        return memoryview(self._map)[start:start + length]

    @property
    def mapping(self) -> mmap.mmap:
        assert self._map is not None
        return self._map

    @property
    def skew(self) -> int:
        return self._skew

    def try_close(self) -> bool:
        """Unmap and close the fd; False while some view still pins the mapping."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                return False
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        return True


class _Index:
    """Sorted start addresses for one address space, for O(log n) lookup."""

    def __init__(self, regions: list[MappedRegion], key: str) -> None:
        self.regions = sorted(regions, key=lambda r: getattr(r.desc, key))
        self.starts = [getattr(r.desc, key) for r in self.regions]

    def find(self, addr: int, length: int) -> tuple[MappedRegion, int]:
        i = bisect_right(self.starts, addr) - 1
        if i >= 0:
            r = self.regions[i]
            off = addr - self.starts[i]
            if length >= 0 and off + length <= r.desc.memory_size:
                return r, off
        raise GuestMemoryError(f"range [{addr:#x}, +{length:#x}) is not inside one memory region")


class GuestMemory:
    """The region table of one front-end connection."""

    def __init__(self, max_regions: int) -> None:
        self.max_regions = max_regions
        self._regions: list[MappedRegion] = []
        self._retired: list[MappedRegion] = []
        self._gpa = _Index([], "guest_phys_addr")
        self._uva = _Index([], "userspace_addr")
        self.generation = 0
        # The region the last guest-physical lookup hit, as (start, end, view of its whole mapping): descriptor
        # buffers cluster in one region, so most lookups skip the search and one slice makes the view.
        self._hot: tuple[int, int, memoryview] | None = None
        self.aliases = AliasTable()

    @property
    def regions(self) -> tuple[MappedRegion, ...]:
        return tuple(self._regions)

    def _rebuild(self) -> None:
        self._drop_hot()
        self._gpa = _Index(self._regions, "guest_phys_addr")
        self._uva = _Index(self._regions, "userspace_addr")
        self.generation += 1
        # An alias names files and offsets of the old table: drop them all, users rebuild from the new one.
        self.aliases.invalidate()

    @staticmethod
    def _overlaps(a: RegionDesc, b: RegionDesc) -> bool:
        def clash(s1: int, s2: int) -> bool:
            return s1 < s2 + b.memory_size and s2 < s1 + a.memory_size

        return clash(a.guest_phys_addr, b.guest_phys_addr) or clash(a.userspace_addr, b.userspace_addr)

    def _check_new(self, descs: list[RegionDesc], existing: list[RegionDesc]) -> None:
        for i, d in enumerate(descs):
            if d.memory_size <= 0:
                raise GuestMemoryError("zero-sized memory region")
            for other in existing + descs[:i]:
                if self._overlaps(d, other):
                    raise GuestMemoryError(
                        f"region gpa {d.guest_phys_addr:#x} +{d.memory_size:#x} overlaps gpa "
                        f"{other.guest_phys_addr:#x} +{other.memory_size:#x}"
                    )

    def set_table(self, descs: list[RegionDesc], fds: list[int]) -> None:
        """SET_MEM_TABLE: replace every region.  Takes ownership of `fds`; on error the old table stays."""
        try:
            if len(descs) != len(fds):
                raise GuestMemoryError(f"{len(descs)} regions but {len(fds)} fds")
            if len(descs) > self.max_regions:
                raise GuestMemoryError(f"{len(descs)} regions exceed the limit of {self.max_regions}")
            self._check_new(descs, [])
        except GuestMemoryError:
            for fd in fds:
                os.close(fd)
            raise
        new: list[MappedRegion] = []
        try:
            for i, (d, fd) in enumerate(zip(descs, fds, strict=True)):
                try:
                    new.append(MappedRegion.open(d, fd))
                except GuestMemoryError:
                    for rest in fds[i + 1:]:
                        os.close(rest)
                    raise
        except GuestMemoryError:
            for r in new:
                r.try_close()
            raise
        self._retired.extend(self._regions)
        self._regions = new
        self._rebuild()

    def add(self, desc: RegionDesc, fd: int) -> None:
        """ADD_MEM_REG.  Takes ownership of `fd`."""
        try:
            if len(self._regions) >= self.max_regions:
                raise GuestMemoryError(f"no free memory slot (limit {self.max_regions})")
            self._check_new([desc], [r.desc for r in self._regions])
        except GuestMemoryError:
            os.close(fd)
            raise
        self._regions.append(MappedRegion.open(desc, fd))
        self._rebuild()

    def remove(self, desc: RegionDesc) -> None:
        """REM_MEM_REG: the region is named by guest address, user address and size (mmap_offset is ignored)."""
        for r in self._regions:
            d = r.desc
            if (d.guest_phys_addr, d.userspace_addr, d.memory_size) == (
                desc.guest_phys_addr, desc.userspace_addr, desc.memory_size,
            ):
                self._regions.remove(r)
                self._retired.append(r)
                self._rebuild()
                return
        raise GuestMemoryError(f"no region at gpa {desc.guest_phys_addr:#x} +{desc.memory_size:#x}")

    def clear(self) -> None:
        self._retired.extend(self._regions)
        self._regions = []
        self._rebuild()

    def collect(self) -> int:
        """Close retired regions and dropped aliases nothing points into any more; returns how many are still
        pinned."""
        self._retired = [r for r in self._retired if not r.try_close()]
        return len(self._retired) + self.aliases.collect()

    def close(self) -> None:
        """Drop everything.  Views still alive keep their mapping until they are released and collected."""
        self.clear()
        self.collect()

    # --- translation ------------------------------------------------------------------------------------------

    def gpa(self, addr: int, length: int) -> memoryview:
        """A writable view of guest-physical [addr, addr+length)."""
        hot = self._hot
        if hot is not None and hot[0] <= addr and addr + length <= hot[1] and length >= 0:
            off = addr - hot[0]
            return hot[2][off:off + length]
        r, off = self._gpa.find(addr, length)
        start = r.desc.guest_phys_addr
        self._drop_hot()
        self._hot = (start, start + r.desc.memory_size, r.view(0, r.desc.memory_size))
        return self._hot[2][off:off + length]

    def _drop_hot(self) -> None:
        # Releasing the cached view leaves the slices made from it alive and pinning the mapping, as any view does.
        if self._hot is not None:
            self._hot[2].release()
            self._hot = None

    def uva(self, addr: int, length: int) -> tuple[MappedRegion, int]:
        """Region and offset (relative to the region start) of front-end user address range."""
        return self._uva.find(addr, length)


    def uva_to_gpa(self, addr: int, length: int) -> int:
        r, off = self._uva.find(addr, length)
        return r.desc.guest_phys_addr + off
