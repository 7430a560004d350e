"""The driver's half of guest memory and split virtqueues, for a front end that plays the guest.

Tests, benchmarks and the conformance runner need a guest that lays out rings and buffers exactly as a virtio driver
would, in memory shared with the back end through a memfd, so that the back end sees nothing that a real VMM would
not give it.  Buffers are carved out of one memfd with a first-fit allocator; the rings live there too.
"""

from __future__ import annotations

import ctypes
import fcntl
import itertools
import mmap
import os
import select
import time
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np

from .layout import dtype_of
from .memory import PAGE_SIZE
from .virtqueue import full_fence, need_event, ring_sizes
from .wire import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VringDesc,
    VringUsedElem,
)

_DESC: Final = dtype_of(VringDesc)
_USED: Final = dtype_of(VringUsedElem)


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


class Ram(Protocol):
    """Guest RAM as a driver queue and a front end use it (:class:`GuestRam`, or Xen's ``XenSelfRam``)."""

    size: int

    @property
    def map(self) -> mmap.mmap: ...

    def offset(self, gpa: int, length: int) -> int: ...

    def alloc(self, size: int, align: int = 64) -> int: ...

    def free(self, gpa: int, size: int) -> None: ...

    def write(self, gpa: int, data: bytes) -> None: ...

    def read(self, gpa: int, length: int) -> bytes: ...

    def uva_of(self, gpa: int) -> int: ...

    def regions(self, split: int = 1) -> list[tuple[dict[str, int], int]]: ...

    def close(self) -> None: ...


class GuestRam:
    """A memfd that plays guest RAM: guest-physical addresses start at `gpa_base`.

    What a driver queue uses of it — `map`, `offset`, `alloc`/`free`, `read`/`write`, `uva_of` — is also what
    :class:`vgpu.vhost_user.xen_driver.XenSelfRam` offers, where guest addresses are not one linear range."""

    def __init__(self, size: int, gpa_base: int = 0, name: str = "vgpu-guest-ram") -> None:
        self.size = _align(size, PAGE_SIZE)
        self.gpa_base = gpa_base
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, self.size)
        # Sealed against resizing, as QEMU's memfd backend seals guest RAM: what udmabuf requires to export it.
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.map = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        # The front end's own virtual address: what SET_VRING_ADDR and the memory table's userspace_addr name.
        self.uva = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self._free: list[tuple[int, int]] = [(0, self.size)]

    def alloc(self, size: int, align: int = 64) -> int:
        """A guest-physical address of `size` free bytes."""
        size = max(_align(size, 16), 16)
        for i, (start, length) in enumerate(self._free):
            a = _align(start, align)
            if a + size <= start + length:
                pieces = [(start, a - start), (a + size, start + length - a - size)]
                self._free[i:i + 1] = [(s, n) for s, n in pieces if n > 0]
                return self.gpa_base + a
        raise MemoryError(f"guest RAM exhausted allocating {size} bytes")

    def free(self, gpa: int, size: int) -> None:
        size = max(_align(size, 16), 16)
        self._free.append((gpa - self.gpa_base, size))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for s, n in self._free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((s, n))
        self._free = merged

    def offset(self, gpa: int, length: int) -> int:
        """Where guest-physical [gpa, gpa + length) lies in `map` (one linear range here)."""
        off = gpa - self.gpa_base
        if off < 0 or off + length > self.size:
            raise ValueError(f"gpa {gpa:#x} +{length:#x} outside guest RAM")
        return off

    def view(self, gpa: int, length: int) -> memoryview:
        off = self.offset(gpa, length)
        return memoryview(self.map)[off:off + length]

    def write(self, gpa: int, data: bytes) -> None:
        with self.view(gpa, len(data)) as v:
            v[:] = data

    def read(self, gpa: int, length: int) -> bytes:
        with self.view(gpa, length) as v:
            return bytes(v)

    def uva_of(self, gpa: int) -> int:
        return self.uva + gpa - self.gpa_base

    def regions(self, split: int = 1) -> list[tuple[dict[str, int], int]]:
        """How a VMM describes this RAM to a back end: region fields and the fd to send with each; `split` cuts
        it into that many regions of the same memfd at page-aligned offsets."""
        pages = self.size // PAGE_SIZE
        cuts = [pages * i // split * PAGE_SIZE for i in range(split + 1)]
        return [(dict(guest_phys_addr=self.gpa_base + a, memory_size=b - a, userspace_addr=self.uva + a,
                      mmap_offset=a), self.fd) for a, b in itertools.pairwise(cuts)]

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(slots=True)
class Pending:
    """A chain the driver made available: where its buffers live, so the driver can read the answer."""

    head: int
    descs: list[int]
    buffers: list[tuple[int, int, bool]]  # gpa, length, writable
    indirect_gpa: int = 0
    indirect_len: int = 0
    pooled: bool = False  # the buffers came from the queue's pool (add), not from the caller (add_raw)


class DriverQueue:
    """The driver side of one split virtqueue laid out in `ram`."""

    def __init__(self, ram: Ram, index: int, size: int, event_idx: bool = False) -> None:
        if size & (size - 1) or not 0 < size <= 32768:
            raise ValueError("queue size must be a power of two")
        self.ram, self.index, self.size, self.event_idx = ram, index, size, event_idx
        dsz, asz, usz = ring_sizes(size)
        self.desc_gpa = ram.alloc(dsz, 16)
        self.avail_gpa = ram.alloc(asz, 2)
        self.used_gpa = ram.alloc(usz, 4)
        for gpa, n in ((self.desc_gpa, dsz), (self.avail_gpa, asz), (self.used_gpa, usz)):
            ram.write(gpa, bytes(n))
        m = ram.map
        desc, avail, used = ram.offset(self.desc_gpa, dsz), ram.offset(self.avail_gpa, asz), ram.offset(
            self.used_gpa, usz)
        self._desc: np.ndarray[Any, Any] = np.frombuffer(m, _DESC, size, desc)
        self._avail: np.ndarray[Any, Any] = np.frombuffer(m, np.dtype("<u2"), size + 3, avail)
        self._used: np.ndarray[Any, Any] = np.frombuffer(m, np.dtype("<u2"), 2, used)
        self._used_elems: np.ndarray[Any, Any] = np.frombuffer(m, _USED, size, used + 4)
        self._avail_event: np.ndarray[Any, Any] = np.frombuffer(m, np.dtype("<u2"), 1, used + 4 + 8 * size)
        self._free_descs = list(range(size - 1, -1, -1))
        self.avail_idx = 0
        self.last_used = 0
        self.kicked_avail = 0
        self.inflight: dict[int, Pending] = {}
        # Request and answer buffers of released chains, by size, for the next add(): a chain's buffers are
        # the same few sizes over and over, and GuestRam's first-fit search through the holes that 64 chains in
        # flight leave costs more than the back end's work on a cheap command (a benchmark measures the harness).
        self._pool: dict[int, list[int]] = {}
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    @property
    def addresses(self) -> tuple[int, int, int]:
        """desc, used, avail as front-end user addresses (what SET_VRING_ADDR carries)."""
        return self.ram.uva_of(self.desc_gpa), self.ram.uva_of(self.used_gpa), self.ram.uva_of(self.avail_gpa)

    def set_no_interrupt(self, on: bool) -> None:
        self._avail[0] = 1 if on else 0

    @property
    def free_descriptors(self) -> int:
        """Descriptors not in any chain the device holds (the fuzzer kicks before a chain would not fit)."""
        return len(self._free_descs)

    def add(self, readable: list[bytes], writable: list[int], indirect: bool = False) -> Pending:
        """Place buffers in guest RAM and build a chain (readable first, then writable) without publishing it."""
        bufs: list[tuple[int, int, bool]] = []
        m, at = self.ram.map, self.ram.offset
        for data in readable:
            gpa = self._buffer(len(data))
            off = at(gpa, len(data))
            m[off:off + len(data)] = data
            bufs.append((gpa, len(data), False))
        for n in writable:
            gpa = self._buffer(n)
            off = at(gpa, n)
            m[off:off + n] = bytes(n)
            bufs.append((gpa, n, True))
        p = self.add_raw(bufs, indirect)
        p.pooled = True
        return p

    def _buffer(self, size: int) -> int:
        free = self._pool.get(size)
        return free.pop() if free else self.ram.alloc(size)

    def add_raw(self, bufs: list[tuple[int, int, bool]], indirect: bool = False,
                flags_override: dict[int, int] | None = None) -> Pending:
        """Build a chain from explicit (gpa, length, writable) buffers; `flags_override` lets a test forge the
        flags of descriptor i."""
        if not bufs:
            raise ValueError("a chain needs at least one buffer")
        if indirect:
            n = len(bufs)
            table_gpa = self.ram.alloc(16 * n, 16)
            table = np.frombuffer(self.ram.map, _DESC, n, self.ram.offset(table_gpa, 16 * n))
            for i, (gpa, length, w) in enumerate(bufs):
                flags = (VRING_DESC_F_WRITE if w else 0) | (VRING_DESC_F_NEXT if i + 1 < n else 0)
                if flags_override and i in flags_override:
                    flags = flags_override[i]
                table[i] = (gpa, length, flags, i + 1 if i + 1 < n else 0)
            del table
            head = self._take_desc()
            self._desc[head] = (table_gpa, 16 * n, VRING_DESC_F_INDIRECT, 0)
            return Pending(head, [head], bufs, table_gpa, 16 * n)
        if len(bufs) > len(self._free_descs):
            raise MemoryError("no free descriptors")
        ids = [self._take_desc() for _ in bufs]
        for i, (gpa, length, w) in enumerate(bufs):
            last = i + 1 == len(bufs)
            flags = (VRING_DESC_F_WRITE if w else 0) | (0 if last else VRING_DESC_F_NEXT)
            if flags_override and i in flags_override:
                flags = flags_override[i]
            self._desc[ids[i]] = (gpa, length, flags, 0 if last else ids[i + 1])
        return Pending(ids[0], ids, bufs)

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        """Write a raw descriptor (for tests that forge broken chains)."""
        self._desc[i] = (addr, length, flags, nxt)

    def _take_desc(self) -> int:
        if not self._free_descs:
            raise MemoryError("no free descriptors")
        return self._free_descs.pop()

    def publish(self, p: Pending) -> None:
        # In flight before the index says so: a device that polls the ring may take and return the chain at once.
        self.inflight[p.head] = p
        self._avail[2 + self.avail_idx % self.size] = p.head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self._avail[1] = self.avail_idx

    def publish_head(self, head: int) -> None:
        """Publish a raw head index (for tests that forge rings)."""
        self._avail[2 + self.avail_idx % self.size] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self._avail[1] = self.avail_idx

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self._avail[1] = self.avail_idx

    def needs_kick(self) -> bool:
        """With EVENT_IDX, kick only if the device asked (avail_event crossed); otherwise unless it said not to."""
        old, self.kicked_avail = self.kicked_avail, self.avail_idx
        full_fence()  # our avail idx store before this load of the device's avail_event / flags
        if self.event_idx:
            return need_event(int(self._avail_event[0]), self.avail_idx, old)
        return not int(self._used[0]) & 1

    def kick(self, force: bool = False) -> bool:
        if force or self.needs_kick():
            os.eventfd_write(self.kick_fd, 1)
            return True
        return False

    def used_idx(self) -> int:
        return int(self._used[1])

    def collect(self) -> list[tuple[Pending, int]]:
        """Chains the device returned since last time, with the byte count it wrote; frees their descriptors."""
        out: list[tuple[Pending, int]] = []
        idx = self.used_idx()
        while self.last_used != idx:
            elem = self._used_elems[self.last_used % self.size]
            head, written = int(elem[0]), int(elem[1])
            self.last_used = (self.last_used + 1) & 0xFFFF
            p = self.inflight.pop(head, None)
            if p is None:
                raise RuntimeError(f"device returned head {head}, which is not in flight (used idx {idx} when "
                                   f"read, {self.used_idx()} now; {self.last_used} taken)")
            self._free_descs.extend(p.descs)
            out.append((p, written))
        if self.event_idx:
            # Ask for an interrupt on the very next completion.
            self._avail[2 + self.size] = self.last_used
        return out

    def wait(self, timeout: float) -> bool:
        """Wait for a completion (an interrupt may be spurious, so look at the ring); False on timeout."""
        deadline = time.monotonic() + timeout
        while self.used_idx() == self.last_used:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            r, _, _ = select.select([self.call_fd], [], [], remaining)
            if r:
                try:
                    os.eventfd_read(self.call_fd)
                except BlockingIOError:
                    pass
        return True

    def read_response(self, p: Pending, written: int) -> bytes:
        """The bytes the device wrote into the writable buffers (at most `written`)."""
        out = bytearray()
        for gpa, length, w in p.buffers:
            if w and len(out) < written:
                out += self.ram.read(gpa, min(length, written - len(out)))
        return bytes(out)

    def release(self, p: Pending) -> None:
        for gpa, length, _ in p.buffers:
            if p.pooled:
                free = self._pool.setdefault(length, [])
                if len(free) < self.size:
                    free.append(gpa)
                    continue
            self.ram.free(gpa, length)
        if p.indirect_len:
            self.ram.free(p.indirect_gpa, p.indirect_len)

    def drop_pool(self) -> None:
        """Give the pooled buffers back to guest RAM (a driver whose chains change size keeps no pool per size)."""
        for length, free in self._pool.items():
            for gpa in free:
                self.ram.free(gpa, length)
        self._pool.clear()

    def close(self) -> None:
        self.drop_pool()
        del self._desc, self._avail, self._used, self._used_elems, self._avail_event
        for fd in (self.kick_fd, self.call_fd):
            os.close(fd)
