"""Guest memory under Xen (VHOST_USER_PROTOCOL_F_XEN_MMAP): regions of foreign frames and regions of grants.

Under Xen the VMM does not own the guest's RAM, so it cannot hand the back end a memfd.  With XEN_MMAP each region
description carries flags and a domain id, and the fd sent with it is a Xen driver the back end maps through:

* FOREIGN (bit 0): the region's frames — guest frame ``guest_phys_addr / 4096`` onwards, of domain ``domid`` — are
  mapped with privcmd (an mmap of the fd, then ``IOCTL_PRIVCMD_MMAPBATCH_V2``), the whole region up front.
* GRANT (bit 1): the region's guest addresses name grant references (bit 63 set, the reference in the frame bits:
  Xen's grant DMA addresses), mapped with gntdev (``IOCTL_GNTDEV_MAP_GRANT_REF``, then an mmap of the offset it
  returns) — the whole region up front, or, with MAP_ON_DEMAND (bit 8, "the region can not be mapped in advance"),
  only what is needed when it is needed.

On demand does not mean per access (the XenGT lesson: look-ups per access cost more than the work).  A ring is
mapped once when the ring is set up and held until it is torn down; a descriptor's buffer while its command runs; a
resource's backing — the memory a guest names by far most often — once when attached (:func:`pin_grants`, one
contiguous mapping of all its pages) and held until the resource is detached or unreferenced.  Whatever a guest
causes to be mapped counts against a cap (:class:`GrantBudget`) and is refused beyond it.  Every mapping is undone
when its view goes (``collect``), its resource goes, or the front end goes: a grant left mapped is memory its
domain can never take back (CVE-2021-26934).

How rust-vmm's vm-memory reads the same spec (src/mmap/xen.rs) was the guide: no mmap offset for Xen regions,
foreign regions always mapped in advance, one flag of the two.  vm-memory names the on-demand flag 0x8, the spec
(docs/interop/vhost-user.rst) bit 8; we follow the spec.
"""

from __future__ import annotations

import mmap
import os
import stat
from dataclasses import dataclass, field
from typing import Final

from .region import PAGE_SIZE, GuestMemoryError, MappedRegion, RegionDesc, address_of, map_shared
from .wire import XEN_MMAP_FLAG_FOREIGN, XEN_MMAP_FLAG_GRANT, XEN_MMAP_FLAG_MAP_ON_DEMAND
from .xen_uapi import DEV_GNTDEV, DEV_PRIVCMD, PAGE_SHIFT, map_grant_refs, mmapbatch_v2, unmap_grant_refs

#: Guest addresses of grant regions: bit 63 set, the grant reference in the page frame bits.
GRANT_ADDR_BIT: Final = 1 << 63
_KNOWN_FLAGS: Final = XEN_MMAP_FLAG_FOREIGN | XEN_MMAP_FLAG_GRANT | XEN_MMAP_FLAG_MAP_ON_DEMAND
#: Grant pages a guest may have mapped at once through on-demand regions (views and held backings): 64 MiB.
DEFAULT_MAX_GRANT_PAGES: Final = 16384


@dataclass(frozen=True)
class MemoryPolicy:
    """What the back end lets front ends do with guest memory beyond shared files: offer XEN_MMAP (only where the
    Xen drivers exist: a front end that negotiated it elsewhere could map nothing), and the grant cap."""

    xen_mmap: bool = False
    max_grant_pages: int = DEFAULT_MAX_GRANT_PAGES


#: Plain files only: what a back end offers unless told otherwise.
FILES_ONLY: Final = MemoryPolicy()


def xen_present() -> bool:
    """This kernel runs on Xen with the drivers XEN_MMAP needs (the device nodes exist)."""
    return os.path.exists(DEV_PRIVCMD) or os.path.exists(DEV_GNTDEV)


@dataclass
class GrantBudget:
    """Grant pages mapped on a guest's behalf, against a cap: a guest names the memory, so a guest could otherwise
    make the back end map (and the domain keep) as much as it likes."""

    limit: int = DEFAULT_MAX_GRANT_PAGES
    used: int = 0

    def take(self, pages: int) -> None:
        if self.used + pages > self.limit:
            raise GuestMemoryError(f"mapping {pages} more grant pages would pass the cap of {self.limit} "
                                   f"({self.used} mapped)")
        self.used += pages

    def give(self, pages: int) -> None:
        self.used -= pages


def check_region(desc: RegionDesc, fd: int) -> None:
    """Refuse a Xen region description that cannot be mapped as the spec says, before any ioctl."""
    flags = desc.xen_mmap_flags
    if flags & ~_KNOWN_FLAGS:
        raise GuestMemoryError(f"Xen region: unknown xen_mmap_flags bits {flags & ~_KNOWN_FLAGS:#x}")
    kind = flags & (XEN_MMAP_FLAG_FOREIGN | XEN_MMAP_FLAG_GRANT)
    if kind not in (XEN_MMAP_FLAG_FOREIGN, XEN_MMAP_FLAG_GRANT):
        raise GuestMemoryError(f"Xen region: flags {flags:#x} must name exactly one of FOREIGN and GRANT")
    if kind == XEN_MMAP_FLAG_FOREIGN and flags & XEN_MMAP_FLAG_MAP_ON_DEMAND:
        raise GuestMemoryError("Xen region: foreign memory is mapped in advance; MAP_ON_DEMAND is for grants")
    if desc.mmap_offset:
        raise GuestMemoryError(f"Xen region: mmap_offset {desc.mmap_offset:#x} (a Xen mapping has no file offset)")
    if desc.memory_size <= 0 or desc.memory_size % PAGE_SIZE or desc.guest_phys_addr % PAGE_SIZE:
        raise GuestMemoryError(f"Xen region at {desc.guest_phys_addr:#x} +{desc.memory_size:#x} is not whole pages")
    if desc.domid > 0xFFFF:
        raise GuestMemoryError(f"Xen region: domid {desc.domid:#x} is not a 16-bit domain id")
    pages = desc.memory_size // PAGE_SIZE
    if kind == XEN_MMAP_FLAG_GRANT:
        if not desc.guest_phys_addr & GRANT_ADDR_BIT:
            raise GuestMemoryError(f"Xen grant region at {desc.guest_phys_addr:#x}: bit 63 (a grant address) unset")
        if ((desc.guest_phys_addr & ~GRANT_ADDR_BIT) >> PAGE_SHIFT) + pages > 1 << 32:
            raise GuestMemoryError("Xen grant region: grant references past 32 bits")
    elif desc.guest_phys_addr + desc.memory_size > 1 << 52:
        raise GuestMemoryError("Xen foreign region: frame numbers past the 52-bit physical address space")
    if not stat.S_ISCHR(os.fstat(fd).st_mode):
        raise GuestMemoryError("Xen region: the fd is not a Xen device (privcmd or gntdev)")


def open_xen_region(desc: RegionDesc, fd: int, budget: GrantBudget) -> MappedRegion:
    """Map one Xen region (see the module's description); takes ownership of `fd` whether or not that succeeds."""
    try:
        check_region(desc, fd)
        if desc.xen_mmap_flags & XEN_MMAP_FLAG_FOREIGN:
            return XenForeignRegion.map(desc, fd)
        if desc.xen_mmap_flags & XEN_MMAP_FLAG_MAP_ON_DEMAND:
            return XenOnDemandRegion(desc, fd, budget=budget)
        return XenGrantRegion.map(desc, fd)
    except OSError as e:
        os.close(fd)
        raise GuestMemoryError(f"Xen region at {desc.guest_phys_addr:#x} +{desc.memory_size:#x}: {e}") from e
    except BaseException:
        os.close(fd)
        raise


def _first_refs(desc: RegionDesc) -> int:
    return (desc.guest_phys_addr & ~GRANT_ADDR_BIT) >> PAGE_SHIFT


@dataclass(eq=False)
class XenForeignRegion(MappedRegion):
    """A region of another domain's frames, mapped whole through privcmd."""

    @classmethod
    def map(cls, desc: RegionDesc, fd: int) -> XenForeignRegion:
        pages = desc.memory_size // PAGE_SIZE
        mm = map_shared(fd, desc.memory_size, 0)  # a privcmd VMA; its pages come from the ioctl below
        try:
            errors = mmapbatch_v2(fd, desc.domid, address_of(mm), range(desc.guest_phys_addr >> PAGE_SHIFT,
                                                                         (desc.guest_phys_addr >> PAGE_SHIFT) + pages))
            bad = [(i, e) for i, e in enumerate(errors) if e]
            if bad:
                i, e = bad[0]
                raise GuestMemoryError(f"Xen foreign region: {len(bad)} of {pages} frames of domain {desc.domid} "
                                       f"not mapped (frame {(desc.guest_phys_addr >> PAGE_SHIFT) + i:#x}: "
                                       f"{os.strerror(-e)})")
        except BaseException:
            mm.close()
            raise
        return cls(desc, fd, mm, 0)

    @property
    def file_backed(self) -> bool:
        return False


@dataclass(eq=False)
class XenGrantRegion(MappedRegion):
    """A region of grants, mapped whole through gntdev; unmapping releases the grants too."""

    index: int = 0

    @classmethod
    def map(cls, desc: RegionDesc, fd: int) -> XenGrantRegion:
        pages = desc.memory_size // PAGE_SIZE
        index = map_grant_refs(fd, desc.domid, range(_first_refs(desc), _first_refs(desc) + pages))
        try:
            mm = map_shared(fd, desc.memory_size, index)
        except BaseException:
            unmap_grant_refs(fd, index, pages)
            raise
        return cls(desc, fd, mm, 0, index=index)

    @property
    def file_backed(self) -> bool:
        return False

    def try_close(self) -> bool:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                return False
            self._map = None
            unmap_grant_refs(self.fd, self.index, self.desc.memory_size // PAGE_SIZE)
        return super().try_close()


class _GrantMap:
    """One IOCTL_GNTDEV_MAP_GRANT_REF of some grants and the mmap of them, charged to the budget while it exists.
    ``held`` while a backing holds it: then only its release may unmap it."""

    def __init__(self, fd: int, domid: int, refs: list[int], budget: GrantBudget) -> None:
        self.fd, self.count, self.budget = fd, len(refs), budget
        budget.take(self.count)
        try:
            self.index = map_grant_refs(fd, domid, refs)
            try:
                self.mm: mmap.mmap | None = map_shared(fd, self.count * PAGE_SIZE, self.index)
            except BaseException:
                unmap_grant_refs(fd, self.index, self.count)
                raise
        except OSError as e:
            budget.give(self.count)
            raise GuestMemoryError(f"mapping {self.count} grants of domain {domid}: {e}") from e
        except BaseException:
            budget.give(self.count)
            raise
        self.held = False

    def try_close(self) -> bool:
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                return False
            self.mm = None
            unmap_grant_refs(self.fd, self.index, self.count)
            self.budget.give(self.count)
        return True


@dataclass(eq=False)
class XenOnDemandRegion(MappedRegion):
    """A region of grants that may not be mapped in advance: each view maps its own pages (released with the
    view), and backings hold theirs (:func:`pin_grants`)."""

    budget: GrantBudget = field(default_factory=GrantBudget)
    _maps: list[_GrantMap] = field(default_factory=list)

    @property
    def file_backed(self) -> bool:
        return False

    @property
    def on_demand(self) -> bool:
        return True

    @property
    def mapping(self) -> mmap.mmap:
        raise GuestMemoryError("a region mapped on demand has no whole mapping")

    def refs(self, offset: int, length: int) -> tuple[list[int], int]:
        """The grant references covering [offset, offset + length) of the region, and the offset in the first."""
        first = offset // PAGE_SIZE
        last = (offset + max(length, 1) - 1) // PAGE_SIZE
        base = _first_refs(self.desc)
        return [base + p for p in range(first, last + 1)], offset - first * PAGE_SIZE

    def grant_map(self, refs: list[int]) -> _GrantMap:
        m = _GrantMap(self.fd, self.desc.domid, refs, self.budget)
        self._maps.append(m)
        return m

    def view(self, offset: int, length: int) -> memoryview:
        refs, skew = self.refs(offset, length)
        m = self.grant_map(refs)
        assert m.mm is not None
        return memoryview(m.mm)[skew:skew + length]

    def collect(self) -> int:
        self._maps = [m for m in self._maps if m.held or not m.try_close()]
        return len(self._maps)

    def try_close(self) -> bool:
        if self.collect():
            return False
        return super().try_close()


class GrantPin:
    """A backing's grants mapped back to back and held (a :class:`~vgpu.vhost_user.alias.Contiguous`): one
    gntdev mapping of every page the scatter list names, in its order, so the backing reads and writes as one
    range."""

    def __init__(self, m: _GrantMap, skew: int, size: int) -> None:
        self._m, self._skew, self.size = m, skew, size
        m.held = True

    @property
    def is_open(self) -> bool:
        return self._m.held

    def view(self) -> memoryview:
        if not self._m.held or self._m.mm is None:
            raise ValueError("grant mapping released")
        return memoryview(self._m.mm)[self._skew:self._skew + self.size]

    def write(self, pos: int, data: bytes) -> None:
        if pos < 0 or pos + len(data) > self.size:
            raise ValueError(f"write of {len(data)} bytes at {pos} passes the {self.size}-byte mapping")
        with self.view() as v:
            v[pos:pos + len(data)] = data

    def release(self) -> None:
        """Let go: unmapped now, or by the region's next collect once no view pins it."""
        if self._m.held:
            self._m.held = False
            self._m.try_close()


def pin_grants(pieces: list[tuple[MappedRegion, int, int]], budget: GrantBudget) -> GrantPin:
    """Hold (region, offset, length) pieces — a scatter list in on-demand grant regions — as one contiguous
    mapping.  Pages are placed whole, so every piece but the first must start on a page and every piece but the
    last must end on one (what a page-granular guest driver sends anyway)."""
    region = pieces[0][0]
    if not isinstance(region, XenOnDemandRegion):
        raise GuestMemoryError("only grant regions mapped on demand are pinned")
    refs: list[int] = []
    skew = pieces[0][1] % PAGE_SIZE
    size = 0
    for i, (r, off, n) in enumerate(pieces):
        if not isinstance(r, XenOnDemandRegion) or r.desc.domid != region.desc.domid:
            raise GuestMemoryError("a backing spans grants of more than one domain")
        if (i and off % PAGE_SIZE) or (i + 1 < len(pieces) and (off + n) % PAGE_SIZE):
            raise GuestMemoryError(f"backing entry {i} is not page aligned: grants are mapped whole pages")
        refs += r.refs(off, n)[0]
        size += n
    return GrantPin(region.grant_map(refs), skew, size)
