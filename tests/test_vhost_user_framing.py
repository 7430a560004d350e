"""Message framing as bytes and fds in, messages out — and over a real socketpair, where the kernel glues
messages into one read and ends the read after the data that carried fds."""

from __future__ import annotations

import os
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vgpu.vhost_user.message import Channel, MessageDecoder, ProtocolError
from vgpu.vhost_user.wire import FrontendRequest, build_header


def frame(req: int, payload: bytes = b"", flags: int = 1) -> bytes:
    return build_header(req, flags, len(payload)) + payload


def memfds(n: int) -> list[int]:
    return [os.memfd_create(f"t{i}") for i in range(n)]


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_fds_go_to_the_message_holding_the_last_byte() -> None:
    d = MessageDecoder()
    fds = memfds(1)
    d.feed(frame(8, bytes(8)) + frame(10, bytes(8)) + frame(13, bytes(8)), fds)
    msgs = [d.next_message() for _ in range(3)]
    assert [m.request for m in msgs if m] == [8, 10, 13]
    assert [m.fds for m in msgs if m] == [[], [], fds]
    assert d.next_message() is None
    for m in msgs:
        assert m is not None
        m.close_fds()


def test_header_sent_alone_with_its_fds() -> None:
    d = MessageDecoder()
    fds = memfds(2)
    whole = frame(5, bytes(8 + 64))
    d.feed(whole[:12], fds)
    assert d.next_message() is None
    d.feed(whole[12:], [])
    m = d.next_message()
    assert m is not None and m.request == 5 and m.fds == fds
    m.close_fds()


def test_partial_messages_reassemble() -> None:
    d = MessageDecoder()
    data = frame(2, struct.pack("<Q", 7)) + frame(3)
    for b in data[:-1]:
        d.feed(bytes([b]), [])
    first = d.next_message()
    assert first is not None and first.payload == struct.pack("<Q", 7)
    assert d.next_message() is None
    d.feed(data[-1:], [])
    second = d.next_message()
    assert second is not None and second.request == 3


@pytest.mark.parametrize("flags", [0, 2, 3])
def test_bad_version(flags: int) -> None:
    d = MessageDecoder()
    d.feed(frame(1, flags=flags), [])
    with pytest.raises(ProtocolError, match="version"):
        d.next_message()


def test_display_socket_framing_ignores_version_bits() -> None:
    d = MessageDecoder(check_version=False)
    d.feed(frame(3, flags=0), [])
    m = d.next_message()
    assert m is not None and m.request == 3


def test_oversized_payload_is_refused_before_it_arrives() -> None:
    d = MessageDecoder()
    d.feed(build_header(5, 1, 1 << 24), [])
    with pytest.raises(ProtocolError, match="exceeds"):
        d.next_message()


def test_too_many_fds_are_closed() -> None:
    d = MessageDecoder()
    fds = memfds(9)
    with pytest.raises(ProtocolError, match="more than 8"):
        d.feed(frame(5), fds)
    assert not any(is_open(fd) for fd in fds)


def test_close_releases_unclaimed_fds() -> None:
    d = MessageDecoder()
    fds = memfds(2)
    d.feed(frame(5, bytes(40))[:20], fds)
    d.close()
    assert not any(is_open(fd) for fd in fds)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(1, 40), max_size=10))
def test_arbitrary_bytes_in_any_chunking_never_crash(data: bytes, cuts: list[int]) -> None:
    d = MessageDecoder()
    pos = 0
    try:
        for c in [*cuts, len(data)]:
            d.feed(data[pos:pos + c], [])
            pos += c
            while d.next_message() is not None:
                pass
    except ProtocolError:
        pass


def test_real_socket_glues_messages_and_fds_land_right() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ch = Channel(b)
    fds = memfds(2)
    try:
        a.sendall(frame(FrontendRequest.SET_VRING_NUM, bytes(8)))
        a.sendall(frame(FrontendRequest.SET_VRING_BASE, bytes(8)))
        a.sendmsg([frame(FrontendRequest.SET_VRING_CALL, bytes(8))],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fds[0]))])
        a.sendmsg([frame(FrontendRequest.SET_VRING_KICK, bytes(8))],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fds[1]))])
        got = [ch.recv() for _ in range(4)]
        assert [m.request for m in got] == [8, 10, 13, 12]
        assert [len(m.fds) for m in got] == [0, 0, 1, 1]
        # The received fds are the ones sent, in order (compare the memfd names).
        names = [os.readlink(f"/proc/self/fd/{m.fds[0]}") for m in got[2:]]
        assert names == ["/memfd:t0 (deleted)", "/memfd:t1 (deleted)"]
        for m in got:
            m.close_fds()
    finally:
        for fd in fds:
            os.close(fd)
        a.close()
        ch.close()


def test_fill_never_blocks_on_a_stale_readiness_report() -> None:
    """An event loop can act on a 'readable' report that a nested wait has since consumed: the read must not
    block (it did once, stalling the device until the VMM gave up)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ch = Channel(b)
    try:
        b.settimeout(None)  # a blocking socket, as the back end's channels are
        ch.fill()  # nothing to read: returns at once instead of waiting for data
        assert ch.poll() is None
        a.sendall(frame(FrontendRequest.GET_FEATURES))
        msg = ch.recv()
        assert msg.request == FrontendRequest.GET_FEATURES
    finally:
        a.close()
        ch.close()
