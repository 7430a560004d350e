"""A control socket served by the back end's own event loop: one JSON request per connection, one JSON answer, close.

Why a socket in the loop rather than the alternatives: a SIGUSR1 dump lands in a log the operator must find and
parse, interleaved with everything else, and cannot be asked a question; a file rewritten periodically is stale
between writes and costs work when nobody looks; D-Bus needs a bus and a binding this back end otherwise does
without, for one read-only query.  A Unix socket answers exactly when asked, its file mode (0600) decides who may
ask, and because the loop that owns the device serves it, the answer reads device state no other thread can be
changing: the back end stays single-threaded, and no lock is added to the hot path.

Why it is bounded the way it is: the same loop serves the VMM, so nothing a control client does may block it or
make it grow.  Every socket is non-blocking; a request longer than ``max_request`` bytes is refused; each client
has ``timeout`` seconds from accept to request sent and answer collected, then is closed; at most ``max_clients``
are open at once (more are accepted and closed at once: one left in the backlog would keep the listener readable
and the loop spinning).  The answer itself is the back end's own data (bounded by its resource limits) and is
written as the client reads it, never with a blocking send.

The server keeps its sockets in an epoll set of its own, so a loop watches one fd for all of them (epoll fds are
pollable) and asks `timeout()` how long it may sleep before a client's deadline passes.  It knows nothing of
what it answers: `answer` maps a request object to a JSON-serialisable object.
"""

from __future__ import annotations

import json
import logging
import selectors
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

log = logging.getLogger("vgpu.vhost_user.control")

#: A status request is a few dozen bytes: 4 KiB leaves room for future queries and refuses a flood at once.
MAX_REQUEST: Final = 4096
#: Local clients send a line and read the answer in milliseconds; a client still connected after this is stuck
#: or hostile, and its fd is reclaimed.
CLIENT_TIMEOUT: Final = 3.0
MAX_CLIENTS: Final = 8
_RECV: Final = 65536

Answer = Callable[[Mapping[str, Any]], Mapping[str, object]]


class ControlError(Exception):
    """The request cannot be answered; the client gets ``{"error": message}``."""


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    deadline: float
    inbox: bytearray = field(default_factory=bytearray)
    outbox: memoryview | None = None  # the encoded answer still to send, once the request is complete


class ControlServer:
    """Serves `listener` (a bound, listening Unix socket the caller owns and closes) from someone else's loop:
    watch `fileno()` for reading, call `service()` when it is readable or `timeout()` has run out."""

    def __init__(self, listener: socket.socket, answer: Answer, *, max_request: int = MAX_REQUEST,
                 timeout: float = CLIENT_TIMEOUT, max_clients: int = MAX_CLIENTS) -> None:
        self.listener = listener
        self.answer = answer
        self.max_request = max_request
        self.client_timeout = timeout
        self.max_clients = max_clients
        listener.setblocking(False)
        self._sel = selectors.EpollSelector()
        self._sel.register(listener, selectors.EVENT_READ, None)
        self._clients: dict[int, _Client] = {}

    def fileno(self) -> int:
        return self._sel.fileno()

    def timeout(self) -> float | None:
        """Seconds until the earliest client deadline (None: no client, sleep as long as you like)."""
        if not self._clients:
            return None
        return max(0.0, min(c.deadline for c in self._clients.values()) - time.monotonic())

    def service(self) -> None:
        """Accept, read, answer and expire whatever is ready now; never blocks."""
        for key, events in self._sel.select(0):
            if key.data is None:
                self._accept()
            else:
                self._serve(key.data, events)
        now = time.monotonic()
        for c in [c for c in self._clients.values() if c.deadline <= now]:
            log.info("control client on fd %d timed out (%s)", c.sock.fileno(),
                     "answer not collected" if c.outbox is not None else f"{len(c.inbox)} request bytes, no end")
            self._drop(c)

    def close(self) -> None:
        for c in list(self._clients.values()):
            self._drop(c)
        self._sel.close()

    # --- one client ---------------------------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # EMFILE and friends: the connection stays queued; say so rather than fail the loop.
                log.warning("control socket: accept failed: %s", e)
                return
            if len(self._clients) >= self.max_clients:
                log.warning("control socket: %d clients already connected; closing a new one", self.max_clients)
                sock.close()
                continue
            sock.setblocking(False)
            c = _Client(sock, time.monotonic() + self.client_timeout)
            self._clients[sock.fileno()] = c
            self._sel.register(sock, selectors.EVENT_READ, c)

    def _serve(self, c: _Client, events: int) -> None:
        try:
            if c.outbox is None and events & selectors.EVENT_READ:
                self._read(c)
            if c.outbox is not None:
                self._write(c)
        except OSError as e:
            # A client that resets or goes away mid-answer is its own problem, not the loop's.
            log.info("control client on fd %d: %s", c.sock.fileno(), e)
            self._drop(c)

    def _read(self, c: _Client) -> None:
        data = c.sock.recv(min(_RECV, self.max_request + 1 - len(c.inbox)))
        if not data and not c.inbox:
            self._drop(c)  # connected and left without asking
            return
        c.inbox += data
        end = c.inbox.find(b"\n")
        if len(c.inbox) > self.max_request and end < 0:
            self._reply(c, {"error": f"request longer than {self.max_request} bytes"})
        elif end >= 0 or not data:
            self._reply(c, self._answer(bytes(c.inbox[:end] if end >= 0 else c.inbox)))

    def _answer(self, raw: bytes) -> Mapping[str, object]:
        try:
            request = json.loads(raw)
        except (ValueError, RecursionError) as e:
            return {"error": f"the request is not JSON: {e}"}
        if not isinstance(request, dict):
            return {"error": "the request must be a JSON object, e.g. {\"query\": \"status\"}"}
        try:
            return self.answer(request)
        except ControlError as e:
            return {"error": str(e)}
        except Exception as e:
            # The answer reads device state; a bug there must cost one query, not the VMM's connection.
            log.exception("control request %r failed", request)
            return {"error": f"internal error: {type(e).__name__}: {e}"}

    def _reply(self, c: _Client, doc: Mapping[str, object]) -> None:
        c.inbox.clear()
        c.outbox = memoryview(json.dumps(doc).encode() + b"\n")
        # Stop reading (what a flooding client sends next is never looked at) and wait until it can take bytes.
        self._sel.modify(c.sock, selectors.EVENT_WRITE, c)

    def _write(self, c: _Client) -> None:
        assert c.outbox is not None
        try:
            sent = c.sock.send(c.outbox)
        except BlockingIOError:
            return
        c.outbox = c.outbox[sent:]
        if not c.outbox:
            self._drop(c)

    def _drop(self, c: _Client) -> None:
        fd = c.sock.fileno()
        if self._clients.pop(fd, None) is not None:
            self._sel.unregister(c.sock)
        c.sock.close()
