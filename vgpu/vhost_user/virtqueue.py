"""Split virtqueues, device side: descriptor chains as zero-copy views, used-ring updates, notification suppression.

The rings live in guest memory and the guest (another thread of QEMU) writes them concurrently, so every value read
from them is untrusted: indices are reduced modulo the queue size, chain walks are capped, and every buffer address
is translated through the region table with its full length.  Rings are read and written with precompiled
``struct`` formats on memoryviews of the mapping (about 0.15 us an access, against about 1 us for a numpy element);
the views also pin the mapping, so a region cannot be unmapped under a ring in use.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from .layout import struct_of
from .memory import GuestMemory, GuestMemoryError
from .wire import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_DESC_SIZE,
    VringDesc,
    VringUsedElem,
)

_DESC: Final = struct_of(VringDesc)
_USED_ELEM: Final = struct_of(VringUsedElem)
# An indirect table may hold at most this many descriptors; the spec bounds it by the queue size for direct chains
# only, so we pick the split-ring maximum to keep a hostile table from making us walk forever.
MAX_INDIRECT: Final = 32768
# Bytes one chain may carry in total.  Real GPU commands are far smaller; the cap keeps a hostile chain from making
# us gather gigabytes.
MAX_CHAIN_BYTES: Final = 1 << 28

log = logging.getLogger("vgpu.vhost_user")


class VirtqueueError(Exception):
    """A chain the driver laid out wrongly; it was handed back and the queue stays usable for the next one."""


class RingBroken(VirtqueueError):
    """The ring itself is inconsistent (an index no driver could have written): stop processing this queue until
    the front end sets it up again."""


def ring_sizes(num: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, available ring and used ring (with their event-index words)."""
    return 16 * num, 4 + 2 * num + 2, 4 + 8 * num + 2


_FENCE = threading.Lock()


def full_fence() -> None:
    """A full memory barrier (an uncontended lock is a locked read-modify-write: x86 orders every earlier store
    before every later load around it).  The event-index protocol needs one between writing our index and
    reading the other side's: without it both sides can read the other's stale value, and a kick or an
    interrupt is lost for good."""
    with _FENCE:
        pass


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """vring_need_event(): has `event_idx` been crossed while moving from old_idx to new_idx?"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


@dataclass(slots=True)
class DescriptorChain:
    """One request: the device-readable buffers followed by the device-writable ones."""

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)

    @property
    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)

    def read_all(self) -> bytes | memoryview:
        """The request bytes; zero-copy when the driver used one readable buffer (the common case)."""
        if len(self.readable) == 1:
            return self.readable[0]
        return b"".join(self.readable)

    def write(self, data: bytes | memoryview) -> int:
        """Scatter `data` into the writable buffers; returns how many bytes fit (never more than they hold)."""
        if len(self.writable) == 1:  # the common shape: one response buffer
            dst = self.writable[0]
            n = min(len(dst), len(data))
            dst[:n] = data[:n]
            return n
        src = memoryview(data)
        done = 0
        for dst in self.writable:
            if done >= len(src):
                break
            n = min(len(dst), len(src) - done)
            dst[:n] = src[done:done + n]
            done += n
        return done

    def release(self) -> None:
        """Drop the views so the memory they point into can be unmapped."""
        for v in self.readable:
            v.release()
        for v in self.writable:
            v.release()
        self.readable.clear()
        self.writable.clear()


class Virtqueue:
    """Device-side state of one split virtqueue, as set up by SET_VRING_* requests."""

    def __init__(self, index: int, max_size: int) -> None:
        self.index = index
        self.max_size = max_size
        self.size = 0
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.log_addr = 0
        self.addr_flags = 0
        self.has_addr = False
        self.last_avail_idx = 0
        # The driver's avail idx as last read: chains before it are published and need no new look at the ring.
        self._avail_seen = 0
        self.used_idx = 0
        self.signalled_used = 0
        self.signalled_used_valid = False
        self.kick_fd = -1
        self.call_fd = -1
        self.err_fd = -1
        self.started = False
        self.enabled = False
        self.event_idx = False
        self.indirect = False
        # Views of the descriptor table, the available ring (flags, idx, ring[], used_event) and the used ring
        # (flags, idx, ring[], avail_event).
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None
        self._used16: memoryview | None = None
        self._notified_used = 0
        self.broken = False

    # --- set-up ---------------------------------------------------------------------------------------------

    def set_size(self, num: int) -> None:
        if num == 0 or num > self.max_size or num & (num - 1):
            raise VirtqueueError(f"queue size {num} is not a power of two in 1..{self.max_size}")
        self.size = num
        self.unmap()

    def set_addr(self, desc: int, used: int, avail: int, log: int, flags: int) -> None:
        self.desc_addr, self.used_addr, self.avail_addr, self.log_addr = desc, used, avail, log
        self.addr_flags = flags
        self.has_addr = True
        self.broken = False
        self.unmap()

    def set_base(self, base: int) -> None:
        # For a split ring only the avail index travels; the used index is read back from the ring when mapped.
        self.last_avail_idx = base & 0xFFFF
        self._avail_seen = self.last_avail_idx
        self.signalled_used_valid = False

    def map(self, memory: GuestMemory) -> None:
        """Translate the ring addresses (front-end user addresses) into views; raises VirtqueueError if any ring is
        not wholly inside guest memory or is misaligned."""
        self.unmap()
        if not self.has_addr or self.size == 0:
            raise VirtqueueError(f"queue {self.index} has no size or addresses")
        dsz, asz, usz = ring_sizes(self.size)
        if self.desc_addr % 16 or self.avail_addr % 2 or self.used_addr % 4:
            raise VirtqueueError(f"queue {self.index} ring addresses are misaligned")
        try:
            dr, doff = memory.ring(self.desc_addr, dsz)
            ar, aoff = memory.ring(self.avail_addr, asz)
            ur, uoff = memory.ring(self.used_addr, usz)
        except GuestMemoryError as e:
            raise VirtqueueError(f"queue {self.index}: {e}") from e
        self._desc = dr.view(doff, dsz)
        # The ring indices and event words as u16 items: one aligned 16-bit load or store each, which the driver
        # (another CPU, now) can never see half written.  (struct.pack_into zeroes its bytes before it writes them,
        # and its unpack reads byte by byte: a driver reading used->idx meanwhile saw 0, and we could read an
        # avail idx torn between its old and new bytes.)
        self._avail = ar.view(aoff, asz).cast("H")
        self._used = ur.view(uoff, usz)
        self._used16 = self._used.cast("H")
        self.used_idx = self._used16[1]
        self._notified_used = self.used_idx
        self._avail_seen = self.last_avail_idx

    def unmap(self) -> None:
        for v in (self._desc, self._avail, self._used16, self._used):
            if v is not None:
                v.release()
        self._desc = self._avail = self._used = self._used16 = None

    @property
    def mapped(self) -> bool:
        return self._desc is not None

    def reset(self) -> None:
        self.unmap()
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            if fd >= 0:
                os.close(fd)
        self.__init__(self.index, self.max_size)  # type: ignore[misc]

    def replace_fd(self, which: str, fd: int) -> None:
        """Install a new kick/call/err fd, closing the one it replaces."""
        old: int = getattr(self, which)
        if old >= 0 and old != fd:
            os.close(old)
        setattr(self, which, fd)

    # --- processing -----------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.started and self.enabled and self._desc is not None and not self.broken

    def avail_idx(self) -> int:
        assert self._avail is not None
        idx: int = self._avail[1]
        return idx

    def has_pending(self) -> bool:
        return self._avail is not None and self.avail_idx() != self.last_avail_idx

    def pop(self, memory: GuestMemory) -> DescriptorChain | None:
        """The next available chain, or None.  A malformed chain is returned to the driver with length 0 and
        VirtqueueError is raised so the caller can log it and carry on with the next one."""
        avail = self._avail
        if avail is None:
            return None
        if self._avail_seen == self.last_avail_idx:
            # Everything the driver had published when we last looked is taken: look again.  (Chains up to an
            # index already read stay published, so a batch of 64 costs one read of the index and one fence.)
            if self.event_idx:
                full_fence()  # our avail_event store (previous pop) before this load of the driver's avail idx
            idx = avail[1]
            pending = (idx - self.last_avail_idx) & 0xFFFF
            if pending == 0:
                return None
            if pending > self.size:
                raise RingBroken(f"queue {self.index}: avail index moved by {pending} > queue size {self.size}")
            self._avail_seen = idx
        head: int = avail[2 + self.last_avail_idx % self.size]
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx and self._used16 is not None:
            # Ask for a kick when the driver publishes the next one (avail_event, after the used ring's elements).
            self._used16[2 + 4 * self.size] = self.last_avail_idx
        if head >= self.size:
            raise RingBroken(f"queue {self.index}: head {head} outside a queue of {self.size}")
        try:
            return self._walk(memory, head)
        except VirtqueueError:
            self.push(head, 0)
            raise

    def _walk(self, memory: GuestMemory, head: int) -> DescriptorChain:
        assert self._desc is not None
        table: memoryview = self._desc
        unpack = _DESC.unpack_from
        limit = self.size
        # The common shape, a request buffer chained to one response buffer, without the general loop. Anything
        # else (indirect tables, longer chains, bad flags) takes the loop below, which does every check.
        addr, length, flags, nxt = unpack(table, 16 * head)
        if flags == VRING_DESC_F_NEXT and nxt < limit and nxt != head:
            addr2, length2, flags2, _ = unpack(table, 16 * nxt)
            if flags2 == VRING_DESC_F_WRITE and length + length2 <= MAX_CHAIN_BYTES:
                try:
                    readable = memory.gpa(addr, length)
                    try:
                        return DescriptorChain(head, [readable], [memory.gpa(addr2, length2)])
                    except GuestMemoryError:
                        readable.release()
                        raise
                except GuestMemoryError as e:
                    raise VirtqueueError(f"queue {self.index}: chain at {head}: {e}") from e
        chain = DescriptorChain(head, [], [])
        i = head
        seen = 0
        total = 0
        indirect = False
        try:
            while True:
                if seen >= limit:
                    raise VirtqueueError(f"queue {self.index}: chain at {head} loops or exceeds {limit} descriptors")
                seen += 1
                addr, length, flags, nxt = unpack(table, 16 * i)
                if flags & VRING_DESC_F_INDIRECT:
                    if indirect:
                        raise VirtqueueError("nested indirect descriptor table")
                    if flags & VRING_DESC_F_NEXT:
                        raise VirtqueueError("indirect descriptor with NEXT set")
                    if length == 0 or length % VRING_DESC_SIZE or length // VRING_DESC_SIZE > MAX_INDIRECT:
                        raise VirtqueueError(f"indirect table of {length} bytes")
                    try:
                        view = memory.gpa(addr, length)
                    except GuestMemoryError as e:
                        raise VirtqueueError(f"indirect table: {e}") from e
                    if chain.readable or chain.writable:
                        raise VirtqueueError("indirect descriptor after direct buffers")
                    table = view
                    limit = length // VRING_DESC_SIZE
                    indirect = True
                    i, seen = 0, 0
                    continue
                total += length
                if total > MAX_CHAIN_BYTES:
                    raise VirtqueueError(f"chain carries more than {MAX_CHAIN_BYTES} bytes")
                try:
                    buf = memory.gpa(addr, length)
                except GuestMemoryError as e:
                    raise VirtqueueError(f"queue {self.index}: descriptor {i}: {e}") from e
                if flags & VRING_DESC_F_WRITE:
                    chain.writable.append(buf)
                elif chain.writable:
                    raise VirtqueueError("device-readable buffer after a device-writable one")
                else:
                    chain.readable.append(buf)
                if not flags & VRING_DESC_F_NEXT:
                    return chain
                if nxt >= limit:
                    raise VirtqueueError(f"next index {nxt} outside a table of {limit}")
                i = nxt
        except BaseException:
            chain.release()
            raise

    def push(self, head: int, written: int) -> None:
        """Return a chain to the driver with `written` bytes in its writable part."""
        used, used16 = self._used, self._used16
        assert used is not None and used16 is not None
        # The element may be written in any way (struct zeroes it first): the driver reads none past the index.
        _USED_ELEM.pack_into(used, 4 + 8 * (self.used_idx % self.size), head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        # Then the index, one 16-bit store; on x86 (TSO) the element is visible before the index that publishes it.
        used16[1] = self.used_idx

    def should_notify(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last notification."""
        assert self._avail is not None
        if not self.event_idx:
            return not self._avail[0] & VRING_AVAIL_F_NO_INTERRUPT
        old = self.signalled_used
        valid = self.signalled_used_valid
        new = self.used_idx
        self.signalled_used = new
        self.signalled_used_valid = True
        if not valid:
            return True
        full_fence()  # our used idx store before this load of the driver's used_event
        used_event: int = self._avail[2 + self.size]
        return need_event(used_event, new, old)

    def notify(self) -> bool:
        """Signal the call eventfd if chains were used since the last call and the driver asked for it."""
        if self.call_fd < 0 or self.used_idx == self._notified_used or not self.should_notify():
            return False
        self._notified_used = self.used_idx
        try:
            os.eventfd_write(self.call_fd, 1)
        except OSError as e:
            if e.errno != errno.EAGAIN:
                # Not an eventfd the driver reads (a pipe nobody reads any more, a file): the front end's fault,
                # and every later interrupt would fail alike. Drop it, as if the ring had been set up without one.
                log.warning("queue %d: call fd %d unusable (%s); no more interrupts", self.index, self.call_fd, e)
                self.replace_fd("call_fd", -1)
        return True

    def drain_kick(self) -> bool:
        """Consume the kick; False when the kick fd is no eventfd (a pipe or socket at its end, a short read)."""
        try:
            os.eventfd_read(self.kick_fd)
        except BlockingIOError:
            pass
        except OSError:
            return False
        return True

    def chains(self, memory: GuestMemory) -> Iterator[DescriptorChain | VirtqueueError]:
        """Every available chain, malformed ones yielded as their error (already returned to the driver)."""
        while self.ready:
            try:
                chain = self.pop(memory)
            except RingBroken as e:
                self.broken = True
                yield e
                return
            except VirtqueueError as e:
                yield e
                continue
            if chain is None:
                return
            yield chain
