"""Guest RAM for a front end that plays the Xen VMM's part inside one domain: the domain describes its own memory.

No second domain runs on the machines this project is tested on, so the domain that runs the back end also plays
the guest: it grants pages to itself with gntalloc and describes them to the back end with XEN_MMAP, in one of two
ways — as grants (GRANT, domid 0: the back end maps them with gntdev, whole or on demand) or as its own machine
frames (FOREIGN, DOMID_SELF: the back end maps them with privcmd).  The back end's code paths are the ones a real
guest's memory would take; only the domain on the other side is the same.

Guest addresses, as Xen's grant DMA and a foreign mapping read them: a grant page's address is bit 63 plus its
grant reference times 4096; a foreign page's is its machine frame times 4096.  Neither is one linear range, so
regions are the runs of consecutive references (or frames), and an allocation never straddles two runs.  A PV
domain's page frame numbers (/proc/self/pagemap) are not machine frames; the machine frame of a granted page is
read from the domain's own grant table (each v1 entry holds it), mapped through privcmd.
"""

from __future__ import annotations

import mmap
import os
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from .layout import dtype_of
from .region import PAGE_SIZE, address_of, map_shared
from .wire import XEN_MMAP_FLAG_FOREIGN, XEN_MMAP_FLAG_GRANT, XEN_MMAP_FLAG_MAP_ON_DEMAND
from .xen_memory import GRANT_ADDR_BIT
from .xen_uapi import (
    DEV_GNTALLOC,
    DEV_GNTDEV,
    DEV_PRIVCMD,
    DOMID_SELF,
    GTF_permit_access,
    GTF_type_mask,
    alloc_grefs,
    dealloc_grefs,
    grant_entry_v1,
    grant_table_frames,
    mmapbatch_v2,
)

Mode = Literal["grant", "grant-on-demand", "foreign"]
_ENTRY: Final = dtype_of(grant_entry_v1)
#: The domain id of the domain a PV dom0 is: the grants it makes to itself name it.
DOM0: Final = 0


class XenSelfRam:
    """`pages` pages this domain grants to itself, shared with a back end as grants or as foreign frames."""

    def __init__(self, pages: int, mode: Mode = "grant") -> None:
        self.mode = mode
        self.size = pages * PAGE_SIZE
        self._fds: list[int] = []
        self._table: mmap.mmap | None = None
        self._gntalloc = self._open(DEV_GNTALLOC)
        self._index, self.grefs = alloc_grefs(self._gntalloc, DOM0, pages)
        try:
            self.map = mmap.mmap(self._gntalloc, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                 offset=self._index)
            self._privcmd = self._open(DEV_PRIVCMD)
            if mode == "foreign":
                frames = [int(e["frame"]) for e in self.grant_entries()]
                self.region_fd, self.domid, self._prefix = self._privcmd, DOMID_SELF, 0
                self.flags = XEN_MMAP_FLAG_FOREIGN
            else:
                frames = list(self.grefs)
                self.region_fd, self.domid, self._prefix = self._open(DEV_GNTDEV), DOM0, GRANT_ADDR_BIT
                self.flags = XEN_MMAP_FLAG_GRANT | (XEN_MMAP_FLAG_MAP_ON_DEMAND if mode == "grant-on-demand" else 0)
        except BaseException:
            self.close()
            raise
        self.frames = frames
        self._page_of = {f: i for i, f in enumerate(frames)}
        # Page i starts a new run when its frame does not follow page i-1's: allocations stay inside one run.
        self._breaks = {i for i in range(1, pages) if frames[i] != frames[i - 1] + 1}
        self._free: list[tuple[int, int]] = [(0, self.size)]

    def _open(self, path: str) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._fds.append(fd)
        return fd

    # --- addresses ----------------------------------------------------------------------------------------------

    def gpa_of(self, offset: int) -> int:
        page, within = divmod(offset, PAGE_SIZE)
        return self._prefix | self.frames[page] * PAGE_SIZE + within

    def offset(self, gpa: int, length: int) -> int:
        frame, within = divmod(gpa & ~self._prefix if self._prefix else gpa, PAGE_SIZE)
        page = self._page_of.get(frame)
        if page is None or length < 0:
            raise ValueError(f"gpa {gpa:#x} is not in this domain's shared RAM")
        off = page * PAGE_SIZE + within
        if off + length > self.size or self._crosses(off, length):
            raise ValueError(f"gpa {gpa:#x} +{length:#x} leaves its run of shared RAM")
        return off

    def _crosses(self, off: int, length: int) -> bool:
        first, last = off // PAGE_SIZE, (off + max(length, 1) - 1) // PAGE_SIZE
        return any(p in self._breaks for p in range(first + 1, last + 1))

    def uva_of(self, gpa: int) -> int:
        """Our regions say userspace_addr = guest address: a Xen VMM has no mapping of its own to name."""
        return gpa

    def regions(self, split: int = 1) -> list[tuple[dict[str, int], int]]:
        """One region per run of consecutive frames (`split` is for a memfd RAM: the runs decide here)."""
        out = []
        starts = [0, *sorted(self._breaks)]
        for i, first in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else self.size // PAGE_SIZE
            gpa = self.gpa_of(first * PAGE_SIZE)
            out.append((dict(guest_phys_addr=gpa, memory_size=(end - first) * PAGE_SIZE, userspace_addr=gpa,
                             mmap_offset=0, xen_mmap_flags=self.flags, domid=self.domid), self.region_fd))
        return out

    # --- allocation (within runs) ---------------------------------------------------------------------------------

    def alloc(self, size: int, align: int = 64) -> int:
        size = max(-(-size // 16) * 16, 16)
        for i, (start, length) in enumerate(self._free):
            a = -(-start // align) * align
            while a + size <= start + length:
                if not self._crosses(a, size):
                    pieces = [(start, a - start), (a + size, start + length - a - size)]
                    self._free[i:i + 1] = [(s, n) for s, n in pieces if n > 0]
                    return self.gpa_of(a)
                a = -(-((a // PAGE_SIZE + 1) * PAGE_SIZE) // align) * align  # try from the next page on
        raise MemoryError(f"shared RAM exhausted allocating {size} bytes in one run")

    def free(self, gpa: int, size: int) -> None:
        size = max(-(-size // 16) * 16, 16)
        self._free.append((self.offset(gpa, size), size))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for s, n in self._free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((s, n))
        self._free = merged

    def write(self, gpa: int, data: bytes) -> None:
        off = self.offset(gpa, len(data))
        self.map[off:off + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        off = self.offset(gpa, length)
        return self.map[off:off + length]

    # --- what Xen says -------------------------------------------------------------------------------------------

    def grant_entries(self) -> npt.NDArray[np.void]:
        """Our pages' v1 grant entries (flags, domid, frame), read from this domain's grant table: the machine
        frame of each page, and — GTF_reading / GTF_writing — whether anyone has the grant mapped right now."""
        frames = grant_table_frames(self._privcmd)
        per_frame = PAGE_SIZE // _ENTRY.itemsize
        if self._table is None or len(self._table) != len(frames) * PAGE_SIZE:
            if self._table is not None:
                self._table.close()
            self._table = map_shared(self._privcmd, len(frames) * PAGE_SIZE, 0)
            errors = mmapbatch_v2(self._privcmd, DOMID_SELF, address_of(self._table), frames)
            if any(errors):
                raise OSError(f"mapping our grant table: errors {errors}")
        entries = np.frombuffer(self._table, dtype=_ENTRY, count=len(frames) * per_frame)[self.grefs].copy()
        bad = [g for g, e in zip(self.grefs, entries, strict=True)
               if int(e["flags"]) & GTF_type_mask != GTF_permit_access or int(e["domid"]) != DOM0]
        if bad:
            raise OSError(f"grant entries {bad[:4]} are not v1 grants to domain {DOM0}")
        return entries

    def close(self) -> None:
        if self._table is not None:
            self._table.close()
            self._table = None
        if getattr(self, "map", None) is not None:
            try:
                self.map.close()
            except BufferError:
                return  # a driver queue still looks at it: nothing may be freed under it
        if getattr(self, "grefs", None):
            dealloc_grefs(self._gntalloc, self._index, len(self.grefs))
            self.grefs = []
        for fd in self._fds:
            os.close(fd)
        self._fds = []
