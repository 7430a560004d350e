"""Adaptive polling: how long the loop looks for work before it sleeps, learnt from how long it then slept.

A back end that sleeps in epoll after every command pays, per command, a wake-up (on a VM an inter-processor
interrupt and a halt exit) and, worse for Python, caches the host has given to someone else while the vCPU was
halted: the same command costs about three times its hot cost (benchmarks/PROFILE.md).  When the next command
comes a few tens of microseconds after the last answer — a driver submitting one command at a time — looking for
it without sleeping avoids both.  Looking costs CPU, so the window is earned the way QEMU's event loop earns its
own (util/aio-posix.c, poll-max-ns): it starts at nothing, doubles from `GROW_FROM` whenever work arrived soon after
the loop gave up looking (a longer look would have found it), and drops to nothing as soon as the loop slept longer
than the largest window (the work is not coming in a stream).  An idle back end therefore never spins, and a busy
one spins at most `max_us` after each batch of work, and only on a CPU nobody else wants (see CONTENDED).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: The first window, in seconds, once polling has been earned.
GROW_FROM: Final = 4e-6
#: The default largest window: a little over what a Python or QEMU front end takes between one answer and the next
#: request on this kind of machine (30-45 us of CPU in benchmarks/results/mix_2d.json).
DEFAULT_MAX_US: Final = 64
#: A look yields the CPU between glances; a yield that took longer than this means another task had work for this
#: CPU (a yield with nobody waiting returns in about a microsecond), so the CPU is not spare and the loop sleeps.
CONTENDED: Final = 20e-6
#: The largest window an operator may ask for: past a millisecond a sleep costs little next to the wait itself.
MAX_POLL_US: Final = 1000


@dataclass
class PollWindow:
    """The current window (seconds); `max_s` 0 turns polling off."""

    max_s: float
    window: float = 0.0

    def slept(self, seconds: float) -> None:
        """The loop looked for `window` seconds, found nothing, and then slept `seconds` until work came."""
        if seconds > self.max_s:
            self.window = 0.0
        elif self.window < self.max_s:
            self.window = min(self.max_s, max(GROW_FROM, 2 * self.window))
