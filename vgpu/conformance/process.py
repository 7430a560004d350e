"""The back end under test as a process: started from a command with `{sock}` in it, restarted when it has exited
(QEMU's C back end serves one connection and exits), its fds read through /proc. The tests start their back ends
with the same class."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from ..procfs import fd_count, settled_fd_count, wait_until

SOCKET_PLACEHOLDER = "{sock}"
# sockaddr_un.sun_path holds 108 bytes with its NUL; room is kept for the longest socket name placed beside the
# back end's own ("virgl.sock" in the conformance checks).
_SUN_PATH_MAX = 107
_SOCKET_NAME_ROOM = 24


def socket_dir(workdir: Path) -> Path:
    """Where sockets for a back end working in `workdir` go: `workdir` itself, or, when its path is too long for
    AF_UNIX (a deep pytest or CI temp dir), a short private directory under the system's temp dir that is removed
    when the returned path's owner is collected (see BackendProcess)."""
    if len(os.fsencode(workdir)) + 1 + _SOCKET_NAME_ROOM <= _SUN_PATH_MAX:
        return workdir
    return Path(tempfile.mkdtemp(prefix="vgpu-"))


class BackendStartError(Exception):
    pass


def split_template(template: str) -> list[str]:
    argv = shlex.split(template)
    if not any(SOCKET_PLACEHOLDER in a for a in argv):
        raise ValueError(f"the back-end command must contain {SOCKET_PLACEHOLDER} (e.g. --socket-path={{sock}})")
    return argv


def without_socket(argv: list[str]) -> list[str]:
    """The command with its socket option removed (`--socket-path={sock}`, or `-s {sock}` as two words), for
    running the program in its other modes (--print-capabilities, --fd)."""
    out: list[str] = []
    for a in argv:
        if SOCKET_PLACEHOLDER in a:
            if a == SOCKET_PLACEHOLDER and out and out[-1].startswith("-"):
                out.pop()
            continue
        out.append(a)
    return out


def socket_option(argv: list[str], path: str) -> list[str]:
    """Just the socket option words, filled in with `path`."""
    for i, a in enumerate(argv):
        if SOCKET_PLACEHOLDER in a:
            if a == SOCKET_PLACEHOLDER and i and argv[i - 1].startswith("-"):
                return [argv[i - 1], path]
            return [a.replace(SOCKET_PLACEHOLDER, path)]
    raise ValueError("no socket placeholder")


class BackendProcess:
    """One back end at a time, started on demand: the conformance runner's subject, and the tests' back ends.

    `command` is a template string or an argv, with `{sock}` where the socket path goes. The process is started in
    `workdir` (its socket and log live there), with its output in `<name>.log`; `start_timeout` bounds the wait for
    its socket (inside an emulated guest Python alone takes seconds to start)."""

    def __init__(self, command: str | Sequence[str], workdir: Path, name: str = "backend",
                 start_timeout: float = 20.0, cwd: Path | None = None) -> None:
        self.template = command if isinstance(command, str) else shlex.join(command)
        self.argv_template = split_template(command) if isinstance(command, str) else list(command)
        if not any(SOCKET_PLACEHOLDER in a for a in self.argv_template):
            raise ValueError(f"the back-end command must contain {SOCKET_PLACEHOLDER} (e.g. --socket-path={{sock}})")
        self.workdir = workdir
        self.name = name
        self.start_timeout = start_timeout
        self.cwd = cwd
        #: Sockets live here: `workdir`, unless its path is too long for AF_UNIX.
        self.socket_dir = socket_dir(workdir)
        if self.socket_dir != workdir:
            weakref.finalize(self, shutil.rmtree, self.socket_dir, True)
        self.socket_path = str(self.socket_dir / f"{name}.sock")
        self.log_path = workdir / f"{name}.log"
        #: The last process started (kept after it stopped, for its exit status).
        self.proc: subprocess.Popen[bytes] | None = None
        self.baseline_fds = 0
        self.starts = 0
        self._log: IO[bytes] | None = None

    def argv(self) -> list[str]:
        return [a.replace(SOCKET_PLACEHOLDER, self.socket_path) for a in self.argv_template]

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The running process (or the last one, after it stopped)."""
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> BackendProcess:
        """Start a fresh process (stopping the one before) and wait until it listens with its fds settled."""
        self.stop()
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        # One log per object: a fresh one at the first start, the restarts of this object appended to it.
        self._log = open(self.log_path, "ab" if self.starts else "wb")  # noqa: SIM115 - closed in stop()
        try:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, start_new_session=True, cwd=self.cwd)
        except OSError as e:
            self._log.close()
            self._log = None
            raise BackendStartError(f"cannot run {self.argv()[0]}: {e}") from e
        self.starts += 1
        proc = self.proc
        if not wait_until(lambda: os.path.exists(self.socket_path) or proc.poll() is not None, self.start_timeout):
            self.stop()
            raise BackendStartError(f"{self.template} created no socket in {self.start_timeout:g} s")
        if proc.poll() is not None:
            raise BackendStartError(f"{self.template} exited with {proc.returncode} at start: "
                                    f"{self.log_tail()}")
        # The socket appears before the server has finished setting up (its selector comes after bind): the
        # baseline is the idle server's once its fd count holds still.
        self.baseline_fds = self.settled_fds()
        return self

    def settled_fds(self, timeout: float = 5.0) -> int:
        """The fd count once it holds still (a back end finishes setting up, or releasing, after we look)."""
        if not self.alive():
            return 0
        return settled_fd_count(self.pid, timeout, reads=4, step=0.02)

    def settle_fds(self, expected: int, timeout: float = 5.0) -> int:
        """Wait until the process is back to `expected` fds and stays there (the back end releases them after a
        disconnect); returns the count then. Held, not merely hit: under load a connection the client already
        closed may be accepted only now, so a first look can still see the idle count."""
        def held() -> bool:
            if fd_count(self.pid) != expected:
                return False
            time.sleep(0.2)
            return fd_count(self.pid) == expected

        wait_until(held, timeout)
        return fd_count(self.pid)

    def ensure(self) -> None:
        if not self.alive():
            self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 400) -> str:
        return self.log()[-n:]

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop the process (SIGTERM, then SIGKILL); returns its exit status."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            rc = self.proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        if os.path.exists(self.socket_path):
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        return rc
