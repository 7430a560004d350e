"""Malformed and hostile input from a front end: each gets a failure ack, a logged refusal, or a clean close of
that connection — and the process keeps serving the next front end with no fd left behind."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable

import pytest

from tests.conftest import assert_no_leak, closed_by_peer, raw, still_serving
from vgpu.conformance.process import BackendProcess
from vgpu.procfs import fd_count, open_fds, wait_until
from vgpu.vhost_user.driver import GuestRam
from vgpu.vhost_user.frontend import Frontend, FrontendError, build_vring_addr
from vgpu.vhost_user.wire import FrontendRequest, build_u64

Check = Callable[[Frontend], None]


@pytest.fixture
def baseline(echo_backend: BackendProcess) -> int:
    return fd_count(echo_backend.pid)


@pytest.mark.parametrize(
    "frame",
    [
        struct.pack("<III", FrontendRequest.GET_FEATURES, 0x2, 0),  # version 2
        struct.pack("<III", FrontendRequest.GET_FEATURES, 0x0, 0),  # version 0
        struct.pack("<III", FrontendRequest.SET_FEATURES, 0x1, 1 << 30),  # absurd size
        struct.pack("<III", FrontendRequest.SET_FEATURES, 0x1, 4) + b"\0" * 4,  # u64 request with 4 bytes
        struct.pack("<III", FrontendRequest.SET_VRING_NUM, 0x1, 12) + b"\0" * 12,  # state with 12 bytes
        struct.pack("<III", FrontendRequest.SET_MEM_TABLE, 0x1, 8 + 32) + struct.pack("<II", 2, 0) + bytes(32),
        struct.pack("<III", FrontendRequest.SET_MEM_TABLE, 0x1, 8 + 9 * 32) + struct.pack("<II", 9, 0)
        + bytes(9 * 32),
        struct.pack("<III", 999, 0x1, 0),  # unknown request without NEED_REPLY
        struct.pack("<III", FrontendRequest.GET_INFLIGHT_FD, 0x1, 0),  # needs an answer we cannot give
    ],
    ids=["version2", "version0", "huge-size", "short-u64", "long-state", "table-size-mismatch",
         "nine-regions", "unknown-request", "unsupported-needs-answer"],
)
def test_protocol_violations_close_the_connection(echo_backend: BackendProcess, baseline: int,
                                                  frame: bytes) -> None:
    s = raw(echo_backend)
    s.sendall(frame)
    assert closed_by_peer(s)
    s.close()
    assert_no_leak(echo_backend, baseline)
    still_serving(echo_backend)


def test_unknown_request_with_need_reply_gets_a_failure_ack(echo_backend: BackendProcess) -> None:
    s = raw(echo_backend)
    s.sendall(struct.pack("<III", 999, 0x9, 0))
    assert s.recv(64) == struct.pack("<III", 999, 0x5, 8) + build_u64(1)
    s.close()


def test_fds_where_none_belong_are_closed(echo_backend: BackendProcess, baseline: int) -> None:
    fe = Frontend.connect(echo_backend.socket_path)
    try:
        fe.negotiate()
        extra = [os.memfd_create(f"stray{i}") for i in range(3)]
        fe.send(FrontendRequest.GET_QUEUE_NUM, fds=extra)
        assert fe.recv().payload == build_u64(2)
        for fd in extra:
            os.close(fd)
        # Held while connected: the connection's own fds only (socket, back-end channel, epoll).
        assert fd_count(echo_backend.pid) <= baseline + 4
        assert not any("stray" in f for f in open_fds(echo_backend.pid))
    finally:
        fe.close()
    assert_no_leak(echo_backend, baseline)


def test_too_many_fds_close_the_connection(echo_backend: BackendProcess, baseline: int) -> None:
    s = raw(echo_backend)
    fds = [os.memfd_create(f"many{i}") for i in range(12)]
    try:
        hdr = struct.pack("<III", FrontendRequest.GET_QUEUE_NUM, 0x1, 0)
        s.sendmsg([hdr], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        assert closed_by_peer(s)
    finally:
        for fd in fds:
            os.close(fd)
        s.close()
    assert_no_leak(echo_backend, baseline)
    still_serving(echo_backend)


def _region(gpa: int, size: int, uva: int, off: int = 0) -> dict[str, int]:
    return dict(guest_phys_addr=gpa, memory_size=size, userspace_addr=uva, mmap_offset=off)


REFUSALS: dict[str, Check] = {}


def refusal(f: Check) -> Check:
    REFUSALS[f.__name__] = f
    return f


@refusal
def overlapping_regions(fe: Frontend) -> None:
    a, b = GuestRam(1 << 20), GuestRam(1 << 20)
    try:
        fe.add_mem_reg(0, a.size, a.uva, 0, a.fd)
        fe.add_mem_reg(0x80000, b.size, b.uva, 0, b.fd)
    finally:
        a.close()
        b.close()


@refusal
def zero_sized_region(fe: Frontend) -> None:
    a = GuestRam(1 << 20)
    try:
        fe.add_mem_reg(0, 0, a.uva, 0, a.fd)
    finally:
        a.close()


@refusal
def region_past_end_of_file(fe: Frontend) -> None:
    a = GuestRam(1 << 20)
    try:
        fe.add_mem_reg(0, 1 << 30, a.uva, 0, a.fd)
    finally:
        a.close()


@refusal
def remove_unknown_region(fe: Frontend) -> None:
    fe.rem_mem_reg(0x1234000, 4096, 0x5678000)


@refusal
def vring_address_outside_memory(fe: Frontend) -> None:
    a = GuestRam(1 << 20)
    try:
        fe.add_mem_reg(0, a.size, a.uva, 0, a.fd)
        fe.request(FrontendRequest.SET_VRING_NUM, struct.pack("<II", 0, 64), need_reply=True)
        fe.request(FrontendRequest.SET_VRING_ADDR, build_vring_addr(0, a.uva + a.size, a.uva, a.uva),
                   need_reply=True)
    finally:
        a.close()


@refusal
def queue_size_not_power_of_two(fe: Frontend) -> None:
    fe.request(FrontendRequest.SET_VRING_NUM, struct.pack("<II", 0, 100), need_reply=True)


@refusal
def queue_size_too_large(fe: Frontend) -> None:
    fe.request(FrontendRequest.SET_VRING_NUM, struct.pack("<II", 0, 65536), need_reply=True)


@refusal
def queue_index_out_of_range(fe: Frontend) -> None:
    fe.request(FrontendRequest.SET_VRING_NUM, struct.pack("<II", 7, 64), need_reply=True)


@refusal
def kick_without_fd(fe: Frontend) -> None:
    fe.request(FrontendRequest.SET_VRING_KICK, build_u64(0), need_reply=True)


@refusal
def kick_fd_that_cannot_be_polled(fe: Frontend) -> None:
    """Found by the fuzzer (tools/vgpu_fuzz/reproducers/vhost_user): epoll refuses a memfd, and the kick was
    recorded before the refusal, so closing the connection raised KeyError and took the process down."""
    fd = os.memfd_create("not-an-eventfd")
    try:
        fe.request(FrontendRequest.SET_VRING_KICK, build_u64(0), fds=[fd], need_reply=True)
    finally:
        os.close(fd)


@refusal
def log_fd(fe: Frontend) -> None:
    fd = os.memfd_create("log")
    try:
        fe.request(FrontendRequest.SET_LOG_FD, fds=[fd], need_reply=True)
    finally:
        os.close(fd)


@refusal
def gpu_socket_that_is_not_a_socket(fe: Frontend) -> None:
    fd = os.memfd_create("not-a-socket")
    try:
        fe.request(FrontendRequest.GPU_SET_SOCKET, fds=[fd], need_reply=True)
    finally:
        os.close(fd)


@refusal
def backend_channel_that_is_not_a_socket(fe: Frontend) -> None:
    r, w = os.pipe()
    try:
        fe.request(FrontendRequest.SET_BACKEND_REQ_FD, fds=[r], need_reply=True)
    finally:
        os.close(r)
        os.close(w)


@refusal
def datagram_backend_channel(fe: Frontend) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        fe.request(FrontendRequest.SET_BACKEND_REQ_FD, fds=[b.fileno()], need_reply=True)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refusals_get_a_failure_ack_and_leave_nothing_behind(echo_backend: BackendProcess, baseline: int,
                                                             name: str) -> None:
    fe = Frontend.connect(echo_backend.socket_path)
    try:
        fe.negotiate()
        with pytest.raises(FrontendError, match="refused"):
            REFUSALS[name](fe)
        # The connection is still good after the refusal.
        assert fe.u64(FrontendRequest.GET_QUEUE_NUM) == 2
    finally:
        fe.close()
    assert_no_leak(echo_backend, baseline)


def test_a_kick_fd_that_is_no_eventfd_leaves_the_ring_polled(echo_backend: BackendProcess, baseline: int) -> None:
    """Found by the fuzzer (tools/vgpu_fuzz/reproducers/vhost_user): a pipe as the kick fd, readable at its end,
    made eventfd_read raise OSError out of the session loop and ended the whole process."""
    fe = Frontend.connect(echo_backend.socket_path)
    ram = GuestRam(1 << 20)
    r, w = os.pipe()
    os.close(w)  # readable at once: end of file
    try:
        fe.negotiate()
        fe.share_memory(ram)
        fe.setup_queue(0, 64)
        fe.request(FrontendRequest.SET_VRING_KICK, build_u64(0), fds=[r], need_reply=True)
        assert fe.submit(0, b"polled", 8) == b"polled"
    finally:
        os.close(r)
        fe.close()
        ram.close()
    assert_no_leak(echo_backend, baseline)
    still_serving(echo_backend)


def test_a_call_fd_nobody_reads_is_dropped_without_a_traceback(echo_backend: BackendProcess, baseline: int) -> None:
    """A pipe whose reader is gone as the call fd: the interrupt fails with EPIPE. The chain is answered, the fd is
    dropped with a warning, and nothing reaches the loop's catch-all for device bugs (a traceback in the log)."""
    fe = Frontend.connect(echo_backend.socket_path)
    ram = GuestRam(1 << 20)
    r, w = os.pipe()
    os.close(r)
    try:
        fe.negotiate()
        fe.share_memory(ram)
        fe.setup_queue(0, 64)
        fe.request(FrontendRequest.SET_VRING_CALL, build_u64(0), fds=[w], need_reply=True)
        assert fe.submit(0, b"answered", 8) == b"answered"
        assert fe.submit(0, b"again", 8) == b"again"
    finally:
        os.close(w)
        fe.close()
        ram.close()
    assert_no_leak(echo_backend, baseline)
    assert "call fd" in echo_backend.log() and "Traceback" not in echo_backend.log(), echo_backend.log()


def test_bad_chains_are_answered_and_the_queue_keeps_going(echo_backend: BackendProcess) -> None:
    fe = Frontend.connect(echo_backend.socket_path)
    ram = GuestRam(1 << 20)
    try:
        fe.negotiate()
        fe.share_memory(ram)
        q = fe.setup_queue(0, 64)
        bad = q.add_raw([(ram.size + 0x1000, 64, False)])  # outside guest memory
        q.publish(bad)
        q.kick(force=True)
        assert wait_until(lambda: q.used_idx() == 1)
        ((done, written),) = q.collect()
        assert done is bad and written == 0
        assert fe.submit(0, b"next one", 16) == b"next one"
        assert "not inside one memory region" in echo_backend.log()
    finally:
        fe.close()
        ram.close()


def test_half_a_message_then_disconnect(echo_backend: BackendProcess, baseline: int) -> None:
    ended = echo_backend.log().count("front end disconnected")
    s = raw(echo_backend)
    fd = os.memfd_create("half")
    s.sendmsg([struct.pack("<III", FrontendRequest.ADD_MEM_REG, 1, 40) + bytes(10)],
              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
    os.close(fd)
    s.close()
    # The client is gone before the back end may even have accepted it: wait until it has seen the end.
    assert wait_until(lambda: echo_backend.log().count("front end disconnected") > ended, 10), echo_backend.log()
    assert_no_leak(echo_backend, baseline)
    still_serving(echo_backend)
    assert wait_until(echo_backend.alive)
