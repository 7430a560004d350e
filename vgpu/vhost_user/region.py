"""One guest memory region as the back end maps it, and the mapping primitive every kind of region uses.

A region owns the fd the front end sent for it and the mapping made from it.  The plain kind maps its file (a
memfd) whole; Xen's kinds (vgpu/vhost_user/xen_memory.py) subclass it, because their fd is a driver (privcmd,
gntdev) whose pages arrive through an ioctl, may be mapped only on demand, and are not a file another mapping could
be made of (no contiguous aliases, no udmabuf over them).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import stat
from dataclasses import dataclass, field
from typing import Final

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


def address_of(mm: mmap.mmap) -> int:
    """Where a (writable) mapping starts, for the ioctls that take an address (privcmd's MMAPBATCH)."""
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # releases the buffer export again: the object must stay closable


@dataclass(frozen=True, slots=True)
class RegionDesc:
    """A region as described on the wire (SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG); the last two fields come
    with VHOST_USER_PROTOCOL_F_XEN_MMAP (0: a plain file region)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    xen_mmap_flags: int = 0
    domid: int = 0


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

    @property
    def file_backed(self) -> bool:
        """The fd is a file whose pages can be mapped again (contiguous aliases, udmabuf); Xen's drivers are not."""
        return True

    @property
    def on_demand(self) -> bool:
        """No whole mapping exists: views map their pages when asked for (Xen grants with map-on-demand)."""
        return False

    def view(self, offset: int, length: int) -> memoryview:
        assert self._map is not None
        start = self._skew + offset
        return memoryview(self._map)[start:start + length]

    def collect(self) -> int:
        """Release mappings made on demand that no view pins any more; returns how many are still pinned."""
        return 0

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


