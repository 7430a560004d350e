"""The back end (device side) of vhost-user: one front-end connection at a time, one thread, one event loop.

This module is the loop and its re-entrancy; the request handlers are in ``requests`` and what the connection
has negotiated is in ``state``.

Everything happens on one thread so that no lock guards the rings, the memory table or the device.  The price is
re-entrancy: when the device waits for an ack on the back-end channel (SHMEM_MAP) or a reply on the display socket,
the loop keeps reading the front-end socket, because QEMU may itself be waiting for us (it sends ADD_MEM_REG with
NEED_REPLY for a new mapping before it acks the SHMEM_MAP that created it).  Requests that would stop or reset rings
under the device's feet are deferred until the device returns.
"""

from __future__ import annotations

import errno
import gc
import heapq
import logging
import math
import os
import select
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Final

from . import shmem_bit
from .device import BackendChannelError, Device, Transport
from .memory import GuestMemory
from .message import Channel, Message, PeerClosed, ProtocolError
from .polling import CONTENDED, DEFAULT_MAX_US, PollWindow
from .requests import Requests
from .services import LoopService, run_service, service_due, sleep_limit
from .state import ConnectionState
from .virtqueue import DescriptorChain, Virtqueue
from .wire import (
    FLAG_NEED_REPLY,
    MAX_MEM_SLOTS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_VERSION,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    BackendRequest,
    FrontendRequest,
    ProtocolFeature,
    bit,
    parse_u64,
)
from .xen_memory import FILES_ONLY, GrantBudget, MemoryPolicy

log = logging.getLogger("vgpu.vhost_user")

# Protocol features the transport implements itself, whatever the device.
TRANSPORT_PROTOCOL_FEATURES: Final = (
    bit(ProtocolFeature.MQ)
    | bit(ProtocolFeature.REPLY_ACK)
    | bit(ProtocolFeature.BACKEND_REQ)
    | bit(ProtocolFeature.BACKEND_SEND_FD)
    | bit(ProtocolFeature.RESET_DEVICE)
    | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
    | bit(ProtocolFeature.STATUS)
)
TRANSPORT_FEATURES: Final = (
    bit(VIRTIO_F_VERSION_1)
    | bit(VHOST_USER_F_PROTOCOL_FEATURES)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
)

_TRANSPORT_FEATURE_NAMES: Final = {
    VIRTIO_F_VERSION_1: "VERSION_1", VHOST_USER_F_PROTOCOL_FEATURES: "PROTOCOL_FEATURES",
    VIRTIO_RING_F_EVENT_IDX: "RING_EVENT_IDX", VIRTIO_RING_F_INDIRECT_DESC: "RING_INDIRECT_DESC",
}


# Requests that stop or reset rings: while the device is mid-command they wait until it returns.
_DEFERRED_WHILE_BUSY: Final = frozenset({
    FrontendRequest.GET_VRING_BASE, FrontendRequest.RESET_DEVICE, FrontendRequest.RESET_OWNER,
    FrontendRequest.SET_VRING_NUM, FrontendRequest.SET_VRING_ADDR, FrontendRequest.SET_VRING_BASE,
    FrontendRequest.GPU_SET_SOCKET, FrontendRequest.SET_FEATURES,
})


def _ack_text(status: int) -> str:
    """A failure ack as its sender meant it: crosvm and QEMU answer -errno as a u64."""
    if status >= 1 << 63:
        code = (1 << 64) - status
        return f"-{errno.errorcode.get(code, code)}"
    return str(status)


class ReplyTimeout(BackendChannelError):
    """The peer did not answer in time; its answer, if it ever comes, is a late one."""


class Session(Transport):
    """The event loop of one front-end connection, and the transport the device sees."""

    def __init__(self, device: Device, channel: Channel, stop_fd: int | None = None,
                 services: Sequence[LoopService] = (), memory_policy: MemoryPolicy = FILES_ONLY,
                 poll_max_us: float = DEFAULT_MAX_US) -> None:
        self.device = device
        self.channel = channel
        xen = bit(ProtocolFeature.XEN_MMAP) if memory_policy.xen_mmap else 0
        self.state = ConnectionState(
            offered_features=TRANSPORT_FEATURES | device.device_features(),
            offered_protocol=shmem_bit.to_wire(TRANSPORT_PROTOCOL_FEATURES | device.protocol_features() | xen,
                                               device.shmem_feature_bit),
            queues=[Virtqueue(i, device.max_queue_size) for i in range(device.num_queues)],
            shmem_bit=shmem_bit.check(device.shmem_feature_bit),
            memory=GuestMemory(MAX_MEM_SLOTS, GrantBudget(memory_policy.max_grant_pages)),
        )
        self._memory = self.state.memory
        self._queues = self.state.queues
        self.requests = Requests(self.state, device, channel, self)
        self._selector = selectors.DefaultSelector()
        self._watches: dict[int, Callable[[], None]] = {}
        self._kicks: dict[int, Virtqueue] = {}
        self._busy = 0
        self._deferred: list[Message] = []
        self._pending: set[int] = set()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = 0
        # Payloads of the SHMEM_MAPs we gave up waiting for, oldest first: a late success is undone (see _late_reply).
        self._abandoned_maps: deque[bytes] = deque()
        # Set when the front end went away while the device waited for a reply; run() ends the session with it.
        self._frontend_gone: ProtocolError | None = None
        self._stop_fd = stop_fd
        self.stopping = False
        # Two windows: the next kick after an answer, and the front end's reply to our own request, come at
        # different paces, and each is learnt on its own.
        self._poll = PollWindow(poll_max_us * 1e-6)
        self._reply_poll = PollWindow(poll_max_us * 1e-6)
        self._selector.register(channel.sock, selectors.EVENT_READ, "frontend")
        if stop_fd is not None:
            self._selector.register(stop_fd, selectors.EVENT_READ, "stop")
        self._services = tuple(services)
        self._by_service_fd = {svc.fileno(): svc for svc in self._services}
        for svc in self._services:
            self._selector.register(svc.fileno(), selectors.EVENT_READ, "service")
        device.attach(self)

    # --- Transport --------------------------------------------------------------------------------------------

    @property
    def memory(self) -> GuestMemory:
        return self._memory

    @property
    def queues(self) -> list[Virtqueue]:
        return self._queues

    @property
    def protocol_features(self) -> int:
        return self.state.protocol_features

    @property
    def backend_channel(self) -> Channel | None:
        return self.state.backend_channel

    def complete(self, queue: Virtqueue, chain: DescriptorChain, written: int) -> None:
        chain.release()
        if queue.mapped and queue.started:
            queue.push(chain.head, written)

    def flush(self, queue: Virtqueue) -> None:
        if queue.mapped and queue.started:
            queue.notify()

    def backend_request(
        self, request: BackendRequest, payload: bytes, fds: list[int] | None = None, timeout: float = 5.0
    ) -> None:
        ch = self.backend_channel
        if ch is None or ch.closed:
            raise BackendChannelError("the front end gave us no back-end channel")
        need_reply = self.state.has_protocol(ProtocolFeature.REPLY_ACK)
        try:
            ch.send(request, VHOST_USER_VERSION | (FLAG_NEED_REPLY if need_reply else 0), payload, fds)
        except OSError as e:
            raise BackendChannelError(f"back-end channel send failed: {e}") from e
        if not need_reply:
            return
        try:
            reply = self.wait_reply(ch, request, timeout)
        except ReplyTimeout:
            if request == BackendRequest.SHMEM_MAP:
                self._abandoned_maps.append(payload)
            raise
        status = parse_u64(reply.payload) if len(reply.payload) == 8 else -1
        if status != 0:
            raise BackendChannelError(f"front end refused {request.name} (ack {_ack_text(status)})")

    def wait_reply(self, channel: Channel, request: int, timeout: float) -> Message:
        log.debug("waiting for reply %d on fd %d", request, channel.fileno())
        deadline = time.monotonic() + timeout
        # The back-end channel is watched already: its key just routes here while we wait. (Asked, not tried:
        # the KeyError of a second register formats the socket's repr, measurable on every SHMEM_MAP.)
        registered = channel.sock not in self._selector.get_map()
        if registered:
            self._selector.register(channel.sock, selectors.EVENT_READ, "reply")
        try:
            with self._busy_scope():
                while True:
                    msg = channel.poll()
                    if msg is not None:
                        if self._late_reply(channel, msg):
                            continue
                        if msg.is_reply and msg.request == request:
                            return msg
                        log.warning("unexpected message %d (flags %#x) while waiting for %d",
                                    msg.request, msg.flags, request)
                        msg.close_fds()
                        continue
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        log.debug("no reply %d on fd %d", request, channel.fileno())
                        channel.abandoned[request] = channel.abandoned.get(request, 0) + 1
                        raise ReplyTimeout(f"no reply to request {request} within {timeout:.1f} s")
                    for key, _ in self._select(sleep_limit(remaining, self._services), self._reply_poll):
                        if key.fileobj is channel.sock or key.fd == channel.fileno():
                            try:
                                channel.fill()
                            except ProtocolError as e:
                                channel.close()
                                raise BackendChannelError(f"channel closed while waiting: {e}") from e
                        elif key.data == "frontend" and self._frontend_gone is None:
                            try:
                                self._serve_frontend()
                            except ProtocolError as e:
                                # The VMM is gone (or broke the protocol) while the device waits: fail the device's
                                # request like any other channel failure, and let run() end the session.
                                self._frontend_gone = e
                                raise BackendChannelError(f"front end gone while waiting: {e}") from e
                        elif key.data == "stop":
                            self.stopping = True
                            raise BackendChannelError("stopping")
                        elif key.data == "service":
                            # Served even now: a status query only reads, and an operator asks exactly when
                            # the device seems stuck waiting for the VMM.
                            run_service(self._by_service_fd[key.fd])
                    service_due(self._services)
        finally:
            if registered:
                self._selector.unregister(channel.sock)

    def wait_writable(self, sock: socket.socket, timeout: float) -> None:
        # A poll set of its own (the loop's selector has the socket registered for reading already: a display's
        # answers).  poll, not a selector: a frame sent to a display socket waits here once per socket buffer's
        # worth (26 times for a 1080p frame through a 208 KiB buffer), and a new epoll set costs a create, a
        # register per fd and a close each time.  Any event on the socket (writable, or an error or hang-up that
        # the next send will report) ends the wait.
        deadline = time.monotonic() + timeout
        target, frontend = sock.fileno(), self.channel.fileno()
        poller = select.poll()
        poller.register(target, select.POLLOUT)
        poller.register(frontend, select.POLLIN)
        if self._stop_fd is not None:
            poller.register(self._stop_fd, select.POLLIN)
        with self._busy_scope():
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BackendChannelError(f"fd {target} took no bytes within {timeout:.1f} s")
                ready = {fd for fd, _ in poller.poll(max(1, math.ceil(remaining * 1000)))}
                if target in ready:
                    return
                if self._stop_fd is not None and self._stop_fd in ready:
                    self.stopping = True
                    raise BackendChannelError("stopping")
                if frontend in ready:
                    self._serve_frontend()

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self._watches[fd] = callback
        self._selector.register(fd, selectors.EVENT_READ, "watch")

    def unwatch(self, fd: int) -> None:
        if self._watches.pop(fd, None) is not None:
            self._selector.unregister(fd)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (time.monotonic() + delay, self._timer_seq, callback))

    def _run_timers(self) -> None:
        if not self._timers:
            return
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now and not self._busy:
            _, _, callback = heapq.heappop(self._timers)
            with self._busy_scope():
                try:
                    callback()
                except Exception:
                    log.exception("timer callback failed")
            self._run_deferred()

    def _timeout(self) -> float | None:
        for q in self._queues:
            if q.kick_fd < 0 and q.ready:
                return 0.001
        timeout = max(0.0, self._timers[0][0] - time.monotonic()) if self._timers else None
        return sleep_limit(timeout, self._services) if self._services else timeout

    # --- the loop ---------------------------------------------------------------------------------------------

    @contextmanager
    def _busy_scope(self) -> Iterator[None]:
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1

    def run(self) -> None:
        """Serve until the front end disconnects, breaks the protocol, or the stop fd fires."""
        try:
            while not self.stopping:
                events = self._select(self._timeout(), self._poll, rings=True)
                for key, _ in events:
                    self._dispatch(key)
                    if self._frontend_gone is not None or self.stopping or self.channel.closed:
                        break
                if self._frontend_gone is None and not self.channel.closed:
                    self._poll_kickless()
                    self._run_timers()
                    if self._services:
                        service_due(self._services)
                if self._frontend_gone is not None:
                    raise self._frontend_gone
                if self.channel.closed:
                    return
        except PeerClosed as e:
            log.info("front end disconnected: %s", e)
        except ProtocolError as e:
            log.error("protocol violation, closing the connection: %s", e)

    def _select(self, timeout: float | None, w: PollWindow,
                rings: bool = False) -> list[tuple[selectors.SelectorKey, int]]:
        """What is ready: looked for without sleeping while `w`'s window lasts (polling.py), then slept for.

        With `rings`, the look includes the available rings themselves: chains the driver has published are served
        at once, before its kick (the spec lets a device take them once the index is published; QEMU's polling
        event loop looks at the index the same way), and the loop comes back with no events to look again."""
        ready = self._selector.select
        if w.window and timeout != 0:
            deadline = time.monotonic() + w.window
            while True:
                events = ready(0)
                if events:
                    return events
                if rings:
                    served = False
                    for q in self._queues:
                        if q.kick_fd >= 0 and q.ready and q.has_pending():
                            self._process(q)
                            served = True
                    if served:
                        return []
                now = time.monotonic()
                if now >= deadline:
                    break
                # Whoever else is runnable on this CPU goes first; if someone did, the CPU is not spare: sleep.
                os.sched_yield()
                if time.monotonic() - now > CONTENDED:
                    break
        if not w.max_s:
            return ready(timeout)
        t0 = time.monotonic()
        events = ready(timeout)
        w.slept(time.monotonic() - t0)
        return events

    def _dispatch(self, key: selectors.SelectorKey) -> None:
        if key.data == "frontend":
            self._serve_frontend()
        elif key.data == "kick":
            q = self._kicks.get(key.fd)
            log.debug("kick on fd %d (queue %s)", key.fd, q.index if q is not None else None)
            if q is not None:
                if not q.drain_kick():
                    # A kick fd that is readable but yields no eventfd counter stays readable for ever: stop
                    # watching it and poll the ring instead, as for a ring set up without a kick fd.
                    log.warning("queue %d: kick fd %d is not an eventfd; polling the ring instead", q.index, key.fd)
                    self.unwatch_kick(q)
                    q.replace_fd("kick_fd", -1)
                self._process(q)
        elif key.data == "backend":
            self._drain_backend_channel()
        elif key.data == "watch":
            cb = self._watches.get(key.fd)
            if cb is not None:
                try:
                    cb()
                except Exception:
                    # A device's callback must not take the process (and every later VMM) down with it.
                    log.exception("callback for fd %d failed; no longer watching it", key.fd)
                    self.unwatch(key.fd)
                # The callback may have waited for a reply (busy): requests and kicks that arrived meanwhile were
                # deferred, and nothing else would run them until the front end sends something more.
                self._run_deferred()
        elif key.data == "service":
            run_service(self._by_service_fd[key.fd])
        elif key.data == "stop":
            self.stopping = True

    def _poll_kickless(self) -> None:
        for q in self._queues:
            if q.kick_fd < 0 and q.ready and q.has_pending():
                self._process(q)

    def _process(self, q: Virtqueue) -> None:
        if not q.ready:
            log.debug("queue %d not ready: started %s enabled %s mapped %s broken %s", q.index, q.started,
                      q.enabled, q.mapped, q.broken)
            return
        if self._busy:
            log.debug("queue %d kicked while the device is busy: served when it returns", q.index)
            # Never re-enter the device: a kick seen while it waits for an ack is served when it returns.
            self._pending.add(q.index)
            return
        # _busy_scope written out: this runs once per kick, and the context manager's generator costs more than
        # the rest of the bookkeeping around the device.
        self._busy += 1
        try:
            self.device.process_queue(q)
        except Exception:
            log.exception("device failed while processing queue %d", q.index)
        finally:
            self._busy -= 1
        if self._memory.has_garbage:
            self._memory.collect()
        if self._deferred or self._pending:
            self._run_deferred()

    def _drain_backend_channel(self) -> None:
        ch = self.state.backend_channel
        assert ch is not None
        try:
            ch.fill()
        except ProtocolError as e:
            log.info("back-end channel closed: %s", e)
            self._drop_backend_channel()
            return
        while (msg := ch.poll()) is not None:
            if not self._late_reply(ch, msg):
                log.warning("ignoring message %d on the back-end channel", msg.request)
                msg.close_fds()

    def _late_reply(self, channel: Channel, msg: Message) -> bool:
        """Swallow the answer to a request we gave up waiting for (replies come in order, and carry no id).

        A SHMEM_MAP the front end made after all is undone at once: the device answered the guest with an error
        and keeps no record of the mapping, so nothing else would ever unmap it — the front end would keep the
        buffer mapped and refuse every later map of that range as overlapping."""
        if not (msg.is_reply and channel.abandoned.get(msg.request, 0)):
            return False
        channel.abandoned[msg.request] -= 1
        msg.close_fds()
        if msg.request == BackendRequest.SHMEM_MAP and channel is self.state.backend_channel and self._abandoned_maps:
            payload = self._abandoned_maps.popleft()
            if len(msg.payload) == 8 and parse_u64(msg.payload) == 0:
                log.warning("late ack of a SHMEM_MAP we gave up on: unmapping that range again")
                try:
                    # No NEED_REPLY: there is nobody to tell about the answer.
                    channel.send(BackendRequest.SHMEM_UNMAP, VHOST_USER_VERSION, payload)
                except OSError as e:
                    log.warning("could not undo the late SHMEM_MAP: %s", e)
        return True

    def _drop_backend_channel(self) -> None:
        ch = self.state.backend_channel
        if ch is not None:
            try:
                self._selector.unregister(ch.sock)
            except KeyError:
                pass
            ch.close()
            self.state.backend_channel = None
            self._abandoned_maps.clear()  # a new channel owes us no late acks

    # --- LoopOps: what request handlers ask of the loop -------------------------------------------------------

    def set_backend_channel(self, channel: Channel) -> None:
        self._drop_backend_channel()
        self.state.backend_channel = channel
        self._selector.register(channel.sock, selectors.EVENT_READ, "backend")

    def watch_kick(self, q: Virtqueue) -> None:
        # Registered before it is recorded: an fd epoll refuses (a regular file, e.g. a memfd) raises OSError here
        # and leaves no record that unwatch_kick would try to unregister.
        self._selector.register(q.kick_fd, selectors.EVENT_READ, "kick")
        self._kicks[q.kick_fd] = q

    def unwatch_kick(self, q: Virtqueue) -> None:
        if q.kick_fd >= 0 and self._kicks.pop(q.kick_fd, None) is not None:
            self._selector.unregister(q.kick_fd)

    def process(self, q: Virtqueue) -> None:
        self._process(q)

    def _serve_frontend(self) -> None:
        self.channel.fill()
        while (msg := self.channel.poll()) is not None:
            # Once one request waits for the device, every later one waits behind it: requests must take effect
            # in the order the front end sent them (SET_VRING_KICK after the SET_VRING_ADDR it depends on).
            if self._busy and (self._deferred or msg.request in _DEFERRED_WHILE_BUSY):
                self._deferred.append(msg)
                continue
            self.requests.handle(msg)
            self._run_deferred()

    def _run_deferred(self) -> None:
        while self._deferred and not self._busy:
            self.requests.handle(self._deferred.pop(0))
        while self._pending and not self._busy:
            self._process(self._queues[self._pending.pop()])

    # --- status -----------------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """What this connection negotiated and set up, as plain data for a status query (only reads)."""
        st = self.state
        return {
            "features": {"offered": st.offered_features, "acked": st.acked_features,
                         "names": [name for b, name in sorted(_TRANSPORT_FEATURE_NAMES.items())
                                   if st.acked_features & bit(b)]},
            "protocol_features": {"offered": st.offered_protocol, "acked": st.protocol_features,
                                  "names": [f.name for f in ProtocolFeature if st.protocol_features & bit(f)],
                                  "shmem_bit": st.shmem_bit},
            "device_status": st.status,
            "memory_regions": len(self._memory.regions),
            "backend_channel": st.backend_channel is not None and not st.backend_channel.closed,
            "queues": [{"index": q.index, "size": q.size, "started": q.started, "enabled": q.enabled}
                       for q in self._queues],
            # Mid-command: the device waits for an ack from the VMM (SHMEM_MAP) or the display.
            "device_busy": bool(self._busy),
        }

    # --- teardown ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release everything this connection owns: rings, fds, mappings, device state."""
        for q in self._queues:
            self.requests.stop(q)
            self.unwatch_kick(q)
            q.reset()
        for msg in self._deferred:
            msg.close_fds()
        self._deferred.clear()
        try:
            self.device.disconnected()
        except Exception:
            log.exception("device reset failed")
        for fd in list(self._watches):
            self.unwatch(fd)
        self._drop_backend_channel()
        self._memory.close()
        if self._memory.has_garbage:
            # A view that only a reference cycle still holds (an exception's frames, say) pins its mapping until
            # the cycle collector runs, and nothing would try to close the mapping after this: collect now.
            gc.collect()
            pinned = self._memory.collect()
            if pinned:
                log.warning("%d guest memory mappings still pinned after the front end left", pinned)
        self._selector.close()
        self.channel.close()
