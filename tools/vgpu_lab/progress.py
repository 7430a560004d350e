"""How far a long step is: a bar redrawn in place where a terminal is attached, plain lines in a CI log.

Why our own: the lab's long steps (apt, debootstrap, unpacking and building a kernel, the venv's pip) report
progress as lines of their own output, which only we know how to count; what is left is drawing one line, which
tqdm or rich would do with a dependency the lab does not otherwise need (and ``tools/venv.sh`` uses this module
with the system's ``python3``, before any dependency is installed). So this imports nothing but the standard
library, and nothing of the lab.

- On a terminal (the stream's ``isatty()``): one line, rewritten in place at most ten times a second,
  ``what [#####.....]  45% 123/270  12 s  detail``; without a known total, a count instead of the bar.
- Elsewhere (CI): a line when the step starts, then one line at most every ``interval`` seconds (default 5) with
  the same figures, and a last line saying how it ended. Never a flood: a step of 2,000 compiler lines is a dozen
  log lines.

As a program it counts the lines of another one's output::

    pip install ... 2>&1 | python3 tools/vgpu_lab/progress.py "venv: pip install" --match '^(Collecting|Installing)'

(lines matching ``--match`` are the steps, each shown as the detail; ``--total`` when the count is known; the
input is passed through to ``--log FILE`` if given).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TextIO

#: How often a non-terminal gets a line, and how often a terminal's line is redrawn (seconds).
LOG_INTERVAL = 5.0
TTY_INTERVAL = 0.1
BAR_WIDTH = 24


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60}:{s % 60:02d}" if s >= 60 else f"{s} s"


class Progress:
    """One long step's progress on `stream` (stderr by default); use as a context manager, or call :meth:`finish`.

    `total` is the number of units the step has (None when unknown); :meth:`update` sets how many are done and
    what is happening now. The figures shown are capped below 100% until :meth:`finish`: a total that is only an
    estimate (a kernel build's step count) must not claim an end it has not reached.
    """

    def __init__(self, what: str, total: float | None = None, *, stream: TextIO | None = None,
                 interval: float = LOG_INTERVAL, tty: bool | None = None, unit: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = TTY_INTERVAL if self.tty else interval
        self.unit = unit
        self.clock = clock
        self.done = 0.0
        self.detail = ""
        self.started = clock()
        self._shown = -1e9
        self._finished = False
        self._drawn = 0  # characters of the terminal line last drawn
        if not self.tty:
            self._write_line(f"{what}: started" + (f" ({self._fmt(total)}{self._unit()} to go)" if total else ""))

    # --- figures -------------------------------------------------------------------------------------------------

    def _unit(self) -> str:
        return f" {self.unit}" if self.unit else ""

    @staticmethod
    def _fmt(n: float) -> str:
        return f"{n:,.0f}" if float(n).is_integer() or n >= 100 else f"{n:.1f}"

    def fraction(self) -> float | None:
        """Done over total, held below 1 until finished (None without a total)."""
        if not self.total:
            return None
        return min(self.done / self.total, 1.0 if self._finished else 0.99)

    def figures(self) -> str:
        """``45% 123/270 12 s`` (or ``123 12 s`` without a total)."""
        elapsed = _duration(self.clock() - self.started)
        frac = self.fraction()
        if frac is None:
            return f"{self._fmt(self.done)}{self._unit()}  {elapsed}"
        return f"{frac * 100:3.0f}% {self._fmt(self.done)}/{self._fmt(self.total or 0)}{self._unit()}  {elapsed}"

    def bar(self, width: int = BAR_WIDTH) -> str:
        frac = self.fraction()
        if frac is None:
            return ""
        filled = int(frac * width)
        return "[" + "#" * filled + "." * (width - filled) + "]"

    # --- drawing -------------------------------------------------------------------------------------------------

    def _write_line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def _draw(self, final: str | None = None) -> None:
        if self.tty:
            columns = shutil.get_terminal_size((100, 24)).columns
            text = final or " ".join(p for p in (self.what, self.bar(), self.figures(), self.detail) if p)
            text = text[:max(columns - 1, 10)]
            pad = " " * max(self._drawn - len(text), 0)
            self.stream.write("\r" + text + pad + ("\n" if final else ""))
            self.stream.flush()
            self._drawn = 0 if final else len(text)
        else:
            detail = f": {self.detail}" if self.detail else ""
            self._write_line(final or f"{self.what}: {self.figures()}{detail}")

    def update(self, done: float | None = None, detail: str | None = None) -> None:
        """Set what is done (and the detail); redraw when the last drawing is old enough."""
        if done is not None:
            self.done = done
        if detail is not None:
            self.detail = " ".join(detail.split())
        now = self.clock()
        if now - self._shown >= self.interval:
            self._shown = now
            self._draw()

    def advance(self, n: float = 1, detail: str | None = None) -> None:
        self.update(self.done + n, detail)

    def finish(self, outcome: str = "done") -> None:
        """The last line: how it ended and how long it took."""
        if self._finished:
            return
        self._finished = True
        if self.total and outcome == "done":
            self.done = max(self.done, self.total)
        self._draw(final=f"{self.what}: {outcome} in {_duration(self.clock() - self.started)}"
                         f" ({self._fmt(self.done)}{self._unit()})")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.finish("done" if kind is None else f"failed ({kind.__name__})")


def count_lines(lines: Iterable[str], progress: Progress, match: re.Pattern[str] | None = None,
                log: TextIO | None = None) -> None:
    """Count `lines` (those matching `match`) as steps of `progress`, each shown as the detail."""
    for line in lines:
        if log is not None:
            log.write(line)
        text = line.rstrip("\n")
        if match is None or match.search(text):
            progress.advance(1, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Count the lines of a program's output as progress.")
    parser.add_argument("what", help="what is being done (the line's first words)")
    parser.add_argument("--total", type=float, help="how many steps there are, when known")
    parser.add_argument("--match", help="only lines matching this regular expression are steps")
    parser.add_argument("--log", help="also write every input line to this file")
    args = parser.parse_args(argv)
    match = re.compile(args.match) if args.match else None
    log = open(args.log, "a", encoding="utf-8") if args.log else None  # noqa: SIM115 - closed below
    try:
        with Progress(args.what, args.total) as p:
            count_lines(sys.stdin, p, match, log)
    finally:
        if log is not None:
            log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
