"""One input through an entry point, with every check around it: the same code under atheris and in a replay.

`Harness.one(data)` runs the target on `data` and raises `Failure` (a crash, a hang, a leak) if the input made the
product misbehave. Around every input: the product's caught exceptions (`checks.ExceptionRecords`), and after the
warm-up the process's fd count, which must not grow over any input (every target releases everything an input
made). Every `probe_every` inputs a `Probe` records fds, RSS and live Python objects, so the
report can show memory over the run.
"""

from __future__ import annotations

import hashlib
import traceback
from pathlib import Path
from typing import Final, Protocol

from .checks import Failure, Leak, Probe, QuietLogging, fd_count, fd_table
from .commands import CommandsTarget
from .vhost_user import VhostUserTarget

TARGETS: Final = ("commands", "vhost_user")
#: What one unit is, per target (the report counts these).
UNITS: Final = {"commands": "guest commands", "vhost_user": "vhost-user messages"}
#: Inputs before the fd baseline is taken: lazily opened things (a selector, an allocator's device) settle first.
WARMUP: Final = 200


class Target(Protocol):
    name: str

    def run(self, data: bytes) -> int: ...

    def close(self) -> None: ...


def make_target(name: str) -> Target:
    if name == "commands":
        return CommandsTarget()
    if name == "vhost_user":
        return VhostUserTarget()
    raise ValueError(f"no fuzz target {name!r} (one of {', '.join(TARGETS)})")


class Harness:
    def __init__(self, target: str, probe_every: int = 5000, warmup: int = WARMUP) -> None:
        self.target_name = target
        self.logging = QuietLogging()
        self.records = self.logging.records
        self.target = make_target(target)
        self.probe_every = probe_every
        self.warmup = warmup
        self.inputs = 0
        self.units = 0
        self.baseline_fds: int | None = None
        self._fd_names: list[str] = []
        self.probes: list[Probe] = []

    def one(self, data: bytes) -> None:
        """Run one input; raises Failure (the target is rebuilt first, so the next input starts clean)."""
        self.inputs += 1
        try:
            try:
                self.units += self.target.run(data)
            except Failure:
                self.records.check()  # the root cause first, when the product caught one on the way
                raise
            except Exception as e:
                raise Failure(f"{type(e).__name__} escaped the product:\n{traceback.format_exc()}") from e
            self.records.check()
            self._check_fds()
        except Failure:
            self._rebuild()
            raise
        if self.inputs % self.probe_every == 0:
            self.probes.append(Probe.take(self.inputs))

    def _check_fds(self) -> None:
        if self.inputs == self.warmup:
            self.baseline_fds = fd_count()
            self._fd_names = fd_table()
            self.probes.append(Probe.take(self.inputs))
        elif self.baseline_fds is not None:
            n = fd_count()
            if n > self.baseline_fds:
                grown = sorted(set(fd_table()) - set(self._fd_names))
                raise Leak(f"{n} fds after the input, {self.baseline_fds} before it: {grown[:12]}")
            if n < self.baseline_fds:
                # Fewer: what an earlier failure left open has been collected since. The baseline follows it down.
                self.baseline_fds, self._fd_names = n, fd_table()

    def _rebuild(self) -> None:
        """After a failure the target's state is unknown: start a new one, and a new fd baseline with it."""
        self.records.caught.clear()
        try:
            self.target.close()
        except Exception:
            pass
        self.target = make_target(self.target_name)
        if self.baseline_fds is not None:
            self.baseline_fds = fd_count()
            self._fd_names = fd_table()

    def close(self) -> None:
        self.target.close()
        self.logging.restore()


def save_failure(directory: Path, failure: Failure, data: bytes) -> Path:
    """The reproducer (`<kind>-<sha1>`, the input itself) and what went wrong (`.txt` beside it)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{failure.kind}-{hashlib.sha1(data).hexdigest()}"
    path.write_bytes(data)
    path.with_suffix(".txt").write_text(str(failure) + "\n")
    return path
