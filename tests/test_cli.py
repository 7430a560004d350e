"""The back-end program conventions: capabilities, exclusive socket options, --fd, prompt exit on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO, start_backend
from vgpu.procfs import wait_until
from vgpu.vhost_user.driver import GuestRam
from vgpu.vhost_user.frontend import Frontend
from vgpu.vhost_user.wire import FrontendRequest

VGPU = [sys.executable, "-m", "vgpu"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VGPU, *args], capture_output=True, text=True, timeout=30, cwd=REPO)


def test_print_capabilities() -> None:
    r = run("--print-capabilities", "--socket-path=/nonexistent/ignored")
    assert r.returncode == 0
    caps = json.loads(r.stdout)
    assert caps["type"] == "gpu"
    assert set(caps["features"]) <= {"render-node", "virgl"}


def test_socket_path_and_fd_are_exclusive() -> None:
    r = run("--socket-path=/tmp/x.sock", "--fd=3")
    assert r.returncode == 2 and "not allowed with" in r.stderr


def test_one_of_socket_path_or_fd_is_required() -> None:
    r = run()
    assert r.returncode == 2 and "--socket-path or --fd" in r.stderr


def test_fd_that_is_not_a_socket_fails_early() -> None:
    r = run("--fd=0")
    assert r.returncode == 1 and "not a socket" in r.stderr


def test_descriptor_file_is_a_gpu_backend() -> None:
    desc = json.loads((REPO / "vgpu/data/50-vgpu.json").read_text())
    assert desc["type"] == "gpu" and desc["binary"].endswith("vhost-user-vgpu")


def test_sigterm_exits_promptly_even_while_serving(tmp_path: Path) -> None:
    b = start_backend(VGPU, tmp_path, "vgpu")
    fe = Frontend.connect(b.socket_path)
    fe.negotiate()
    t0 = time.monotonic()
    b.process.send_signal(signal.SIGTERM)
    assert b.process.wait(5) == 0
    assert time.monotonic() - t0 < 2
    assert not os.path.exists(b.socket_path)
    fe.close()


def test_sigterm_while_idle(tmp_path: Path) -> None:
    b = start_backend(VGPU, tmp_path, "vgpu")
    b.process.send_signal(signal.SIGTERM)
    assert b.process.wait(5) == 0


def test_fd_mode_serves_one_connection_then_exits(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen([*VGPU, f"--fd={theirs.fileno()}", "--log-level=warning"], pass_fds=[theirs.fileno()],
                            cwd=REPO)
    theirs.close()
    fe = Frontend(ours)
    ram = GuestRam(1 << 20)
    try:
        fe.negotiate()
        assert fe.u64(FrontendRequest.GET_QUEUE_NUM) == 2
        fe.share_memory(ram)
        fe.setup_queue(0, 64)
    finally:
        fe.close()
        ram.close()
    assert proc.wait(5) == 0


def test_serves_the_next_front_end_after_a_disconnect(tmp_path: Path) -> None:
    b = start_backend(VGPU, tmp_path, "vgpu")
    try:
        for _ in range(3):
            fe = Frontend.connect(b.socket_path)
            fe.negotiate()
            assert fe.u64(FrontendRequest.GET_QUEUE_NUM) == 2
            fe.close()
        assert wait_until(b.alive)
    finally:
        b.process.terminate()
        b.process.wait(5)


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "vhost-user-vgpu"
    r = subprocess.run([str(exe), "--print-capabilities"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and json.loads(r.stdout)["type"] == "gpu"
