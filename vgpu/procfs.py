"""A process's open fds and resident memory, as end-to-end runs, tests and the conformance runner watch a back end's.

One place for "how many fds does it hold once it stops changing": a back end's socket appears before its set-up
ends, and it releases a connection's fds just after the peer leaves, so a count taken at once is a race.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable


def fd_count(pid: int) -> int:
    """Open fds of `pid` (0 once the process is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return 0


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB (VmRSS of /proc/PID/status; 0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def open_fds(pid: int) -> set[str]:
    """The fds a process has open, each as ``N->what it points to`` (so a leak names its object; empty once the
    process is gone)."""
    out: set[str] = set()
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return out
    for name in names:
        try:
            out.add(f"{name}->{os.readlink(os.path.join(base, name))}")
        except FileNotFoundError:
            pass
    return out


def wait_until(pred: Callable[[], object], timeout: float = 5.0, step: float = 0.01) -> bool:
    """Poll `pred` until it holds or `timeout` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def settled_fd_count(pid: int, timeout: float = 5.0, reads: int = 3, step: float = 0.01) -> int:
    """The fd count once `reads` readings in a row agree (or the last reading after `timeout`)."""
    counts: list[int] = []

    def still() -> bool:
        counts.append(fd_count(pid))
        return len(counts) >= reads and len(set(counts[-reads:])) == 1

    wait_until(still, timeout, step)
    return counts[-1] if counts else fd_count(pid)
