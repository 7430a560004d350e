"""Guest memory regions as the front end hands them over: every accepted region holds exactly one fd in the back
end (the one it received, which udmabuf creation over guest RAM needs), none once removed; and the region
messages must be exactly the size the protocol gives them, bytes on the wire."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from tests.conftest import assert_no_leak, closed_by_peer, raw, still_serving
from vgpu.conformance.process import BackendProcess
from vgpu.procfs import fd_count, open_fds, wait_until
from vgpu.vhost_user.driver import GuestRam
from vgpu.vhost_user.frontend import Frontend
from vgpu.vhost_user.memory import GuestMemory, RegionDesc
from vgpu.vhost_user.wire import FrontendRequest, MemoryTable, SingleMemoryRegion, build_u64

MIB = 1 << 20
#: u64 padding + one region descriptor (guest address, size, user address, mmap offset): vhost-user's layout.
REGION_MSG_SIZE = 8 + 4 * 8


def own_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfd(name: str, size: int = MIB) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def held(b: BackendProcess, name: str) -> int:
    """How many of the back end's fds point at the memfd called `name`."""
    return sum(1 for target in open_fds(b.pid) if f"memfd:{name} " in target + " ")


def test_a_region_holds_exactly_the_fd_it_was_given() -> None:
    mem = GuestMemory(8)
    before = own_fds()
    fds = [memfd(f"unit{i}") for i in range(3)]
    assert own_fds() == before + 3
    mem.set_table([RegionDesc(0, MIB, 0x10000000, 0)], [fds[0]])
    mem.add(RegionDesc(2 * MIB, MIB, 0x20000000, 0), fds[1])
    mem.add(RegionDesc(4 * MIB, MIB - 0x1000, 0x30000000, 0x1000), fds[2])  # a skewed one too
    # Ownership passed to the regions; mapping them opened nothing more.
    assert own_fds() == before + 3
    assert [r.fd for r in mem.regions] == fds
    mem.gpa(2 * MIB + 16, 5)[:] = b"guest"
    assert os.pread(fds[1], 5, 16) == b"guest"
    os.pwrite(fds[2], b"host", 0x1000 + 8)
    assert bytes(mem.gpa(4 * MIB + 8, 4)) == b"host"

    pinned = mem.gpa(0, 4)
    mem.remove(RegionDesc(0, MIB, 0x10000000, 0))
    assert mem.collect() == 1 and own_fds() == before + 3  # a live view keeps the region, and so its fd
    pinned.release()
    assert mem.collect() == 0 and own_fds() == before + 2
    mem.close()
    assert own_fds() == before


def test_the_back_end_holds_one_fd_per_region(echo_backend: BackendProcess) -> None:
    b = echo_backend
    fe = Frontend.connect(b.socket_path)
    ram = GuestRam(MIB, name="ram")
    extra = [memfd(f"region{i}") for i in range(3)]
    try:
        fe.negotiate()
        fe.share_memory(ram, use_add_mem_reg=True)
        base = fd_count(b.pid)
        assert held(b, "ram") == 1, open_fds(b.pid)
        for i, fd in enumerate(extra):
            fe.add_mem_reg((i + 1) * 16 * MIB, MIB, 0x100000000000 + i * 16 * MIB, 0, fd)
            assert fd_count(b.pid) == base + i + 1, open_fds(b.pid)
            assert held(b, f"region{i}") == 1, open_fds(b.pid)
        fe.setup_queue(0, 64)
        assert fe.submit(0, b"still works", 16) == b"still works"
        fe.rem_mem_reg(2 * 16 * MIB, MIB, 0x100000000000 + 16 * MIB)
        assert wait_until(lambda: held(b, "region1") == 0), open_fds(b.pid)
        assert held(b, "region0") == held(b, "region2") == 1
        # SET_MEM_TABLE replaces them all: one fd for each of its two regions, nothing of the old table.
        table = MemoryTable.build({"num_regions": 2, "regions": [
            dict(guest_phys_addr=0, memory_size=MIB, userspace_addr=ram.uva, mmap_offset=0),
            dict(guest_phys_addr=16 * MIB, memory_size=MIB, userspace_addr=0x100000000000, mmap_offset=0),
        ]})
        fe.request(FrontendRequest.SET_MEM_TABLE, table, fds=[ram.fd, extra[0]])
        assert wait_until(lambda: held(b, "region2") == 0), open_fds(b.pid)
        assert held(b, "ram") == held(b, "region0") == 1, open_fds(b.pid)
    finally:
        fe.close()
        ram.close()
        for fd in extra:
            os.close(fd)
    assert wait_until(lambda: held(b, "ram") == 0 and held(b, "region0") == 0), open_fds(b.pid)


def _region_payload(size: int) -> bytes:
    """A valid region message (1 MiB at gpa 0 from offset 0), cut or padded with zeros to `size` bytes."""
    body = SingleMemoryRegion.build({"region": dict(guest_phys_addr=0, memory_size=MIB,
                                                    userspace_addr=0x10000000, mmap_offset=0)})
    assert len(body) == REGION_MSG_SIZE
    return (body + bytes(max(0, size - len(body))))[:size]


def _send(s: socket.socket, request: int, payload: bytes, fd: int | None) -> None:
    frame = struct.pack("<III", request, 0x1, len(payload)) + payload
    fds = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
    s.sendmsg([frame], fds)


@pytest.mark.parametrize("request_, size", [
    (FrontendRequest.ADD_MEM_REG, 104),  # seen accepted: a trailing 64 bytes were ignored
    (FrontendRequest.ADD_MEM_REG, 48),  # the XEN_MMAP layout, which is not negotiated
    (FrontendRequest.ADD_MEM_REG, 36),  # a 32-bit padding field
    (FrontendRequest.REM_MEM_REG, 104),
    (FrontendRequest.REM_MEM_REG, 36),
], ids=["add-104", "add-48", "add-36", "rem-104", "rem-36"])
def test_region_messages_of_the_wrong_size_close_the_connection(echo_backend: BackendProcess,
                                                                 request_: FrontendRequest, size: int) -> None:
    b = echo_backend
    baseline = fd_count(b.pid)
    fd = memfd("wrongsize")
    s = raw(b)
    try:
        _send(s, request_, _region_payload(size), fd if request_ == FrontendRequest.ADD_MEM_REG else None)
        assert closed_by_peer(s)
    finally:
        s.close()
        os.close(fd)
    assert "payload of" in b.log() and f"expected {REGION_MSG_SIZE}" in b.log()
    assert_no_leak(b, baseline)
    still_serving(b)


def test_region_messages_of_the_exact_size_are_served(echo_backend: BackendProcess) -> None:
    """The control for the test above: the same bytes at 40 add the region (held once) and remove it again."""
    b = echo_backend
    baseline = fd_count(b.pid)
    fd = memfd("exactsize")
    s = raw(b)
    try:
        _send(s, FrontendRequest.ADD_MEM_REG, _region_payload(REGION_MSG_SIZE), fd)
        _send(s, FrontendRequest.GET_QUEUE_NUM, b"", None)
        assert s.recv(64) == struct.pack("<III", FrontendRequest.GET_QUEUE_NUM, 0x5, 8) + build_u64(2)
        assert held(b, "exactsize") == 1, open_fds(b.pid)
        _send(s, FrontendRequest.REM_MEM_REG, _region_payload(REGION_MSG_SIZE), None)
        _send(s, FrontendRequest.GET_QUEUE_NUM, b"", None)
        assert s.recv(64) == struct.pack("<III", FrontendRequest.GET_QUEUE_NUM, 0x5, 8) + build_u64(2)
        assert wait_until(lambda: held(b, "exactsize") == 0), open_fds(b.pid)
    finally:
        s.close()
        os.close(fd)
    assert_no_leak(b, baseline)
