"""A reserved address range that stands in for a shared-memory BAR: what a VMM does with SHMEM_MAP/UNMAP.

The front end places each mapping the back end asks for at its offset inside the range (MAP_FIXED over a
PROT_NONE reservation), so tests read and write the back end's buffer exactly where a guest would see it.
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass
from typing import Final

from .memory import PAGE_SIZE


class WindowError(Exception):
    """A mapping the window cannot take (outside, unaligned, overlapping) or an unmap of nothing."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FIXED: Final = 0x10
_PROT_NONE: Final = 0
_MAP_FAILED: Final = ctypes.c_void_p(-1).value


def _mmap_fixed(addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> None:
    res = _libc.mmap(addr, length, prot, flags | _MAP_FIXED, fd, offset)
    if res == _MAP_FAILED or res != addr:
        raise OSError(ctypes.get_errno(), f"mmap at {addr:#x} failed")


@dataclass
class ShmMapping:
    shm_offset: int
    length: int
    fd_offset: int
    flags: int


class ShmWindow:
    """A reserved address range standing in for a shared-memory BAR; SHMEM_MAP places fds inside it."""

    def __init__(self, shmid: int, size: int) -> None:
        self.shmid, self.size = shmid, size
        # Reserve the range inaccessible, as a BAR nothing is mapped into yet.
        res = _libc.mmap(None, size, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if res == _MAP_FAILED or res is None:
            raise OSError(ctypes.get_errno(), "cannot reserve a shared-memory window")
        self.base: int = res
        self.mappings: dict[int, ShmMapping] = {}
        self.log: list[tuple[str, ShmMapping]] = []

    def map(self, fd: int, m: ShmMapping) -> None:
        if m.length == 0 or m.shm_offset + m.length > self.size or m.shm_offset + m.length < m.shm_offset:
            raise WindowError(f"mapping {m.shm_offset:#x}+{m.length:#x} outside a {self.size:#x} window")
        if m.shm_offset % PAGE_SIZE or m.length % PAGE_SIZE or m.fd_offset % PAGE_SIZE:
            raise WindowError("unaligned mapping")
        for other in self.mappings.values():
            if m.shm_offset < other.shm_offset + other.length and other.shm_offset < m.shm_offset + m.length:
                raise WindowError("mapping overlaps an existing one")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if m.flags & 1 else 0)
        _mmap_fixed(self.base + m.shm_offset, m.length, prot, mmap.MAP_SHARED, fd, m.fd_offset)
        self.mappings[m.shm_offset] = m
        self.log.append(("map", m))

    def unmap(self, m: ShmMapping) -> None:
        cur = self.mappings.get(m.shm_offset)
        if cur is None or cur.length != m.length:
            raise WindowError(f"no mapping of exactly {m.shm_offset:#x}+{m.length:#x}")
        _mmap_fixed(self.base + m.shm_offset, m.length, _PROT_NONE,
                    mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        del self.mappings[m.shm_offset]
        self.log.append(("unmap", m))

    def read(self, offset: int, length: int) -> bytes:
        """What the back end's buffer holds at `offset` (must be mapped)."""
        if not any(o <= offset and offset + length <= o + m.length for o, m in self.mappings.items()):
            raise WindowError("read outside a mapping")
        return ctypes.string_at(self.base + offset, length)

    def write(self, offset: int, data: bytes) -> None:
        if not any(o <= offset and offset + len(data) <= o + m.length for o, m in self.mappings.items()):
            raise WindowError("write outside a mapping")
        ctypes.memmove(self.base + offset, data, len(data))

    def close(self) -> None:
        self.mappings.clear()
        if self.base:
            _libc.munmap(self.base, self.size)
            self.base = 0
