"""The back end (device side) of vhost-user: one front-end connection at a time, one thread, one event loop.

Everything happens on one thread so that no lock guards the rings, the memory table or the device.  The price is
re-entrancy: when the device waits for an ack on the back-end channel (SHMEM_MAP) or a reply on the display socket,
the loop keeps reading the front-end socket, because QEMU may itself be waiting for us (it sends ADD_MEM_REG with
NEED_REPLY for a new mapping before it acks the SHMEM_MAP that created it).  Requests that would stop or reset rings
under the device's feet are deferred until the device returns.
"""

from __future__ import annotations

import heapq
import logging
import os
import selectors
import signal
import socket
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final

from .device import BackendChannelError, Device, DeviceRefused, Transport
from .memory import GuestMemory, GuestMemoryError, RegionDesc
from .message import Channel, Message, MissingFd, PeerClosed, ProtocolError
from .virtqueue import DescriptorChain, Virtqueue, VirtqueueError
from .wire import (
    CONFIG_HEADER_SIZE,
    FLAG_NEED_REPLY,
    MAX_CONFIG_SIZE,
    MAX_MEM_SLOTS,
    MAX_MEM_TABLE_REGIONS,
    MEMORY_TABLE_FIXED,
    SHMEM_MAX_REGIONS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_VERSION,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    BackendRequest,
    ConfigHeader,
    FrontendRequest,
    MemoryRegion,
    MemoryTable,
    ProtocolFeature,
    ShmemConfig,
    SingleMemoryRegion,
    VringAddr,
    VringState,
    VringStateC,
    bit,
    build,
    build_u64,
    parse_u64,
)

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

# Requests whose reply body is their answer: REPLY_ACK adds nothing to them.
_OWN_REPLY: Final = frozenset({
    FrontendRequest.GET_FEATURES, FrontendRequest.GET_PROTOCOL_FEATURES, FrontendRequest.GET_VRING_BASE,
    FrontendRequest.GET_QUEUE_NUM, FrontendRequest.GET_CONFIG, FrontendRequest.GET_MAX_MEM_SLOTS,
    FrontendRequest.GET_STATUS, FrontendRequest.GET_SHMEM_CONFIG,
})
# Requests a peer expects an answer to even without NEED_REPLY; if we cannot give one, closing is the only way
# not to leave the front end waiting forever.
_NEEDS_ANSWER: Final = frozenset({
    FrontendRequest.IOTLB_MSG, FrontendRequest.GET_INFLIGHT_FD, FrontendRequest.POSTCOPY_ADVISE,
    FrontendRequest.POSTCOPY_END, FrontendRequest.SET_DEVICE_STATE_FD, FrontendRequest.CHECK_DEVICE_STATE,
    FrontendRequest.GET_SHARED_OBJECT, FrontendRequest.CREATE_CRYPTO_SESSION,
})
# Requests that stop or reset rings: while the device is mid-command they wait until it returns.
_DEFERRED_WHILE_BUSY: Final = frozenset({
    FrontendRequest.GET_VRING_BASE, FrontendRequest.RESET_DEVICE, FrontendRequest.RESET_OWNER,
    FrontendRequest.SET_VRING_NUM, FrontendRequest.SET_VRING_ADDR, FrontendRequest.SET_VRING_BASE,
    FrontendRequest.GPU_SET_SOCKET, FrontendRequest.SET_FEATURES,
})


class Refused(Exception):
    """A request we understood and will not honour: failure ack with REPLY_ACK, otherwise a log line."""


class Session(Transport):
    """State of one front-end connection: features, memory, rings, the back-end channel, and the device."""

    def __init__(self, device: Device, channel: Channel, stop_fd: int | None = None) -> None:
        self.device = device
        self.channel = channel
        self._memory = GuestMemory(MAX_MEM_SLOTS)
        self._queues = [Virtqueue(i, device.max_queue_size) for i in range(device.num_queues)]
        self.offered_features = TRANSPORT_FEATURES | device.device_features()
        self.offered_protocol = TRANSPORT_PROTOCOL_FEATURES | device.protocol_features()
        self.acked_features = 0
        self.features_set = False
        self._protocol_features = 0
        self.owner = False
        self.status = 0
        self.backend_channel: Channel | None = None
        self._selector = selectors.DefaultSelector()
        self._watches: dict[int, Callable[[], None]] = {}
        self._kicks: dict[int, Virtqueue] = {}
        self._busy = 0
        self._deferred: list[Message] = []
        self._pending: set[int] = set()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = 0
        self._abandoned: dict[int, int] = {}
        self._stop_fd = stop_fd
        self.stopping = False
        self._selector.register(channel.sock, selectors.EVENT_READ, "frontend")
        if stop_fd is not None:
            self._selector.register(stop_fd, selectors.EVENT_READ, "stop")
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
        return self._protocol_features

    def has_protocol(self, feature: ProtocolFeature) -> bool:
        return bool(self._protocol_features & bit(feature))

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
        need_reply = self.has_protocol(ProtocolFeature.REPLY_ACK)
        try:
            ch.send(request, VHOST_USER_VERSION | (FLAG_NEED_REPLY if need_reply else 0), payload, fds)
        except OSError as e:
            raise BackendChannelError(f"back-end channel send failed: {e}") from e
        if not need_reply:
            return
        reply = self.wait_reply(ch, request, timeout)
        status = parse_u64(reply.payload) if len(reply.payload) == 8 else -1
        if status != 0:
            raise BackendChannelError(f"front end refused {request.name} (ack {status})")

    def wait_reply(self, channel: Channel, request: int, timeout: float) -> Message:
        log.debug("waiting for reply %d on fd %d", request, channel.fileno())
        deadline = time.monotonic() + timeout
        registered = False
        try:
            self._selector.register(channel.sock, selectors.EVENT_READ, "reply")
            registered = True
        except KeyError:
            pass  # already watched (the back-end channel is): its key just routes here while we wait
        try:
            with self._busy_scope():
                while True:
                    msg = channel.poll()
                    if msg is not None:
                        if msg.is_reply and msg.request == request:
                            if self._abandoned.get(request, 0):
                                # A late answer to an earlier request we gave up on.
                                self._abandoned[request] -= 1
                                msg.close_fds()
                                continue
                            return msg
                        log.warning("unexpected message %d (flags %#x) while waiting for %d",
                                    msg.request, msg.flags, request)
                        msg.close_fds()
                        continue
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        log.debug("no reply %d on fd %d", request, channel.fileno())
                        self._abandoned[request] = self._abandoned.get(request, 0) + 1
                        raise BackendChannelError(f"no reply to request {request} within {timeout:.1f} s")
                    for key, _ in self._selector.select(remaining):
                        if key.fileobj is channel.sock or key.fd == channel.fileno():
                            try:
                                channel.fill()
                            except ProtocolError as e:
                                channel.close()
                                raise BackendChannelError(f"channel closed while waiting: {e}") from e
                        elif key.data == "frontend":
                            self._serve_frontend()
                        elif key.data == "stop":
                            self.stopping = True
                            raise BackendChannelError("stopping")
        finally:
            if registered:
                self._selector.unregister(channel.sock)

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
        if any(q.ready and q.kick_fd < 0 for q in self._queues):
            return 0.001
        if self._timers:
            return max(0.0, self._timers[0][0] - time.monotonic())
        return None

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
                events = self._selector.select(self._timeout())
                for key, _ in events:
                    self._dispatch(key)
                    if self.stopping or self.channel.closed:
                        break
                if self.channel.closed:
                    return
                self._poll_kickless()
                self._run_timers()
        except PeerClosed as e:
            log.info("front end disconnected: %s", e)
        except ProtocolError as e:
            log.error("protocol violation, closing the connection: %s", e)

    def _dispatch(self, key: selectors.SelectorKey) -> None:
        if key.data == "frontend":
            self._serve_frontend()
        elif key.data == "kick":
            q = self._kicks.get(key.fd)
            log.debug("kick on fd %d (queue %s)", key.fd, q.index if q is not None else None)
            if q is not None:
                q.drain_kick()
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
        elif key.data == "stop":
            self.stopping = True

    def _poll_kickless(self) -> None:
        for q in self._queues:
            if q.ready and q.kick_fd < 0 and q.has_pending():
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
        with self._busy_scope():
            try:
                self.device.process_queue(q)
            except Exception:
                log.exception("device failed while processing queue %d", q.index)
        self._memory.collect()
        self._run_deferred()

    def _drain_backend_channel(self) -> None:
        ch = self.backend_channel
        assert ch is not None
        try:
            ch.fill()
        except ProtocolError as e:
            log.info("back-end channel closed: %s", e)
            self._drop_backend_channel()
            return
        while (msg := ch.poll()) is not None:
            if msg.is_reply and self._abandoned.get(msg.request, 0):
                self._abandoned[msg.request] -= 1
            else:
                log.warning("ignoring message %d on the back-end channel", msg.request)
            msg.close_fds()

    def _drop_backend_channel(self) -> None:
        if self.backend_channel is not None:
            try:
                self._selector.unregister(self.backend_channel.sock)
            except KeyError:
                pass
            self.backend_channel.close()
            self.backend_channel = None

    def _serve_frontend(self) -> None:
        self.channel.fill()
        while (msg := self.channel.poll()) is not None:
            # Once one request waits for the device, every later one waits behind it: requests must take effect
            # in the order the front end sent them (SET_VRING_KICK after the SET_VRING_ADDR it depends on).
            if self._busy and (self._deferred or msg.request in _DEFERRED_WHILE_BUSY):
                self._deferred.append(msg)
                continue
            self.handle(msg)
            self._run_deferred()

    def _run_deferred(self) -> None:
        while self._deferred and not self._busy:
            self.handle(self._deferred.pop(0))
        while self._pending and not self._busy:
            self._process(self._queues[self._pending.pop()])

    # --- request handling -------------------------------------------------------------------------------------

    def handle(self, msg: Message) -> None:
        """Handle one front-end request and send whatever reply it calls for."""
        try:
            req = FrontendRequest(msg.request)
        except ValueError:
            msg.close_fds()
            if msg.flags & FLAG_NEED_REPLY:
                log.warning("unknown request %d: failure ack", msg.request)
                self.channel.send_reply(msg.request, build_u64(1))
                return
            raise ProtocolError(f"unknown request {msg.request}") from None
        handler = getattr(self, "_on_" + req.name.lower(), None)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("<- %s flags %#x size %d fds %d", req.name, msg.flags, len(msg.payload), len(msg.fds))
        ok = True
        reply: bytes | None = None
        try:
            if handler is None:
                if req in _NEEDS_ANSWER:
                    raise ProtocolError(f"{req.name} is not supported and needs an answer")
                raise Refused(f"{req.name} is not supported")
            reply = handler(msg)
        except ProtocolError:
            raise
        except (Refused, DeviceRefused, GuestMemoryError, VirtqueueError, MissingFd) as e:
            ok = False
            log.warning("%s refused: %s", req.name, e)
            if req in _OWN_REPLY:
                # Every request with a reply body that can fail has its failure shape; none reach here unless
                # the front end broke the rules (e.g. asked for a queue that does not exist).
                raise ProtocolError(f"{req.name}: {e}") from e
        except Exception as e:
            # A bug of ours must cost this connection, never the process (and every other VM's next connect).
            log.exception("%s failed unexpectedly", req.name)
            raise ProtocolError(f"{req.name} failed: {e}") from e
        finally:
            msg.close_fds()
        if reply is not None:
            self.channel.send_reply(req, reply)
        elif msg.flags & FLAG_NEED_REPLY and self.has_protocol(ProtocolFeature.REPLY_ACK):
            self.channel.send_reply(req, build_u64(0 if ok else 1))
        self._memory.collect()

    def _payload(self, msg: Message, struct: Any, exact: bool = True) -> Any:
        size = struct.sizeof()
        if len(msg.payload) != size and (exact or len(msg.payload) < size):
            raise ProtocolError(f"request {msg.request}: payload of {len(msg.payload)} bytes, expected {size}")
        return struct.parse(msg.payload[:size])

    def _u64(self, msg: Message) -> int:
        if len(msg.payload) != 8:
            raise ProtocolError(f"request {msg.request}: payload of {len(msg.payload)} bytes, expected 8")
        return parse_u64(msg.payload)

    def _queue(self, index: int) -> Virtqueue:
        if index >= len(self._queues):
            raise Refused(f"no queue {index} (the device has {len(self._queues)})")
        return self._queues[index]

    def _no_payload(self, msg: Message) -> None:
        if msg.payload:
            raise ProtocolError(f"request {msg.request} carries an unexpected payload")
        if msg.fds:
            log.warning("closing %d fds attached to request %d", len(msg.fds), msg.request)

    # features

    def _on_get_features(self, msg: Message) -> bytes:
        self._no_payload(msg)
        return build_u64(self.offered_features)

    def _on_set_features(self, msg: Message) -> None:
        features = self._u64(msg)
        if features & ~self.offered_features:
            # QEMU 10 acks VIRTIO_F_RING_RESET (bit 40) for a back end that never offered it; refusing would
            # leave the device with no features at all.  Keep what we offered and say what we dropped.
            log.info("SET_FEATURES: ignoring bits %#x that were never offered", features & ~self.offered_features)
            features &= self.offered_features
        self.acked_features = features
        self.features_set = True
        event_idx = bool(features & bit(VIRTIO_RING_F_EVENT_IDX))
        for q in self._queues:
            q.event_idx = event_idx
            q.indirect = bool(features & bit(VIRTIO_RING_F_INDIRECT_DESC))
            if not features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
                # Without protocol features there is no SET_VRING_ENABLE: rings are enabled from the start.
                q.enabled = True
        self.device.set_features(features)

    def _on_get_protocol_features(self, msg: Message) -> bytes:
        self._no_payload(msg)
        return build_u64(self.offered_protocol)

    def _on_set_protocol_features(self, msg: Message) -> None:
        features = self._u64(msg)
        if features & ~self.offered_protocol:
            raise Refused(f"protocol features {features & ~self.offered_protocol:#x} were never offered")
        self._protocol_features = features

    def _on_set_owner(self, msg: Message) -> None:
        self._no_payload(msg)
        self.owner = True

    def _on_reset_owner(self, msg: Message) -> None:
        # Deprecated; the spec allows ignoring it or disabling every ring.  Disabling is the safer reading.
        self._no_payload(msg)
        for q in self._queues:
            self._stop(q)
            q.enabled = False

    def _on_reset_device(self, msg: Message) -> None:
        self._no_payload(msg)
        self.reset_device()

    def reset_device(self) -> None:
        for q in self._queues:
            self._stop(q)
            self._unwatch_kick(q)
            q.reset()
        self.device.reset()
        self.acked_features = 0
        self.features_set = False
        self.status = 0

    def _on_get_queue_num(self, msg: Message) -> bytes:
        self._no_payload(msg)
        return build_u64(len(self._queues))

    def _on_get_max_mem_slots(self, msg: Message) -> bytes:
        self._no_payload(msg)
        return build_u64(MAX_MEM_SLOTS)

    def _on_set_status(self, msg: Message) -> None:
        self.status = self._u64(msg) & 0xFF
        self.device.set_status(self.status)

    def _on_get_status(self, msg: Message) -> bytes:
        self._no_payload(msg)
        return build_u64(self.status)

    # memory

    def _on_set_mem_table(self, msg: Message) -> None:
        fds = msg.take_fds()
        try:
            if len(msg.payload) < MEMORY_TABLE_FIXED:
                raise ProtocolError("SET_MEM_TABLE payload too short")
            n = int.from_bytes(msg.payload[:4], "little")
            if n > MAX_MEM_TABLE_REGIONS or len(msg.payload) != MEMORY_TABLE_FIXED + n * MemoryRegion.sizeof():
                raise ProtocolError(f"SET_MEM_TABLE with {n} regions in {len(msg.payload)} bytes")
            table = MemoryTable.parse(msg.payload)
        except ProtocolError:
            for fd in fds:
                os.close(fd)
            raise
        descs = [RegionDesc(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
                 for r in table.regions]
        self._memory.set_table(descs, fds)
        self._memory_changed()

    def _on_add_mem_reg(self, msg: Message) -> None:
        region = self._payload(msg, SingleMemoryRegion, exact=False).region
        fd = msg.take_fd()
        self._memory.add(RegionDesc(region.guest_phys_addr, region.memory_size, region.userspace_addr,
                                    region.mmap_offset), fd)
        self._memory_changed()

    def _on_rem_mem_reg(self, msg: Message) -> None:
        region = self._payload(msg, SingleMemoryRegion, exact=False).region
        if msg.fds:
            log.warning("REM_MEM_REG carried %d fds; closing them unused", len(msg.fds))
        self._memory.remove(RegionDesc(region.guest_phys_addr, region.memory_size, region.userspace_addr, 0))
        self._memory_changed()

    def _memory_changed(self) -> None:
        for q in self._queues:
            if q.has_addr and q.size:
                try:
                    q.map(self._memory)
                except VirtqueueError as e:
                    # The ring may legitimately be outside memory until the rest of the table arrives.
                    log.debug("queue %d not mapped: %s", q.index, e)
        self.device.memory_changed()

    # rings

    def _on_set_vring_num(self, msg: Message) -> None:
        st = self._payload(msg, VringState)
        q = self._queue(st.index)
        if q.started:
            raise Refused(f"queue {st.index} is running")
        q.set_size(st.num)

    def _on_set_vring_addr(self, msg: Message) -> None:
        a = self._payload(msg, VringAddr)
        q = self._queue(a.index)
        if q.started:
            raise Refused(f"queue {a.index} is running")
        q.set_addr(a.desc_user_addr, a.used_user_addr, a.avail_user_addr, a.log_guest_addr, a.flags)
        q.map(self._memory)

    def _on_set_vring_base(self, msg: Message) -> None:
        st = self._payload(msg, VringState)
        q = self._queue(st.index)
        if q.started:
            raise Refused(f"queue {st.index} is running")
        q.set_base(st.num)

    def _on_get_vring_base(self, msg: Message) -> bytes:
        st = self._payload(msg, VringState)
        q = self._queue(st.index)
        self._stop(q)
        self._unwatch_kick(q)
        q.replace_fd("kick_fd", -1)
        return VringStateC.build({"index": st.index, "num": q.last_avail_idx})

    def _stop(self, q: Virtqueue) -> None:
        if q.started:
            q.started = False
            self.device.queue_stopped(q)

    def _vring_fd(self, msg: Message) -> tuple[Virtqueue, int]:
        value = self._u64(msg)
        q = self._queue(value & VRING_IDX_MASK)
        if value & VRING_NOFD_MASK:
            msg.close_fds()
            return q, -1
        return q, msg.take_fd()

    def _unwatch_kick(self, q: Virtqueue) -> None:
        if q.kick_fd >= 0 and self._kicks.pop(q.kick_fd, None) is not None:
            self._selector.unregister(q.kick_fd)

    def _on_set_vring_kick(self, msg: Message) -> None:
        q, fd = self._vring_fd(msg)
        self._unwatch_kick(q)
        q.replace_fd("kick_fd", fd)
        if fd >= 0:
            os.set_blocking(fd, False)
            self._kicks[fd] = q
            self._selector.register(fd, selectors.EVENT_READ, "kick")
        if not q.mapped:
            q.map(self._memory)
        was_started = q.started
        q.started = True
        if not was_started:
            self.device.queue_started(q)
        # Chains may have been queued before the kick fd arrived (e.g. after SET_VRING_BASE on resume).
        self._process(q)

    def _on_set_vring_call(self, msg: Message) -> None:
        q, fd = self._vring_fd(msg)
        q.replace_fd("call_fd", fd)

    def _on_set_vring_err(self, msg: Message) -> None:
        q, fd = self._vring_fd(msg)
        q.replace_fd("err_fd", fd)

    def _on_set_vring_enable(self, msg: Message) -> None:
        st = self._payload(msg, VringState)
        if not self.acked_features & bit(VHOST_USER_F_PROTOCOL_FEATURES) and self.features_set:
            raise Refused("SET_VRING_ENABLE without protocol features")
        q = self._queue(st.index)
        q.enabled = bool(st.num)
        if q.enabled:
            self._process(q)

    def _on_vring_kick(self, msg: Message) -> None:
        st = self._payload(msg, VringState)
        self._process(self._queue(st.index))

    def _on_set_vring_endian(self, msg: Message) -> None:
        raise Refused("legacy (big-endian) rings are not supported")

    # config

    def _on_get_config(self, msg: Message) -> bytes:
        if len(msg.payload) < CONFIG_HEADER_SIZE:
            raise ProtocolError("GET_CONFIG payload too short")
        hdr = ConfigHeader.parse(msg.payload[:CONFIG_HEADER_SIZE])
        space = self.device.config()
        wrong_size = len(msg.payload) != CONFIG_HEADER_SIZE + hdr.size
        if hdr.size == 0 or hdr.offset + hdr.size > MAX_CONFIG_SIZE or wrong_size:
            # A zero-sized payload is how the spec says "failed".
            log.warning("GET_CONFIG offset %d size %d refused", hdr.offset, hdr.size)
            return build(ConfigHeader, offset=hdr.offset, size=0, flags=hdr.flags)
        # Bytes past the device's config space read as zero, as unimplemented registers do: a front end told a
        # larger config_size (QEMU's generic vhost-user device takes it from the user) must not lose the device.
        data = space[hdr.offset:hdr.offset + hdr.size]
        return msg.payload[:CONFIG_HEADER_SIZE] + data + bytes(hdr.size - len(data))

    def _on_set_config(self, msg: Message) -> None:
        if len(msg.payload) < CONFIG_HEADER_SIZE:
            raise ProtocolError("SET_CONFIG payload too short")
        hdr = ConfigHeader.parse(msg.payload[:CONFIG_HEADER_SIZE])
        data = msg.payload[CONFIG_HEADER_SIZE:]
        if hdr.size > MAX_CONFIG_SIZE or len(data) != hdr.size:
            raise Refused(f"SET_CONFIG size {hdr.size} with {len(data)} bytes")
        self.device.write_config(hdr.offset, data)

    def _on_get_shmem_config(self, msg: Message) -> bytes:
        self._no_payload(msg)
        sizes = [0] * SHMEM_MAX_REGIONS
        for shmid, size in self.device.shmem_regions().items():
            sizes[shmid] = size
        return build(ShmemConfig, nregions=sum(1 for s in sizes if s), memory_sizes=sizes)

    # channels

    def _on_set_backend_req_fd(self, msg: Message) -> None:
        sock = _stream_socket(msg.take_fd())
        self._drop_backend_channel()
        self.backend_channel = Channel(sock)
        self._selector.register(self.backend_channel.sock, selectors.EVENT_READ, "backend")

    def _on_gpu_set_socket(self, msg: Message) -> None:
        self.device.set_gpu_socket(_stream_socket(msg.take_fd()))

    def _on_set_log_fd(self, msg: Message) -> None:
        raise Refused("dirty logging (migration) is not supported")

    def _on_set_inflight_fd(self, msg: Message) -> None:
        raise Refused("inflight tracking is not supported")

    # --- teardown ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release everything this connection owns: rings, fds, mappings, device state."""
        for q in self._queues:
            self._stop(q)
            self._unwatch_kick(q)
            q.reset()
        for msg in self._deferred:
            msg.close_fds()
        self._deferred.clear()
        try:
            self.device.reset()
        except Exception:
            log.exception("device reset failed")
        for fd in list(self._watches):
            self.unwatch(fd)
        self._drop_backend_channel()
        self._memory.close()
        self._selector.close()
        self.channel.close()


def _stream_socket(fd: int) -> socket.socket:
    """Wrap an fd the front end says is a socket; anything else is refused (and closed), not trusted."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise Refused("the fd is not a socket")
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise Refused("the fd is not a Unix stream socket")
        return sock
    except BaseException:
        os.close(fd)
        raise


class StopSignal:
    """A self-pipe that SIGTERM and SIGINT write to, so the loop wakes and exits promptly."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old = signal.set_wakeup_fd(self.w)
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.requested = True

    def close(self) -> None:
        signal.set_wakeup_fd(self._old)
        os.close(self.r)
        os.close(self.w)


def serve_connection(device: Device, sock: socket.socket, stop_fd: int | None = None) -> bool:
    """Serve one front end to the end; returns False if we were asked to stop."""
    session = Session(device, Channel(sock), stop_fd)
    try:
        session.run()
    finally:
        session.close()
    return not session.stopping


def serve(
    device_factory: Callable[[], Device],
    listener: socket.socket,
    stop_fd: int | None = None,
    max_connections: int | None = None,
) -> None:
    """Accept front ends one at a time, each with a fresh device, until stopped."""
    served = 0
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "listen")
    if stop_fd is not None:
        sel.register(stop_fd, selectors.EVENT_READ, "stop")
    try:
        while max_connections is None or served < max_connections:
            ready = {key.data for key, _ in sel.select()}
            if "stop" in ready:
                return
            conn, _ = listener.accept()
            conn.set_inheritable(False)
            served += 1
            log.info("front end connected")
            if not serve_connection(device_factory(), conn, stop_fd):
                return
    finally:
        sel.close()
