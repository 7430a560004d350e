"""The back-end program's accept loop: one front end at a time, each with a fresh device and session, a stop
signal that wakes everything, and the record of whom we serve that a status query reads."""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
from collections.abc import Callable, Sequence

from .backend import Session
from .device import Device
from .heap import release_freed_memory
from .message import Channel
from .polling import DEFAULT_MAX_US
from .services import LoopService, run_service, service_due, sleep_limit
from .xen_memory import FILES_ONLY, MemoryPolicy

log = logging.getLogger("vgpu.vhost_user")


class StopSignal:
    """A self-pipe that SIGTERM and SIGINT write to, so the loop wakes and exits promptly."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old = signal.set_wakeup_fd(self.w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        pass  # the byte the signal wrote to the wakeup fd is what wakes the loop

    def close(self) -> None:
        signal.set_wakeup_fd(self._old)
        os.close(self.r)
        os.close(self.w)


class Serving:
    """Which front end the back end is serving, if any: what a status query reports about the transport and the
    device.  serve() keeps it current; it answers also between front ends (idle: no session, no device)."""

    def __init__(self) -> None:
        self.session: Session | None = None
        self.connections = 0

    def status(self) -> dict[str, object]:
        s = self.session
        return {
            "vmm_connected": s is not None,
            "vmm_connections": self.connections,
            "transport": s.snapshot() if s is not None else None,
            "device": dict(s.device.status()) if s is not None else None,
        }


def serve_connection(device: Device, sock: socket.socket, stop_fd: int | None = None,
                     services: Sequence[LoopService] = (), serving: Serving | None = None,
                     memory_policy: MemoryPolicy = FILES_ONLY, poll_max_us: float = DEFAULT_MAX_US) -> bool:
    """Serve one front end to the end; returns False if we were asked to stop.  `poll_max_us`: polling.py."""
    session = Session(device, Channel(sock), stop_fd, services, memory_policy, poll_max_us)
    if serving is not None:
        serving.session = session
        serving.connections += 1
    try:
        session.run()
    finally:
        if serving is not None:
            serving.session = None
        session.close()
        release_freed_memory()
    return not session.stopping


def serve(
    device_factory: Callable[[], Device],
    listener: socket.socket,
    stop_fd: int | None = None,
    max_connections: int | None = None,
    services: Sequence[LoopService] = (),
    serving: Serving | None = None,
    memory_policy: MemoryPolicy = FILES_ONLY,
    poll_max_us: float = DEFAULT_MAX_US,
) -> None:
    """Accept front ends one at a time, each with a fresh device, until stopped.  `services` (a control socket)
    are served throughout: between front ends by this loop, during one by the session's."""
    served = 0
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "listen")
    if stop_fd is not None:
        sel.register(stop_fd, selectors.EVENT_READ, "stop")
    by_fd = {svc.fileno(): svc for svc in services}
    for fd in by_fd:
        sel.register(fd, selectors.EVENT_READ, "service")
    try:
        while max_connections is None or served < max_connections:
            events = sel.select(sleep_limit(None, services))
            ready = {key.data for key, _ in events}
            if "stop" in ready:
                return
            for key, _ in events:
                if key.data == "service":
                    run_service(by_fd[key.fd])
            service_due(services)
            if "listen" not in ready:
                continue
            conn, _ = listener.accept()
            conn.set_inheritable(False)
            served += 1
            log.info("front end connected")
            if not serve_connection(device_factory(), conn, stop_fd, services, serving, memory_policy, poll_max_us):
                return
    finally:
        sel.close()
