"""Random vhost-user messages (any request id, any payload, with and without NEED_REPLY) against a live back end:
the process never dies, answers or closes that connection, and holds no fd more than before afterwards."""

from __future__ import annotations

import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import start_backend
from vgpu.conformance.process import BackendProcess
from vgpu.procfs import fd_count, wait_until
from vgpu.vhost_user.wire import FrontendRequest


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendProcess]:
    tmp: Path = tmp_path_factory.mktemp("vufuzz")
    b = start_backend([sys.executable, "-m", "vgpu", "--log-level=error"], tmp, "vgpu")
    yield b
    b.stop()


message = st.tuples(
    st.integers(0, 50),                      # request id (44 is the last defined)
    st.sampled_from([0x1, 0x9, 0x5, 0x0]),   # version 1, +NEED_REPLY, a bogus REPLY, a bad version
    st.binary(max_size=80),
    st.integers(0, 2),                       # fds to attach
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msgs=st.lists(message, min_size=1, max_size=6))
def test_random_messages(backend: BackendProcess, msgs: list[tuple[int, int, bytes, int]]) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(backend.socket_path)
    # Answers come within milliseconds; a connection left open is drained this long (200 examples wait for it).
    s.settimeout(0.2)
    try:
        # Negotiate REPLY_ACK so NEED_REPLY means something.
        s.sendall(struct.pack("<III", FrontendRequest.SET_PROTOCOL_FEATURES, 1, 8) + struct.pack("<Q", 1 << 3))
        for req, flags, payload, nfds in msgs:
            fds = [os.memfd_create("fuzz") for _ in range(nfds)]
            try:
                data = struct.pack("<III", req, flags, len(payload)) + payload
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{nfds}i", *fds))] if fds else []
                s.sendmsg([data], anc)
            except (BrokenPipeError, ConnectionResetError):
                break
            finally:
                for fd in fds:
                    os.close(fd)
        try:
            while s.recv(65536):
                pass
        except (TimeoutError, ConnectionResetError):
            pass
    finally:
        s.close()
    assert backend.alive(), backend.log()


def test_nothing_left_behind(backend: BackendProcess) -> None:
    assert backend.alive()
    # Idle: listening socket, stop pipe, the selector; every fuzzed connection's fds are gone.
    assert wait_until(lambda: fd_count(backend.pid) <= 8), os.listdir(f"/proc/{backend.pid}/fd")
