"""The host-visible memory region (shared-memory id 1): which blob is mapped where.

The VMM owns the region; we decide placement only in the sense of checking what the guest asks for (page
alignment, inside the region, no overlap) before asking the VMM to map the fd with SHMEM_MAP.  QEMU accepts
unaligned offsets and does not stop a guest writing a read-only map, so these checks are ours to make.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterator
from dataclasses import dataclass

PAGE = 4096


@dataclass(frozen=True)
class Mapping:
    resource_id: int
    offset: int
    length: int  # page-rounded


class RegionError(Exception):
    pass


class HostVisibleRegion:
    def __init__(self, size: int) -> None:
        self.size = size
        self._starts: list[int] = []  # sorted offsets of the mappings, for O(log n) neighbour lookup
        self._at: dict[int, Mapping] = {}  # offset -> mapping
        self._by_resource: dict[int, Mapping] = {}

    def __len__(self) -> int:
        return len(self._by_resource)

    def __iter__(self) -> Iterator[Mapping]:
        """The mappings in window order."""
        return iter([self._at[start] for start in self._starts])

    def get(self, resource_id: int) -> Mapping | None:
        return self._by_resource.get(resource_id)

    def check(self, resource_id: int, offset: int, size: int) -> Mapping:
        """The mapping `resource_id` would get at `offset`, or RegionError saying why not."""
        if resource_id in self._by_resource:
            raise RegionError(f"resource {resource_id} is already mapped")
        if offset % PAGE:
            raise RegionError(f"offset {offset:#x} is not page aligned")
        length = (size + PAGE - 1) // PAGE * PAGE
        if length == 0 or offset + length > self.size:
            raise RegionError(f"[{offset:#x}, +{length:#x}) is outside the {self.size:#x}-byte region")
        # Mappings never overlap, so only the nearest one on each side can.
        i = bisect_left(self._starts, offset)
        for start in self._starts[max(0, i - 1):i + 1]:
            m = self._at[start]
            if offset < m.offset + m.length and m.offset < offset + length:
                raise RegionError(f"[{offset:#x}, +{length:#x}) overlaps resource {m.resource_id}")
        return Mapping(resource_id, offset, length)

    def add(self, m: Mapping) -> None:
        self._by_resource[m.resource_id] = m
        self._at[m.offset] = m
        insort(self._starts, m.offset)

    def remove(self, resource_id: int) -> Mapping:
        m = self._by_resource.pop(resource_id)
        del self._at[m.offset]
        del self._starts[bisect_left(self._starts, m.offset)]
        return m

    def clear(self) -> None:
        self._starts.clear()
        self._at.clear()
        self._by_resource.clear()
