"""A front-end request that breaks the protocol while the back end waits for the front end's ack of a request of its
own must end the connection, as it does anywhere else.  The wait here is the CONFIG_CHANGE_MSG the GPU device
sends once the display socket has answered; the front end holds its ack until the violation has been sent.
(Once the error unwound through the device's display callback into the loop's catch-all: logged as a failed
callback, the display socket unwatched, the connection left open.)"""

from __future__ import annotations

import select
import socket
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import start_backend
from vgpu.session import Session, make_display
from vgpu.vhost_user.frontend import Frontend
from vgpu.vhost_user.message import Message
from vgpu.vhost_user.wire import BackendRequest

UNKNOWN = 201  # no such vhost-user request; sent without NEED_REPLY it is a protocol violation


def closes(sock: socket.socket, timeout: float) -> bool:
    readable, _, _ = select.select([sock], [], [], timeout)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except ConnectionResetError:
        return True


def test_a_protocol_violation_during_a_nested_wait_ends_the_connection(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    asked, release = threading.Event(), threading.Event()
    real = Frontend._on_backend_request

    def held(self: Frontend, msg: Message) -> None:
        if msg.request == BackendRequest.CONFIG_CHANGE_MSG:
            asked.set()
            release.wait(30)
        real(self, msg)

    monkeypatch.setattr(Frontend, "_on_backend_request", held)
    b = start_backend([sys.executable, "-m", "vgpu", "--log-level=info"], tmp_path, "vgpu")
    # With a display: the back end then asks the front end about its layout (CONFIG_CHANGE_MSG) and waits.
    sess = Session.open(b.socket_path, display=make_display())
    try:
        assert asked.wait(30), "the back end sent no CONFIG_CHANGE_MSG: this test lost its premise"
        sess.fe.send(UNKNOWN, bytes(8))
        closed = closes(sess.fe.channel.sock, 10.0)
    finally:
        release.set()
        sess.fe.close()
        sess.ram.close()
        b.stop()
    log = b.log()
    assert "protocol violation" in log and "callback for fd" not in log, log
    assert closed
