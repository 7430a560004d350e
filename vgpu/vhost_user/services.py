"""Things the back end's loop serves beside the front end, such as a control socket (`control.ControlServer`).

Both loops use this: the session's while a front end is connected, `server.serve`'s between front ends.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

log = logging.getLogger("vgpu.vhost_user")


class LoopService(Protocol):
    """Something the loop serves beside the front end, such as a control socket (`control.ControlServer`): one
    fd to watch, how long the loop may sleep before it must be called anyway, and work that never blocks."""

    def fileno(self) -> int: ...

    def timeout(self) -> float | None: ...

    def service(self) -> None: ...


def sleep_limit(timeout: float | None, services: Sequence[LoopService]) -> float | None:
    for svc in services:
        t = svc.timeout()
        if t is not None and (timeout is None or t < timeout):
            timeout = t
    return timeout


def run_service(svc: LoopService) -> None:
    try:
        svc.service()
    except Exception:
        # A status query must never cost the VMM its connection (or the process every later VMM).
        log.exception("loop service on fd %d failed", svc.fileno())


def service_due(services: Sequence[LoopService]) -> None:
    """Deadlines pass without the fd becoming readable (a silent client): give those services their turn."""
    for svc in services:
        t = svc.timeout()
        if t is not None and t <= 0:
            run_service(svc)
