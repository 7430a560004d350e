"""Guest memory regions as the front end hands them over: every accepted region holds exactly one fd in the back
end (the one it received, which udmabuf creation over guest RAM needs), none once removed; and the region
messages must be exactly the size the protocol gives them, bytes on the wire."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from tests.conftest import BackendProcess, fd_count, open_fds, wait_until
from tests.test_vhost_user_bad_input import assert_no_leak, closed_by_peer, raw, still_serving
from vgpu.vhost_user.wire import FrontendRequest, SingleMemoryRegion, build_u64

MIB = 1 << 20
#: u64 padding + one region descriptor (guest address, size, user address, mmap offset): vhost-user's layout.
REGION_MSG_SIZE = 8 + 4 * 8


def memfd(name: str, size: int = MIB) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def held(b: BackendProcess, name: str) -> int:
    """How many of the back end's fds point at the memfd called `name`."""
    return sum(1 for target in open_fds(b.pid) if f"memfd:{name} " in target + " ")


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
