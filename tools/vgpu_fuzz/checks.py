"""What counts as a failure inside the harness, and the probes of the process's resources.

A crash is any exception that is not the product's documented error path. The documented paths answer or log and
carry on: a command gets a RESP_ERR_* response; a front-end request is refused (a failure ack or a warning) or
ends the connection as a protocol violation. Both loops also catch what nobody expected, so that one bad input
cannot take the process (and every later VMM) down — and say so with ``log.exception``. Such a record is how the
harness sees a crash the product survived, so every log record that carries an exception is a failure here.
"""

from __future__ import annotations

import gc
import logging
import os
import traceback
from dataclasses import dataclass
from typing import Final

PAGE: Final = os.sysconf("SC_PAGE_SIZE")


class Failure(Exception):
    """An input made the product misbehave: crashed, answered wrongly, or kept something it should have freed."""

    kind = "crash"


class Leak(Failure):
    kind = "leak"


class Hang(Failure):
    kind = "hang"


class ExceptionRecords(logging.Handler):
    """Collects every log record that carries an exception (``log.exception``: a bug the product caught)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.caught: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            exc = "".join(traceback.format_exception(*record.exc_info))
            self.caught.append(f"{record.name}: {record.getMessage()}\n{exc}")

    def check(self) -> None:
        if self.caught:
            first, n = self.caught[0], len(self.caught)
            self.caught.clear()
            raise Failure(f"the product caught an unexpected exception ({n} record(s)):\n{first}")


class QuietLogging:
    """Route the log to the exception collector alone, at WARNING, until `restore()`: the error paths log at INFO,
    and formatting a million of those lines would be most of the run."""

    def __init__(self) -> None:
        self.records = ExceptionRecords()
        root = logging.getLogger()
        self._saved = (root.level, list(root.handlers))
        for h in self._saved[1]:
            root.removeHandler(h)
        root.addHandler(self.records)
        root.setLevel(logging.WARNING)

    def restore(self) -> None:
        root = logging.getLogger()
        root.removeHandler(self.records)
        root.setLevel(self._saved[0])
        for h in self._saved[1]:
            root.addHandler(h)


def fd_table() -> list[str]:
    """This process's fds, each with what it points to (so a leak names its object)."""
    out = []
    for name in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            out.append(f"{name}->{os.readlink(f'/proc/self/fd/{name}')}")
        except FileNotFoundError:
            pass  # the listing's own directory fd
    return out


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@dataclass(frozen=True)
class Probe:
    """One look at the process: fds, resident memory, live Python objects."""

    inputs: int
    fds: int
    rss: int
    objects: int

    @classmethod
    def take(cls, inputs: int) -> Probe:
        gc.collect()
        return cls(inputs, fd_count(), rss_bytes(), len(gc.get_objects()))

    def as_dict(self) -> dict[str, int]:
        return {"inputs": self.inputs, "fds": self.fds, "rss_bytes": self.rss, "python_objects": self.objects}
