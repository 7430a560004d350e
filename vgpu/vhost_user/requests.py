"""Front-end requests: one handler per vhost-user request, and the reply rules (REPLY_ACK, requests with their own
reply body, requests a peer waits on).

Handlers change the connection's state (``state``) and reach the event loop only through ``LoopOps``: start or
stop watching a kick fd, process a queue, install the back-end channel. A handler that refuses raises
``Refused``; one that finds the front end breaking the protocol raises ``ProtocolError`` and the connection
closes.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from typing import Any, Final, Protocol

from . import shmem_bit
from .device import Device, DeviceRefused
from .memory import GuestMemoryError, RegionDesc
from .message import Channel, Message, MissingFd, PeerClosed, ProtocolError
from .state import ConnectionState
from .virtqueue import Virtqueue, VirtqueueError
from .wire import (
    CONFIG_HEADER_SIZE,
    FLAG_NEED_REPLY,
    MAX_CONFIG_SIZE,
    MAX_MEM_SLOTS,
    MAX_MEM_TABLE_REGIONS,
    MEMORY_TABLE_FIXED,
    SHMEM_MAX_REGIONS,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
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
    XenMemoryRegion,
    XenMemoryTable,
    XenSingleMemoryRegion,
    bit,
    build,
    build_u64,
    parse_u64,
)

log = logging.getLogger("vgpu.vhost_user")

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
class Refused(Exception):
    """A request we understood and will not honour: failure ack with REPLY_ACK, otherwise a log line."""



class LoopOps(Protocol):
    """What a handler may ask of the event loop that serves the connection."""

    def process(self, q: Virtqueue) -> None: ...

    def watch_kick(self, q: Virtqueue) -> None: ...

    def unwatch_kick(self, q: Virtqueue) -> None: ...

    def set_backend_channel(self, channel: Channel) -> None: ...


class Requests:
    """The handlers of one connection's front-end requests."""

    def __init__(self, state: ConnectionState, device: Device, channel: Channel, loop: LoopOps) -> None:
        self.state = state
        self.device = device
        self.channel = channel
        self.loop = loop

    def handle(self, msg: Message) -> None:
        """Handle one front-end request and send whatever reply it calls for."""
        try:
            req = FrontendRequest(msg.request)
        except ValueError:
            msg.close_fds()
            if msg.flags & FLAG_NEED_REPLY:
                log.warning("unknown request %d: failure ack", msg.request)
                self._reply(msg.request, build_u64(1))
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
            self._reply(req, reply)
        elif msg.flags & FLAG_NEED_REPLY and self.state.has_protocol(ProtocolFeature.REPLY_ACK):
            self._reply(req, build_u64(0 if ok else 1))
        self.state.memory.collect()

    def _reply(self, request: int, payload: bytes) -> None:
        try:
            self.channel.send_reply(request, payload)
        except OSError as e:
            # A front end that sends a request and leaves before its answer (EPIPE, ECONNRESET) has disconnected,
            # like one that leaves between requests: the session ends, the process serves the next one.
            raise PeerClosed(f"gone before the reply to request {request}: {e}") from e

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
        if index >= len(self.state.queues):
            raise Refused(f"no queue {index} (the device has {len(self.state.queues)})")
        return self.state.queues[index]

    def _no_payload(self, msg: Message) -> None:
        if msg.payload:
            raise ProtocolError(f"request {msg.request} carries an unexpected payload")
        if msg.fds:
            log.warning("closing %d fds attached to request %d", len(msg.fds), msg.request)

    # features

    def _on_get_features(self, msg: Message) -> bytes:
        self._no_payload(msg)
        return build_u64(self.state.offered_features)

    def _on_set_features(self, msg: Message) -> None:
        features = self._u64(msg)
        if features & ~self.state.offered_features:
            # QEMU 10 acks VIRTIO_F_RING_RESET (bit 40) for a back end that never offered it; refusing would
            # leave the device with no features at all.  Keep what we offered and say what we dropped.
            log.info("SET_FEATURES: ignoring bits %#x that were never offered", features & ~self.state.offered_features)
            features &= self.state.offered_features
        self.state.acked_features = features
        self.state.features_set = True
        event_idx = bool(features & bit(VIRTIO_RING_F_EVENT_IDX))
        for q in self.state.queues:
            q.event_idx = event_idx
            q.indirect = bool(features & bit(VIRTIO_RING_F_INDIRECT_DESC))
            if not features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
                # Without protocol features there is no SET_VRING_ENABLE: rings are enabled from the start.
                q.enabled = True
        self.device.set_features(features)

    def _on_get_protocol_features(self, msg: Message) -> bytes:
        self._no_payload(msg)
        return build_u64(self.state.offered_protocol)

    def _on_set_protocol_features(self, msg: Message) -> None:
        features = self._u64(msg)
        if features & ~self.state.offered_protocol:
            raise Refused(f"protocol features {features & ~self.state.offered_protocol:#x} were never offered")
        self.state.protocol_features = shmem_bit.from_wire(features, self.state.shmem_bit)
        self.state.memory.rings_by_gpa = self.state.has_protocol(ProtocolFeature.XEN_MMAP)

    def _on_set_owner(self, msg: Message) -> None:
        self._no_payload(msg)
        self.state.owner = True

    def _on_reset_owner(self, msg: Message) -> None:
        # Deprecated; the spec allows ignoring it or disabling every ring.  Disabling is the safer reading.
        self._no_payload(msg)
        for q in self.state.queues:
            self.stop(q)
            q.enabled = False

    def _on_reset_device(self, msg: Message) -> None:
        self._no_payload(msg)
        self.reset_device()

    def reset_device(self) -> None:
        for q in self.state.queues:
            self.stop(q)
            self.loop.unwatch_kick(q)
            q.reset()
        self.device.reset()
        self.state.acked_features = 0
        self.state.features_set = False
        self.state.status = 0

    def _on_get_queue_num(self, msg: Message) -> bytes:
        self._no_payload(msg)
        return build_u64(len(self.state.queues))

    def _on_get_max_mem_slots(self, msg: Message) -> bytes:
        self._no_payload(msg)
        return build_u64(MAX_MEM_SLOTS)

    def _on_set_status(self, msg: Message) -> None:
        self.state.status = self._u64(msg) & 0xFF
        self.device.set_status(self.state.status)

    def _on_get_status(self, msg: Message) -> bytes:
        self._no_payload(msg)
        return build_u64(self.state.status)

    # memory

    def _xen(self) -> bool:
        """XEN_MMAP negotiated: every region description carries xen_mmap_flags and domid (40 bytes, not 32)."""
        return self.state.has_protocol(ProtocolFeature.XEN_MMAP)

    @staticmethod
    def _desc(r: Any, mmap_offset: int | None = None) -> RegionDesc:
        return RegionDesc(r.guest_phys_addr, r.memory_size, r.userspace_addr,
                          r.mmap_offset if mmap_offset is None else mmap_offset,
                          r.get("xen_mmap_flags", 0), r.get("domid", 0))

    def _on_set_mem_table(self, msg: Message) -> None:
        fds = msg.take_fds()
        region, table_struct = (XenMemoryRegion, XenMemoryTable) if self._xen() else (MemoryRegion, MemoryTable)
        try:
            if len(msg.payload) < MEMORY_TABLE_FIXED:
                raise ProtocolError("SET_MEM_TABLE payload too short")
            n = int.from_bytes(msg.payload[:4], "little")
            if n > MAX_MEM_TABLE_REGIONS or len(msg.payload) != MEMORY_TABLE_FIXED + n * region.sizeof():
                raise ProtocolError(f"SET_MEM_TABLE with {n} regions in {len(msg.payload)} bytes")
            table = table_struct.parse(msg.payload)
        except ProtocolError:
            for fd in fds:
                os.close(fd)
            raise
        descs = [self._desc(r) for r in table.regions]
        self.state.memory.set_table(descs, fds)
        log.info("memory table set: %s", ", ".join(_region(d) for d in descs) or "no regions")
        self._memory_changed()

    def _single(self, msg: Message) -> Any:
        # Exact: 40 bytes, or 48 with XEN_MMAP.
        return self._payload(msg, XenSingleMemoryRegion if self._xen() else SingleMemoryRegion).region

    def _on_add_mem_reg(self, msg: Message) -> None:
        region = self._single(msg)
        fd = msg.take_fd()
        desc = self._desc(region)
        self.state.memory.add(desc, fd)
        log.info("memory region added: %s (%d regions)", _region(desc), len(self.state.memory.regions))
        self._memory_changed()

    def _on_rem_mem_reg(self, msg: Message) -> None:
        region = self._single(msg)
        if msg.fds:
            log.warning("REM_MEM_REG carried %d fds; closing them unused", len(msg.fds))
        desc = self._desc(region, mmap_offset=0)
        self.state.memory.remove(desc)
        log.info("memory region removed: %s (%d regions)", _region(desc), len(self.state.memory.regions))
        self._memory_changed()

    def _memory_changed(self) -> None:
        for q in self.state.queues:
            if q.has_addr and q.size:
                try:
                    q.map(self.state.memory)
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
        q.map(self.state.memory)

    def _on_set_vring_base(self, msg: Message) -> None:
        st = self._payload(msg, VringState)
        q = self._queue(st.index)
        if q.started:
            raise Refused(f"queue {st.index} is running")
        q.set_base(st.num)

    def _on_get_vring_base(self, msg: Message) -> bytes:
        st = self._payload(msg, VringState)
        q = self._queue(st.index)
        self.stop(q)
        self.loop.unwatch_kick(q)
        q.replace_fd("kick_fd", -1)
        return VringStateC.build({"index": st.index, "num": q.last_avail_idx})

    def stop(self, q: Virtqueue) -> None:
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

    def _on_set_vring_kick(self, msg: Message) -> None:
        q, fd = self._vring_fd(msg)
        self.loop.unwatch_kick(q)
        q.replace_fd("kick_fd", fd)
        if fd >= 0:
            os.set_blocking(fd, False)
            try:
                self.loop.watch_kick(q)
            except OSError as e:
                # epoll refuses regular files (a memfd, say): a kick fd that can never wake us is no kick fd.
                q.replace_fd("kick_fd", -1)
                raise Refused(f"kick fd cannot be polled: {e}") from e
        if not q.mapped:
            q.map(self.state.memory)
        was_started = q.started
        q.started = True
        if not was_started:
            self.device.queue_started(q)
        # Chains may have been queued before the kick fd arrived (e.g. after SET_VRING_BASE on resume).
        self.loop.process(q)

    def _on_set_vring_call(self, msg: Message) -> None:
        q, fd = self._vring_fd(msg)
        q.replace_fd("call_fd", fd)

    def _on_set_vring_err(self, msg: Message) -> None:
        q, fd = self._vring_fd(msg)
        q.replace_fd("err_fd", fd)

    def _on_set_vring_enable(self, msg: Message) -> None:
        st = self._payload(msg, VringState)
        if not self.state.acked_features & bit(VHOST_USER_F_PROTOCOL_FEATURES) and self.state.features_set:
            raise Refused("SET_VRING_ENABLE without protocol features")
        q = self._queue(st.index)
        q.enabled = bool(st.num)
        if q.enabled:
            self.loop.process(q)

    def _on_vring_kick(self, msg: Message) -> None:
        st = self._payload(msg, VringState)
        self.loop.process(self._queue(st.index))

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
        self.loop.set_backend_channel(Channel(_stream_socket(msg.take_fd())))

    def _on_gpu_set_socket(self, msg: Message) -> None:
        self.device.set_gpu_socket(_stream_socket(msg.take_fd()))

    def _on_set_log_fd(self, msg: Message) -> None:
        raise Refused("dirty logging (migration) is not supported")

    def _on_set_inflight_fd(self, msg: Message) -> None:
        raise Refused("inflight tracking is not supported")


def _region(d: RegionDesc) -> str:
    """A region as an operator reads it in the log (memory hot-plug shows up as these lines)."""
    xen = f", xen flags {d.xen_mmap_flags:#x} domid {d.domid:#x}" if d.xen_mmap_flags else ""
    return f"gpa {d.guest_phys_addr:#x} +{d.memory_size:#x} (uva {d.userspace_addr:#x}{xen})"


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
