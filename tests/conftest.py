"""Shared fixtures: real back-end processes on real Unix sockets, and fd accounting of those processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

from vgpu import procfs
from vgpu_lab import paths

REPO = Path(__file__).resolve().parent.parent
paths.use_checkout(REPO)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
QEMU_GPU_BACKEND = "/usr/lib/qemu/vhost-user-gpu"

# Hypothesis keeps its storage (the failing examples it replays first, a constants cache) in .hypothesis/ under the
# current directory unless told otherwise; tests write only to temporary directories, so it lives there.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / f"vgpu-hypothesis-{os.getuid()}")


def require(path_or_cmd: str, what: str) -> str:
    """The component's path; in CI a missing component fails the test, elsewhere it skips with the reason."""
    found = path_or_cmd if os.path.exists(path_or_cmd) else shutil.which(path_or_cmd)
    if found:
        return found
    unavailable(f"{what} ({path_or_cmd}) is not installed; the README's test command provisions it")


def unavailable(message: str) -> NoReturn:
    """A component a test needs is missing: in CI that is a failure; elsewhere the test skips, saying which."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(reason=f"not in CI, and missing: {message}")


def open_fds(pid: int) -> set[str]:
    """The fds a process has open, with what each points to (so a leak names its object)."""
    out = set()
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            out.add(f"{name}->{os.readlink(os.path.join(base, name))}")
        except FileNotFoundError:
            pass
    return out


fd_count = procfs.fd_count


def wait_until(pred: Callable[[], object], timeout: float = 5.0) -> bool:
    return procfs.wait_until(pred, timeout)


@dataclass
class BackendProcess:
    proc: subprocess.Popen[bytes]
    socket_path: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def settle_fds(self, expected: int, timeout: float = 5.0) -> int:
        """Wait until the process is back to `expected` fds and stays there (the back end releases them after a
        disconnect). Held, not merely hit: under load a connection the client already closed may be accepted only
        now, so a first look can still see the idle count."""
        def held() -> bool:
            if fd_count(self.pid) != expected:
                return False
            time.sleep(0.2)
            return fd_count(self.pid) == expected

        wait_until(held, timeout)
        return fd_count(self.pid)


def start_backend(cmd: list[str], tmp_path: Path, name: str = "backend") -> BackendProcess:
    sock = str(tmp_path / f"{name}.sock")
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*cmd, f"--socket-path={sock}"], stdout=log, stderr=subprocess.STDOUT,
                                cwd=REPO)
    # Generous: inside an emulated guest (TCG, the host root over 9p) Python alone takes ~14 s to start under load;
    # a passing run waits only as long as start-up takes.
    if not wait_until(lambda: os.path.exists(sock) or proc.poll() is not None, 90):
        proc.kill()
        raise RuntimeError(f"{cmd} did not create its socket")
    if proc.poll() is not None:
        raise RuntimeError(f"{cmd} exited: {log_path.read_text()}")
    # The socket appears before the server has finished setting up (its selector comes after bind):
    # wait until the fd count holds still, so a test's baseline is the idle server's.
    procfs.settled_fd_count(proc.pid)
    return BackendProcess(proc, sock, log_path)


def stop_backend(b: BackendProcess) -> None:
    if b.proc.poll() is None:
        b.proc.terminate()
        try:
            b.proc.wait(5)
        except subprocess.TimeoutExpired:
            b.proc.kill()
            b.proc.wait()


ECHO = [sys.executable, "-m", "vgpu.vhost_user.examples.echo", "--log-level=info"]


@pytest.fixture
def echo_backend(tmp_path: Path) -> Iterator[BackendProcess]:
    b = start_backend([*ECHO, "--shm-size=16777216", "--map-timeout=1"], tmp_path, "echo")
    yield b
    stop_backend(b)


@pytest.fixture
def qemu_gpu_backend(tmp_path: Path) -> Iterator[BackendProcess]:
    exe = require(QEMU_GPU_BACKEND, "QEMU's C vhost-user-gpu back end (Debian qemu-system-gui)")
    b = start_backend([exe], tmp_path, "qemu-vhost-user-gpu")
    yield b
    stop_backend(b)
