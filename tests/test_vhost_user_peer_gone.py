"""A front end that vanishes while the back end is answering it (QEMU killed mid-request) costs that connection
only: the reply's EPIPE must not take the process down, and the next front end is served."""

from __future__ import annotations

import socket

from vgpu.conformance.process import BackendProcess
from vgpu.procfs import fd_count, wait_until
from vgpu.vhost_user.frontend import Frontend
from vgpu.vhost_user.wire import VHOST_USER_VERSION, FrontendRequest, build_header


def test_replies_to_a_vanished_front_end_do_not_kill_the_back_end(echo_backend: BackendProcess) -> None:
    baseline = fd_count(echo_backend.pid)
    for _ in range(3):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(echo_backend.socket_path)
            # Many requests that each want an answer, then gone before any answer is read: at least one reply
            # meets a closed peer.
            s.sendall(build_header(FrontendRequest.GET_FEATURES, VHOST_USER_VERSION, 0) * 200)
        assert wait_until(lambda: fd_count(echo_backend.pid) == baseline, 10), "the connection was not torn down"
        assert echo_backend.alive(), echo_backend.log()[-2000:]
    with Frontend.connect(echo_backend.socket_path) as fe:
        assert fe.u64(FrontendRequest.GET_FEATURES) != 0
    assert "gone before the reply to request" in echo_backend.log()  # the session ended as a disconnect
