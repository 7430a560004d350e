"""The back end under test as a process: started from a command template with `{sock}` in it, restarted when it
has exited (QEMU's C back end serves one connection and exits), its fds read through /proc."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path
from typing import IO

from ..procfs import settled_fd_count, wait_until

SOCKET_PLACEHOLDER = "{sock}"


class BackendStartError(Exception):
    pass


def fd_targets(pid: int) -> list[str]:
    """What each of the process's fds points to (so a leak names its object)."""
    out = []
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return []
    for name in names:
        try:
            out.append(os.readlink(os.path.join(base, name)))
        except FileNotFoundError:
            pass
    return out



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
    """One back end at a time, started on demand."""

    def __init__(self, template: str, workdir: Path, name: str = "backend") -> None:
        self.template = template
        self.argv_template = split_template(template)
        self.workdir = workdir
        self.name = name
        self.socket_path = str(workdir / f"{name}.sock")
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.baseline_fds = 0
        self.starts = 0
        self._log: IO[bytes] | None = None

    def argv(self) -> list[str]:
        return [a.replace(SOCKET_PLACEHOLDER, self.socket_path) for a in self.argv_template]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.stop()
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        try:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            self._log.close()
            self._log = None
            raise BackendStartError(f"cannot run {self.argv()[0]}: {e}") from e
        self.starts += 1
        proc = self.proc
        if not wait_until(lambda: os.path.exists(self.socket_path) or proc.poll() is not None, 20):
            raise BackendStartError(f"{self.template} created no socket in 20 s")
        if proc.poll() is not None:
            raise BackendStartError(f"{self.template} exited with {proc.returncode} at start: "
                                    f"{self.log_tail()}")
        self.baseline_fds = self.settled_fds()

    def settled_fds(self, timeout: float = 5.0) -> int:
        """The fd count once it holds still (a back end finishes setting up, or releasing, after we look)."""
        if not self.alive():
            return 0
        return settled_fd_count(self.pid, timeout, reads=4, step=0.02)

    def ensure(self) -> None:
        if not self.alive():
            self.start()

    def log_tail(self, n: int = 400) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

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
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if os.path.exists(self.socket_path):
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        return rc
