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

import os
from bisect import bisect_right

import numpy as np
import numpy.typing as npt

from .alias import AliasTable, Contiguous
from .region import PAGE_SIZE, GuestMemoryError, MappedRegion, RegionDesc, map_shared
from .xen_memory import GrantBudget, open_xen_region, pin_grants

__all__ = ["PAGE_SIZE", "GuestMemory", "GuestMemoryError", "MappedRegion", "RegionDesc", "map_shared"]


def open_region(desc: RegionDesc, fd: int, budget: GrantBudget) -> MappedRegion:
    """Map one region the front end described; takes ownership of `fd` whether or not that succeeds."""
    if desc.xen_mmap_flags:
        return open_xen_region(desc, fd, budget)
    return MappedRegion.open(desc, fd)


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

    def __init__(self, max_regions: int, grant_budget: GrantBudget | None = None) -> None:
        self.max_regions = max_regions
        #: Grant pages mapped because the guest asked (on-demand views and held backings), against their cap.
        self.grant_budget = grant_budget or GrantBudget()
        #: With XEN_MMAP the ring addresses are guest-physical: a Xen front end has no mapping of its own to name
        #: (the user address of a Xen region means nothing to the back end).
        self.rings_by_gpa = False
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
                    new.append(open_region(d, fd, self.grant_budget))
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
        self._regions.append(open_region(desc, fd, self.grant_budget))
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

    @property
    def has_garbage(self) -> bool:
        """Whether collect() has anything to look at (the loop asks after every kick)."""
        return bool(self._retired) or self.aliases.has_garbage

    def collect(self) -> int:
        """Close retired regions and dropped aliases nothing points into any more; returns how many are still
        pinned."""
        self._retired = [r for r in self._retired if not r.try_close()]
        live = sum(r.collect() for r in self._regions)
        return len(self._retired) + live + self.aliases.collect()

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
        if r.on_demand:
            return r.view(off, length)  # its own mapping, released (and unmapped by collect) with the view
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

    def ring(self, addr: int, length: int) -> tuple[MappedRegion, int]:
        """Region and offset of a ring address from SET_VRING_ADDR (see `rings_by_gpa`)."""
        return (self._gpa if self.rings_by_gpa else self._uva).find(addr, length)

    def pin(self, addr: npt.NDArray[np.uint64], length: npt.NDArray[np.uint32]) -> Contiguous | None:
        """A held, contiguous mapping of a scatter list that lies in on-demand (grant) regions — map-and-hold for
        a resource's backing — or None when its regions are mapped whole anyway.  Raises GuestMemoryError when
        the list mixes kinds, is not page-shaped, or would pass the grant cap."""
        if len(addr) == 0:
            return None
        found = [self._gpa.find(int(a), int(n)) for a, n in zip(addr.tolist(), length.tolist(), strict=True)]
        kinds = {r.on_demand for r, _ in found}
        if kinds == {False}:
            return None
        if len(kinds) > 1:
            raise GuestMemoryError("a backing mixes memory mapped on demand with memory mapped whole")
        return pin_grants([(r, off, int(n)) for (r, off), n in zip(found, length.tolist(), strict=True)],
                          self.grant_budget)

    def uva_to_gpa(self, addr: int, length: int) -> int:
        r, off = self._uva.find(addr, length)
        return r.desc.guest_phys_addr + off
