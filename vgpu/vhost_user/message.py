"""vhost-user message framing: bytes and fds in, messages out (no socket in here), plus the socket edge.

Framing is kept apart from sockets in the manner of h11 so that every malformed header can be tested by feeding
bytes.  fds arrive as SCM_RIGHTS on the recvmsg that carries the first byte of their message's header; the decoder
attaches every fd received while a message is being assembled to that message, and closes fds that belong to
no message.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from .wire import (
    FLAG_REPLY,
    HEADER_SIZE,
    HEADER_ST,
    MAX_FDS,
    MAX_PAYLOAD,
    VERSION_MASK,
    VHOST_USER_VERSION,
    build_header,
)

#: What a payload part may be (collections.abc.Buffer is Python 3.12+).
Buffer: TypeAlias = bytes | bytearray | memoryview


class ProtocolError(Exception):
    """The peer broke the framing; the only safe answer is to close the connection."""


class PeerClosed(ProtocolError):
    """The peer closed its end."""


class MissingFd(Exception):
    """A request that must carry an fd came without one: refused, but the framing is intact."""


@dataclass(slots=True)
class Message:
    """One framed message; owns its fds until someone takes them."""

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    def take_fd(self) -> int:
        """The single fd this request must carry; any extra fds are closed."""
        if not self.fds:
            raise MissingFd(f"request {self.request} carries no fd")
        fd, *extra = self.take_fds()
        for e in extra:
            os.close(e)
        return fd

    def close_fds(self) -> None:
        for fd in self.take_fds():
            os.close(fd)


class MessageDecoder:
    """Accumulates received bytes and fds and yields complete messages.

    A stream socket glues several messages into one recvmsg, and the kernel ends a read right after the data that
    carried fds; so fds belong to the message holding the *last* byte received with them (whether the peer sent
    the whole message in one sendmsg, as QEMU does, or the header alone with the fds).
    """

    def __init__(self, check_version: bool = True, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._start = 0  # stream offset of _buf[0]
        self._fds: list[tuple[int, list[int]]] = []  # (stream offset of the last byte they came with, fds)
        self._check_version = check_version
        self._max_payload = max_payload
        self._hdr: tuple[int, int, int] | None = None  # (request, flags, size) of the message being assembled

    def feed(self, data: bytes, fds: list[int]) -> None:
        if fds and not data:
            for fd in fds:
                os.close(fd)
            raise ProtocolError("fds received without data")
        self._buf += data
        if fds:
            self._fds.append((self._start + len(self._buf) - 1, list(fds)))
            if sum(len(f) for _, f in self._fds) > MAX_FDS and len(self._fds) == 1:
                self.close()
                raise ProtocolError(f"more than {MAX_FDS} fds attached to one message")

    def next_message(self) -> Message | None:
        if len(self._buf) < HEADER_SIZE:
            return None
        hdr = self._hdr
        if hdr is None:
            # Parsed once per message, not once per read: a frame on the display socket arrives in ~130 reads.
            hdr = self._hdr = HEADER_ST.unpack_from(self._buf)
            if self._check_version and hdr[1] & VERSION_MASK != VHOST_USER_VERSION:
                raise ProtocolError(f"bad version in flags {hdr[1]:#x}")
            if hdr[2] > self._max_payload:
                raise ProtocolError(f"payload of {hdr[2]} bytes exceeds {self._max_payload}")
        request, flags, size = hdr
        end = HEADER_SIZE + size
        if len(self._buf) < end:
            return None
        self._hdr = None
        with memoryview(self._buf) as mv:
            payload = bytes(mv[HEADER_SIZE:end])  # one copy (a bytearray slice would make two)
        del self._buf[:end]
        last = self._start + end - 1
        self._start += end
        fds: list[int] = []
        while self._fds and self._fds[0][0] <= last:
            fds.extend(self._fds.pop(0)[1])
        msg = Message(request, flags, payload, fds)
        if len(fds) > MAX_FDS:
            msg.close_fds()
            raise ProtocolError(f"more than {MAX_FDS} fds attached to one message")
        return msg

    @property
    def pending(self) -> bool:
        return bool(self._buf)

    def close(self) -> None:
        for _, fds in self._fds:
            for fd in fds:
                os.close(fd)
        self._fds = []
        self._buf.clear()
        self._hdr = None


_FD_SPACE: Final = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


def recv_with_fds(sock: socket.socket, bufsize: int) -> tuple[bytes, list[int]]:
    """One recvmsg; returns data and every fd that came with it (truncated control data is a protocol error,
    after closing what did arrive)."""
    # Never block: an event loop may act on a readiness report that a nested wait has since made stale.
    data, anc, flags, _ = sock.recvmsg(bufsize, _FD_SPACE, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
    fds: list[int] = []
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(cdata[: len(cdata) - len(cdata) % arr.itemsize])
            fds.extend(arr)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise ProtocolError("too many fds attached (control data truncated)")
    return data, fds


class Channel:
    """A vhost-user (or vhost-user-gpu) stream socket: send framed messages, receive them with their fds."""

    def __init__(self, sock: socket.socket, check_version: bool = True, max_payload: int = MAX_PAYLOAD) -> None:
        self.sock = sock
        self._decoder = MessageDecoder(check_version, max_payload)
        self._ready: list[Message] = []
        self.closed = False
        # Replies owed to requests we stopped waiting for, by request number: counted per channel, because the
        # display socket and the back-end channel number their requests independently (and replies carry no id).
        self.abandoned: dict[int, int] = {}

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, request: int, flags: int, payload: bytes | Sequence[Buffer] = b"", fds: list[int] | None = None,
             wait_writable: Callable[[], None] | None = None) -> None:
        """Send one message.  The payload may be given in parts (a fixed struct and a frame of pixels): they leave
        through sendmsg, gathered by the kernel, so a large payload is never copied to be framed.  With
        `wait_writable`, never block in the kernel: when the socket is full, call it (it returns once the socket
        can take more, or raises), so the caller can serve other sockets meanwhile."""
        views = [memoryview(p).cast("B") for p in ([payload] if isinstance(payload, bytes) else payload)]
        views.insert(0, memoryview(build_header(request, flags, sum(len(v) for v in views))))
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        mode = 0 if wait_writable is None else socket.MSG_DONTWAIT
        while views:
            try:
                sent = self.sock.sendmsg(views, ancillary, mode)
            except BlockingIOError:
                if wait_writable is None:
                    raise
                wait_writable()
                continue
            ancillary = []  # the fds travel with the first bytes
            while sent:  # drop what went, keep the rest of a part cut short
                if sent >= len(views[0]):
                    sent -= len(views.pop(0))
                else:
                    views[0] = views[0][sent:]
                    sent = 0
            while views and not len(views[0]):
                views.pop(0)

    def send_reply(self, request: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
        self.send(request, VHOST_USER_VERSION | FLAG_REPLY, payload, fds)

    def fill(self) -> None:
        """Read what the socket has (one recvmsg) into the decoder; raises PeerClosed at EOF."""
        try:
            data, fds = recv_with_fds(self.sock, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError as e:
            raise PeerClosed(str(e)) from e
        if not data:
            for fd in fds:
                os.close(fd)
            raise PeerClosed("peer closed the connection")
        self._decoder.feed(data, fds)
        while (msg := self._decoder.next_message()) is not None:
            self._ready.append(msg)

    def poll(self) -> Message | None:
        """A message already decoded, if any (no I/O)."""
        return self._ready.pop(0) if self._ready else None

    def recv(self) -> Message:
        """Block until a whole message is here."""
        while not self._ready:
            select.select([self.sock], [], [])
            self.fill()
        return self._ready.pop(0)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for msg in self._ready:
            msg.close_fds()
        self._ready.clear()
        self._decoder.close()
        with contextlib.suppress(OSError):
            self.sock.close()
