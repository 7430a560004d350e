"""Device-side virtqueue against a driver-side one over the same memfd, in one process: chain walking, caps,
used-ring updates and notification suppression, observed through the ring memory and the real call eventfd."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from vgpu.vhost_user.driver import DriverQueue, GuestRam
from vgpu.vhost_user.memory import GuestMemory, GuestMemoryError, RegionDesc
from vgpu.vhost_user.virtqueue import RingBroken, Virtqueue, VirtqueueError, need_event
from vgpu.vhost_user.wire import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT

GPA_BASE = 0x4000_0000


class Pair:
    def __init__(self, size: int = 16, event_idx: bool = False) -> None:
        self.ram = GuestRam(1 << 20, gpa_base=GPA_BASE)
        self.mem = GuestMemory(8)
        self.mem.add(RegionDesc(GPA_BASE, self.ram.size, self.ram.uva, 0), os.dup(self.ram.fd))
        self.drv = DriverQueue(self.ram, 0, size, event_idx)
        self.dev = Virtqueue(0, 1024)
        self.dev.set_size(size)
        desc, used, avail = self.drv.addresses
        self.dev.set_addr(desc, used, avail, 0, 0)
        self.dev.map(self.mem)
        self.dev.event_idx = event_idx
        self.dev.call_fd = os.dup(self.drv.call_fd)
        self.dev.started = self.dev.enabled = True

    def calls(self) -> int:
        try:
            return os.eventfd_read(self.drv.call_fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        self.dev.reset()
        self.drv.close()
        self.mem.close()
        self.ram.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


def test_chain_views_are_zero_copy_and_ordered(pair: Pair) -> None:
    p = pair.drv.add([b"abc", b"defg"], [8, 4])
    pair.drv.publish(p)
    chain = pair.dev.pop(pair.mem)
    assert chain is not None
    assert bytes(chain.read_all()) == b"abcdefg"
    assert [len(v) for v in chain.writable] == [8, 4]
    assert chain.write(b"0123456789AB-extra") == 12
    pair.dev.push(chain.head, 12)
    chain.release()
    ((done, written),) = pair.drv.collect()
    assert done is p and written == 12
    assert pair.drv.read_response(p, written) == b"0123456789AB"


def test_indirect_chain(pair: Pair) -> None:
    p = pair.drv.add([b"hdr", b"body"], [16], indirect=True)
    pair.drv.publish(p)
    chain = pair.dev.pop(pair.mem)
    assert chain is not None and bytes(chain.read_all()) == b"hdrbody" and chain.writable_len == 16


def test_descriptor_outside_memory_is_returned_empty(pair: Pair) -> None:
    p = pair.drv.add_raw([(0x10, 64, False)])  # below the only region
    pair.drv.publish(p)
    with pytest.raises(VirtqueueError, match="not inside one memory region"):
        pair.dev.pop(pair.mem)
    ((done, written),) = pair.drv.collect()
    assert done is p and written == 0
    # The queue keeps working.
    ok = pair.drv.add([b"x"], [1])
    pair.drv.publish(ok)
    assert pair.dev.pop(pair.mem) is not None


def test_range_straddling_region_end_is_refused(pair: Pair) -> None:
    end = GPA_BASE + pair.ram.size
    with pytest.raises(GuestMemoryError):
        pair.mem.gpa(end - 8, 16)
    with pytest.raises(GuestMemoryError):
        pair.mem.gpa(end, 1)
    assert len(pair.mem.gpa(end - 8, 8)) == 8


def test_descriptor_loop_is_detected(pair: Pair) -> None:
    p = pair.drv.add_raw([(GPA_BASE + 0x8000, 16, False), (GPA_BASE + 0x9000, 16, False)])
    a, b = p.descs
    pair.drv.write_desc(b, GPA_BASE + 0x9000, 16, VRING_DESC_F_NEXT, a)  # b -> a -> b -> ...
    pair.drv.publish(p)
    with pytest.raises(VirtqueueError, match="loops"):
        pair.dev.pop(pair.mem)


def test_nested_indirect_and_bad_indirect_sizes(pair: Pair) -> None:
    inner = pair.drv.add([b"data"], [], indirect=True)
    # An indirect table whose only entry is itself indirect.
    outer = pair.drv.add_raw([(inner.indirect_gpa, 16, False)], indirect=True,
                             flags_override={0: VRING_DESC_F_INDIRECT})
    pair.drv.publish(outer)
    with pytest.raises(VirtqueueError, match="nested"):
        pair.dev.pop(pair.mem)
    odd = pair.drv.add_raw([(GPA_BASE + 0x8000, 16, False)])
    pair.drv.write_desc(odd.head, GPA_BASE + 0x8000, 24, VRING_DESC_F_INDIRECT, 0)
    pair.drv.publish(odd)
    with pytest.raises(VirtqueueError, match="indirect table of 24 bytes"):
        pair.dev.pop(pair.mem)


def test_readable_after_writable_is_refused(pair: Pair) -> None:
    p = pair.drv.add_raw([(GPA_BASE + 0x8000, 16, True), (GPA_BASE + 0x9000, 16, False)])
    pair.drv.publish(p)
    with pytest.raises(VirtqueueError, match="readable buffer after"):
        pair.dev.pop(pair.mem)


def test_ring_index_jump_breaks_the_ring(pair: Pair) -> None:
    pair.drv.set_avail_idx(pair.dev.size + 5)
    items = list(pair.dev.chains(pair.mem))
    assert len(items) == 1 and isinstance(items[0], RingBroken)
    assert pair.dev.broken and not pair.dev.ready


def test_head_out_of_range_breaks_the_ring(pair: Pair) -> None:
    pair.drv.publish_head(pair.dev.size + 1)
    with pytest.raises(RingBroken):
        pair.dev.pop(pair.mem)


def test_no_interrupt_flag_suppresses_calls(pair: Pair) -> None:
    pair.drv.set_no_interrupt(True)
    pair.drv.publish(pair.drv.add([b"a"], [1]))
    chain = pair.dev.pop(pair.mem)
    assert chain is not None
    pair.dev.push(chain.head, 0)
    assert pair.dev.notify() is False and pair.calls() == 0
    pair.drv.set_no_interrupt(False)
    pair.drv.publish(pair.drv.add([b"b"], [1]))
    chain = pair.dev.pop(pair.mem)
    assert chain is not None
    pair.dev.push(chain.head, 0)
    assert pair.dev.notify() is True and pair.calls() == 1


def test_event_idx_suppression() -> None:
    pr = Pair(event_idx=True)
    try:
        for _ in range(3):
            pr.drv.publish(pr.drv.add([b"a"], [1]))
        # The device asks for a kick at the next avail index after popping.
        for _ in range(3):
            c = pr.dev.pop(pr.mem)
            assert c is not None
            pr.dev.push(c.head, 0)
        assert int(pr.drv._avail_event[0]) == 3
        assert pr.dev.notify() and pr.calls() == 1  # first notification always goes out
        pr.drv.collect()  # sets used_event = 3: interrupt me when used passes 3
        # Tell the device we only want an interrupt after the 5th completion from here.
        pr.drv._avail[2 + pr.drv.size] = 3 + 4
        for i in range(5):
            pr.drv.publish(pr.drv.add([b"b"], [1]))
            c = pr.dev.pop(pr.mem)
            assert c is not None
            pr.dev.push(c.head, 0)
            signalled = pr.dev.notify()
            assert signalled == (i == 4), i
        assert pr.calls() == 1
    finally:
        pr.close()


def test_need_event_wraps() -> None:
    assert need_event(0xFFFF, 0, 0xFFFE)
    assert not need_event(5, 5, 4)
    assert need_event(4, 5, 4)


def test_queue_size_validation() -> None:
    q = Virtqueue(0, 1024)
    for bad in (0, 3, 2048, 1000):
        with pytest.raises(VirtqueueError):
            q.set_size(bad)
    q.set_size(1024)


def test_memory_rejects_overlap_zero_size_and_excess() -> None:
    mem = GuestMemory(2)
    fds = [os.memfd_create("r") for _ in range(4)]
    for fd in fds:
        os.ftruncate(fd, 1 << 16)
    try:
        mem.add(RegionDesc(0, 1 << 16, 0x10000, 0), fds[0])
        with pytest.raises(GuestMemoryError, match="overlaps"):
            mem.add(RegionDesc(0x8000, 1 << 16, 0x90000, 0), fds[1])
        with pytest.raises(GuestMemoryError, match="zero-sized"):
            mem.add(RegionDesc(0x100000, 0, 0x200000, 0), fds[2])
        with pytest.raises(GuestMemoryError, match="past the end"):
            mem.add(RegionDesc(0x100000, 1 << 20, 0x200000, 0), fds[3])
        for fd in fds[1:]:  # every refused fd was closed by the memory table
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        mem.close()
    with pytest.raises(OSError):
        os.fstat(fds[0])
