"""Entry point (b): front-end messages through a real session, as the back-end program serves a connection.

Each input is one connection: a fresh `GpuDevice` and the product's `serve_connection` on one end of a real Unix
socketpair, exactly what the accept loop runs for a VMM. A thread plays the front end on the other end: it sends
the input's messages (framed, with real fds attached: memfds, eventfds, sockets, pipes; or raw bytes), shuts its
sending side, and reads every reply until the back end closes, so a back end that answers a lot never blocks on
a full socket. The session ends at the front end's EOF (or earlier, at a protocol violation), as it would for a
VMM that sent these messages and left.

Checked per input: the session ends (a thread that is still sending or reading after the session returned is a
hang), the product caught no unexpected exception (`checks`), and every fd the connection took is closed again:
the process holds exactly the fds it held before the input (the caller compares).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from typing import Final

from vgpu.blob.allocators import MemfdAllocator
from vgpu.blob.resolve import Resolver
from vgpu.gpu.device import GpuDevice
from vgpu.vhost_user.server import serve_connection
from vgpu.vhost_user.wire import build_header

from .checks import Hang
from .commands import CONFIG, LIMITS
from .inputs import PAGE, FdKind, FdSpec, Framed, Raw, Record, parse_vhost_user

#: How long the front-end thread may take after the session ended (it only has replies left to read).
JOIN_TIMEOUT: Final = 10.0
MAX_MESSAGES: Final = 256


class VhostUserTarget:
    """`run(data)` serves one connection made of the input's messages; returns the messages sent."""

    name = "vhost_user"

    def __init__(self) -> None:
        self.allocator = MemfdAllocator(max_size=LIMITS.max_host_bytes)
        self.resolver = Resolver()

    def run(self, data: bytes) -> int:
        records = parse_vhost_user(data)[:MAX_MESSAGES]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        held: list[socket.socket] = []  # our ends of the sockets we hand over
        frontend = _Frontend(ours, records, held)
        try:
            frontend.start()
            serve_connection(GpuDevice(CONFIG, self.allocator, self.resolver), theirs)
            frontend.join(JOIN_TIMEOUT)
            if frontend.is_alive():
                # The back end closed its end, so the thread can only be stuck on a socket of ours: shut them all
                # to let it finish, then report.
                ours.shutdown(socket.SHUT_RDWR)
                frontend.join(JOIN_TIMEOUT)
                raise Hang(f"the front end was still talking {JOIN_TIMEOUT:.0f} s after the session ended")
        finally:
            ours.close()
            for s in held:
                s.close()
        return len(records)

    def close(self) -> None:
        pass


class _Frontend(threading.Thread):
    """Sends the records, shuts down its sending side, reads until the back end closes."""

    def __init__(self, sock: socket.socket, records: list[Record], held: list[socket.socket]) -> None:
        super().__init__(daemon=True, name="fuzz-frontend")
        self.sock = sock
        self.records = records
        # Every fd is made before the thread starts, so the input alone decides them.
        self.fds = [_make_fds(r.fds, held) if isinstance(r, Framed) else [] for r in records]

    def run(self) -> None:
        try:
            for rec, fds in zip(self.records, self.fds, strict=True):
                try:
                    if isinstance(rec, Raw):
                        self.sock.sendall(rec.data)
                        continue
                    data = build_header(rec.request, rec.flags, len(rec.payload)) + rec.payload
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
                    self.sock.sendmsg([data], anc)
                except OSError:
                    break  # the back end closed the connection (a protocol violation ends it)
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            _read_until_closed(self.sock)
        finally:
            for fds in self.fds:
                for fd in fds:
                    os.close(fd)


def _make_fds(specs: tuple[FdSpec, ...], held: list[socket.socket]) -> list[int]:
    out = []
    for spec in specs:
        if spec.kind == FdKind.MEMFD:
            fd = os.memfd_create("fuzz-guest-ram", os.MFD_CLOEXEC)
            os.ftruncate(fd, spec.pages * PAGE)
            if spec.content and spec.pages:
                os.pwrite(fd, spec.content[:spec.pages * PAGE], 0)
            out.append(fd)
        elif spec.kind == FdKind.EVENTFD:
            out.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        elif spec.kind == FdKind.SOCKET:
            mine, given = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            mine.setblocking(False)
            held.append(mine)
            out.append(given.detach())
        else:
            r, w = os.pipe2(os.O_CLOEXEC)
            os.close(w)
            out.append(r)
    return out


def _read_until_closed(sock: socket.socket) -> None:
    while True:
        try:
            data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
        except OSError:
            return
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for (fd,) in struct.iter_unpack("i", cdata[:len(cdata) - len(cdata) % 4]):
                    os.close(fd)
        if not data:
            return
