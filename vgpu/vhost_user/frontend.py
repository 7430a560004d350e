"""The front end (VMM side) of vhost-user, for driving any back end — ours or QEMU's C `vhost-user-gpu`.

It does what QEMU does for a vhost-user device, in the same order: negotiate, share guest memory, lay out and start
rings, then act as the guest.  Requests that the back end sends us (the back-end channel: SHMEM_MAP/UNMAP,
CONFIG_CHANGE; the vhost-user-gpu display socket) are served on a thread of their own, as QEMU serves them from its
main loop while the vCPUs wait, so a back end that blocks on us never blocks the test that drives it.
"""

from __future__ import annotations

import logging
import os
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from .driver import DriverQueue, Ram
from .message import Channel, Message, ProtocolError
from .shm_window import ShmMapping, ShmWindow, WindowError
from .wire import (
    CONFIG_HEADER_SIZE,
    FLAG_NEED_REPLY,
    GPU_UPDATE_SIZE,
    MMAP_REQUEST_SIZE,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_VERSION,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    BackendRequest,
    ConfigHeader,
    FrontendRequest,
    GpuEdidRequest,
    GpuProtocolFeature,
    GpuRequest,
    GpuUpdate,
    MemoryTable,
    ProtocolFeature,
    ShmemConfig,
    SingleMemoryRegion,
    VringAddr,
    XenMemoryTable,
    XenSingleMemoryRegion,
    bit,
    build,
    build_u64,
    parse_mmap_request,
    parse_u64,
)

log = logging.getLogger("vgpu.vhost_user.frontend")

# What this front end implements, offered to the back end as QEMU would.
FRONTEND_PROTOCOL_FEATURES: Final = (
    bit(ProtocolFeature.MQ)
    | bit(ProtocolFeature.REPLY_ACK)
    | bit(ProtocolFeature.BACKEND_REQ)
    | bit(ProtocolFeature.CONFIG)
    | bit(ProtocolFeature.BACKEND_SEND_FD)
    | bit(ProtocolFeature.RESET_DEVICE)
    | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
    | bit(ProtocolFeature.STATUS)
    | bit(ProtocolFeature.SHMEM)
)
# The order QEMU starts a ring in; a profile (vgpu.vhost_user.profiles) may name another.
QEMU_VRING_ORDER: Final = (
    FrontendRequest.SET_VRING_NUM, FrontendRequest.SET_VRING_BASE, FrontendRequest.SET_VRING_ADDR,
    FrontendRequest.SET_VRING_CALL, FrontendRequest.SET_VRING_KICK, FrontendRequest.SET_VRING_ENABLE,
)
DEFAULT_TIMEOUT: Final = 10.0
# UPDATE carries a whole frame inline: 16384 x 16384 x 4 bytes is the largest a scanout can be.
DISPLAY_MAX_PAYLOAD: Final = 16384 * 16384 * 4 + 64

class FrontendError(Exception):
    pass


@dataclass
class DisplayEvent:
    request: GpuRequest
    payload: bytes
    fds: list[int] = field(default_factory=list)


class Display:
    """The QEMU side of the vhost-user-gpu display socket: answers queries, records what the back end shows."""

    def __init__(self, display_info: Callable[[], bytes] | None = None,
                 edid: Callable[[int], bytes] | None = None,
                 protocol_features: int = bit(GpuProtocolFeature.EDID) | bit(GpuProtocolFeature.DMABUF2)) -> None:
        self.display_info = display_info
        self.edid = edid
        self.protocol_features = protocol_features
        self.acked_protocol_features: int | None = None
        self.events: list[DisplayEvent] = []
        self.cond = threading.Condition()
        self.channel: Channel | None = None

    def handle(self, msg: Message) -> None:
        ch = self.channel
        assert ch is not None
        try:
            req = GpuRequest(msg.request)
        except ValueError:
            log.warning("display: unknown message %d", msg.request)
            msg.close_fds()
            return
        reply: bytes | None = None
        if req == GpuRequest.GET_PROTOCOL_FEATURES:
            reply = build_u64(self.protocol_features)
        elif req == GpuRequest.SET_PROTOCOL_FEATURES:
            self.acked_protocol_features = parse_u64(msg.payload) if len(msg.payload) == 8 else None
        elif req == GpuRequest.GET_DISPLAY_INFO:
            if self.display_info is None:
                raise FrontendError("back end asked for display info and none was configured")
            reply = self.display_info()
        elif req == GpuRequest.GET_EDID:
            if self.edid is None:
                raise FrontendError("back end asked for an EDID and none was configured")
            reply = self.edid(GpuEdidRequest.parse(msg.payload).scanout_id)
        elif req == GpuRequest.DMABUF_UPDATE:
            reply = b""
        # Record before replying: whoever sees the effect of the reply must also see the record.
        with self.cond:
            self.events.append(DisplayEvent(req, msg.payload, msg.take_fds()))
            self.cond.notify_all()
        if reply is not None:
            ch.send(req, 0x4, reply)

    def wait_for(self, req: GpuRequest, count: int = 1, timeout: float = DEFAULT_TIMEOUT) -> list[DisplayEvent]:
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.of(req)) >= count, timeout)
            if not ok:
                raise TimeoutError(f"no {req.name} from the back end")
            return self.of(req)

    def of(self, req: GpuRequest) -> list[DisplayEvent]:
        return [e for e in self.events if e.request == req]

    @staticmethod
    def update_rect(payload: bytes) -> tuple[int, int, int, int, int]:
        u = GpuUpdate.parse(payload[:GPU_UPDATE_SIZE])
        return u.scanout_id, u.x, u.y, u.width, u.height

    def close(self) -> None:
        for e in self.events:
            for fd in e.fds:
                os.close(fd)
            e.fds = []


class Frontend:
    """Drives one back end over its vhost-user socket."""

    def __init__(self, sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.channel = Channel(sock)
        self.timeout = timeout
        self._lock = threading.RLock()
        self.features = 0
        self.protocol_features = 0
        self.backend_features = 0
        self.backend_protocol_features = 0
        self.ram: Ram | None = None
        self.queues: dict[int, DriverQueue] = {}
        self.shm: dict[int, ShmWindow] = {}
        self.display: Display | None = None
        self.config_changes = 0
        self.backend_requests: list[tuple[int, bytes]] = []
        # Called (on the service thread) before a SHMEM_MAP is acked, with the mapping and its fd: QEMU adds the
        # new range to the memory table at that point, which is what tests use this for.
        self.on_shmem_map: Callable[[ShmMapping, int], object] | None = None
        # How this front end behaves where VMMs differ (a profile sets these): whether its own requests ask for
        # REPLY_ACK, the u64 it answers a failed back-end request with, and handlers of back-end requests beyond
        # the standard ones (each returns the status, which is always sent back).
        self.acks_requests = True
        self.failure_status = 1
        self.extra_backend_requests: dict[int, Callable[[Message], int]] = {}
        # The protocol-feature bit that means SHMEM to this front end (21 for peers on rust-vmm vhost 0.16).
        self.shmem_bit: int = ProtocolFeature.SHMEM
        self._backend_chan: Channel | None = None
        self._display_chan: Channel | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._service: threading.Thread | None = None
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._stop_r, selectors.EVENT_READ, None)
        self.service_errors: list[str] = []

    @classmethod
    def connect(cls, path: str, timeout: float = DEFAULT_TIMEOUT, retry_for: float = 10.0) -> Frontend:
        """Connect to a back end's socket, waiting up to `retry_for` seconds for it to appear."""
        deadline = time.monotonic() + retry_for
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(path)
                return cls(s, timeout)
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    # --- raw requests -----------------------------------------------------------------------------------------

    def send(self, req: int, payload: bytes = b"", fds: list[int] | None = None, flags: int = VHOST_USER_VERSION,
             ) -> None:
        with self._lock:
            self.channel.send(req, flags, payload, fds)

    def recv(self, timeout: float | None = None) -> Message:
        """The next message from the back end on the main socket (a reply); raises TimeoutError."""
        with self._lock:
            msg = self.channel.poll()
            if msg is not None:
                return msg
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("no reply from the back end")
                r, _, _ = _select([self.channel.sock], remaining)
                if r:
                    self.channel.fill()
                    msg = self.channel.poll()
                    if msg is not None:
                        return msg

    def request(self, req: int, payload: bytes = b"", fds: list[int] | None = None, reply: bool = False,
                need_reply: bool | None = None) -> Message | None:
        """Send `req`; return its reply if it has one (`reply`), or the REPLY_ACK ack when asked for."""
        ack = self.acks_requests and self.has(ProtocolFeature.REPLY_ACK) if need_reply is None else need_reply
        ack = ack and not reply
        flags = VHOST_USER_VERSION | (FLAG_NEED_REPLY if ack else 0)
        with self._lock:
            self.send(req, payload, fds, flags)
            if not (reply or ack):
                return None
            msg = self.recv()
        if msg.request != req or msg.flags != (VHOST_USER_VERSION | 0x4):
            raise FrontendError(f"bad reply to {req}: request {msg.request} flags {msg.flags:#x}")
        if ack:
            status = parse_u64(msg.payload)
            if status:
                raise FrontendError(f"back end refused request {FrontendRequest(req).name} (ack {status})")
        return msg

    def u64(self, req: FrontendRequest) -> int:
        msg = self.request(req, reply=True)
        assert msg is not None
        if len(msg.payload) != 8:
            raise FrontendError(f"{req.name} reply of {len(msg.payload)} bytes")
        return parse_u64(msg.payload)

    def has(self, feature: ProtocolFeature) -> bool:
        wire = self.shmem_bit if feature == ProtocolFeature.SHMEM else feature
        return bool(self.protocol_features & bit(wire))

    # --- set-up, in QEMU's order ------------------------------------------------------------------------------

    def negotiate(self, device_features: int = 0, protocol_features: int = FRONTEND_PROTOCOL_FEATURES,
                  ring_features: int = bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_RING_F_INDIRECT_DESC)) -> None:
        """GET_FEATURES, protocol features, SET_OWNER, the back-end channel, then SET_FEATURES."""
        self.backend_features = self.u64(FrontendRequest.GET_FEATURES)
        if self.backend_features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            self.backend_protocol_features = self.u64(FrontendRequest.GET_PROTOCOL_FEATURES)
            self.protocol_features = self.backend_protocol_features & protocol_features
            self.request(FrontendRequest.SET_PROTOCOL_FEATURES, build_u64(self.protocol_features),
                         need_reply=False)
        self.request(FrontendRequest.SET_OWNER)
        if self.has(ProtocolFeature.BACKEND_REQ):
            self.open_backend_channel()
        wanted = (bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES) | ring_features
                  | device_features)
        self.features = self.backend_features & wanted
        self.request(FrontendRequest.SET_FEATURES, build_u64(self.features))

    def open_backend_channel(self) -> None:
        """SET_BACKEND_REQ_FD with one end of a new socket pair; requests on the other end are served from now."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.request(FrontendRequest.SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
        finally:
            theirs.close()
        self._backend_chan = Channel(ours)
        self._watch(self._backend_chan)

    def set_display(self, display: Display) -> None:
        """Hand the back end a display socket (GPU_SET_SOCKET) served by `display`."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        display.channel = Channel(ours, check_version=False, max_payload=DISPLAY_MAX_PAYLOAD)
        self.display = display
        self._display_chan = display.channel
        self._watch(display.channel)
        try:
            self.request(FrontendRequest.GPU_SET_SOCKET, fds=[theirs.fileno()], need_reply=False)
        finally:
            theirs.close()

    def shmem_config(self) -> dict[int, int]:
        msg = self.request(FrontendRequest.GET_SHMEM_CONFIG, reply=True)
        assert msg is not None
        cfg = ShmemConfig.parse(msg.payload)
        sizes = {i: s for i, s in enumerate(cfg.memory_sizes) if s}
        if len(sizes) != cfg.nregions:
            raise FrontendError(f"GET_SHMEM_CONFIG says {cfg.nregions} regions and lists {len(sizes)}")
        return sizes

    def reserve_shm(self, sizes: dict[int, int] | None = None) -> None:
        """Reserve a window for each of the back end's shared-memory regions (as QEMU sizes BARs): those of
        `sizes`, a GET_SHMEM_CONFIG answer already in hand, else of a new one."""
        for shmid, size in (self.shmem_config() if sizes is None else sizes).items():
            self.shm[shmid] = ShmWindow(shmid, size)

    def get_config(self, offset: int, size: int, flags: int = 0) -> bytes:
        msg = self.request(FrontendRequest.GET_CONFIG,
                           build(ConfigHeader, offset=offset, size=size, flags=flags) + bytes(size), reply=True)
        assert msg is not None
        hdr = ConfigHeader.parse(msg.payload[:CONFIG_HEADER_SIZE])
        if hdr.size == 0:
            raise FrontendError("GET_CONFIG failed (size 0)")
        return msg.payload[CONFIG_HEADER_SIZE:]

    def set_config(self, offset: int, data: bytes) -> None:
        self.request(FrontendRequest.SET_CONFIG,
                     build(ConfigHeader, offset=offset, size=len(data), flags=0) + data)

    def share_memory(self, ram: Ram, use_add_mem_reg: bool | None = None, regions: int = 1) -> None:
        """Give the back end the guest RAM: ADD_MEM_REG per region with CONFIGURE_MEM_SLOTS, else SET_MEM_TABLE
        (in the 40-byte Xen layout when XEN_MMAP was negotiated); `regions` splits a memfd RAM into that many
        table entries (as crosvm lays out RAM below and above the PCI hole), each with its own copy of the fd."""
        self.ram = ram
        xen = self.has(ProtocolFeature.XEN_MMAP)
        add = self.has(ProtocolFeature.CONFIGURE_MEM_SLOTS) if use_add_mem_reg is None else use_add_mem_reg
        if add:
            for region, fd in ram.regions():
                self.request(FrontendRequest.ADD_MEM_REG, _single_region(region, xen), fds=[fd])
            return
        table = ram.regions(regions)
        self.request(FrontendRequest.SET_MEM_TABLE, _mem_table([r for r, _ in table], xen),
                     fds=[fd for _, fd in table])

    def add_mem_reg(self, gpa: int, size: int, uva: int, mmap_offset: int, fd: int) -> None:
        region = dict(guest_phys_addr=gpa, memory_size=size, userspace_addr=uva, mmap_offset=mmap_offset)
        self.request(FrontendRequest.ADD_MEM_REG, _single_region(region), fds=[fd], need_reply=True)

    def rem_mem_reg(self, gpa: int, size: int, uva: int) -> None:
        region = dict(guest_phys_addr=gpa, memory_size=size, userspace_addr=uva, mmap_offset=0)
        self.request(FrontendRequest.REM_MEM_REG, _single_region(region), need_reply=True)

    def setup_queue(self, index: int, size: int = 256, enable: bool = True,
                    order: tuple[FrontendRequest, ...] = QEMU_VRING_ORDER) -> DriverQueue:
        """SET_VRING_NUM/BASE/ADDR/CALL/KICK (+ENABLE), in QEMU's order unless told another."""
        assert self.ram is not None, "share_memory first"
        event_idx = bool(self.features & bit(VIRTIO_RING_F_EVENT_IDX))
        q = DriverQueue(self.ram, index, size, event_idx)
        self.queues[index] = q
        desc, used, avail = q.addresses
        steps: dict[FrontendRequest, tuple[bytes, list[int] | None]] = {
            FrontendRequest.SET_VRING_NUM: (_state(index, size), None),
            FrontendRequest.SET_VRING_BASE: (_state(index, 0), None),
            FrontendRequest.SET_VRING_ADDR: (build_vring_addr(index, desc, used, avail), None),
            FrontendRequest.SET_VRING_CALL: (build_u64(index), [q.call_fd]),
            FrontendRequest.SET_VRING_KICK: (build_u64(index), [q.kick_fd]),
        }
        if enable and self.features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            steps[FrontendRequest.SET_VRING_ENABLE] = (_state(index, 1), None)
        for req in order:
            if req in steps:
                payload, fds = steps[req]
                self.request(req, payload, fds=fds)
        return q

    def get_vring_base(self, index: int) -> int:
        msg = self.request(FrontendRequest.GET_VRING_BASE, _state(index, 0), reply=True)
        assert msg is not None
        return int.from_bytes(msg.payload[4:8], "little")

    # --- acting as the guest ----------------------------------------------------------------------------------

    def submit(self, index: int, request: bytes, response_size: int, indirect: bool = False) -> bytes:
        """One request on queue `index`, waiting for its completion; returns what the device wrote."""
        q = self.queues[index]
        p = q.add([request], [response_size] if response_size else [], indirect)
        q.publish(p)
        q.kick()
        deadline = time.monotonic() + self.timeout
        while True:
            for done, written in q.collect():
                if done is p:
                    data = q.read_response(p, written)
                    q.release(p)
                    return data
                q.release(done)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no completion on queue {index}")
            q.wait(min(remaining, 0.05))

    def submit_batch(self, index: int, requests: list[bytes], response_size: int) -> list[bytes]:
        """Publish all requests, kick once, and wait for all of them (in completion order)."""
        q = self.queues[index]
        pend = []
        for r in requests:
            p = q.add([r], [response_size] if response_size else [])
            q.publish(p)
            pend.append(p)
        q.kick()
        results: dict[int, bytes] = {}
        want = {id(p) for p in pend}
        deadline = time.monotonic() + self.timeout
        while want:
            for done, written in q.collect():
                results[id(done)] = q.read_response(done, written)
                want.discard(id(done))
                q.release(done)
            if want:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(want)} requests on queue {index} not completed")
                q.wait(min(remaining, 0.05))
        return [results[id(p)] for p in pend]

    # --- requests from the back end ---------------------------------------------------------------------------

    def _watch(self, ch: Channel) -> None:
        self._sel.register(ch.sock, selectors.EVENT_READ, ch)
        if self._service is None:
            self._service = threading.Thread(target=self._serve, name="vhost-user-frontend", daemon=True)
            self._service.start()
        else:
            os.write(self._stop_w, b"r")  # wake the thread so it sees the new channel

    def _serve(self) -> None:
        while True:
            for key, _ in self._sel.select():
                ch = key.data
                if ch is None:
                    if os.read(self._stop_r, 64).endswith(b"q"):
                        return
                    continue
                try:
                    ch.fill()
                    while (msg := ch.poll()) is not None:
                        if ch is self._backend_chan:
                            self._on_backend_request(msg)
                        elif self.display is not None:
                            self.display.handle(msg)
                except (ProtocolError, OSError, FrontendError) as e:
                    self.service_errors.append(f"{type(e).__name__}: {e}")
                    self._sel.unregister(ch.sock)
                    ch.close()

    def _on_backend_request(self, msg: Message) -> None:
        ch = self._backend_chan
        assert ch is not None
        self.backend_requests.append((msg.request, msg.payload))
        status = 0
        try:
            if msg.request in (BackendRequest.SHMEM_MAP, BackendRequest.SHMEM_UNMAP):
                ok = self._shmem(msg, msg.request == BackendRequest.SHMEM_MAP)
                status = 0 if ok else self.failure_status
            elif msg.request == BackendRequest.CONFIG_CHANGE_MSG:
                self.config_changes += 1
            elif msg.request in self.extra_backend_requests:
                status = self.extra_backend_requests[msg.request](msg)
            else:
                status = self.failure_status
        finally:
            msg.close_fds()
        if msg.flags & FLAG_NEED_REPLY or msg.request in self.extra_backend_requests:
            ch.send_reply(msg.request, build_u64(status))

    def _shmem(self, msg: Message, is_map: bool) -> bool:
        """Map or unmap as asked; False (with the reason in service_errors) when the window cannot."""
        if len(msg.payload) != MMAP_REQUEST_SIZE:
            self.service_errors.append(f"SHMEM request of {len(msg.payload)} bytes")
            return False
        shmid, fd_offset, shm_offset, length, flags = parse_mmap_request(msg.payload)
        window = self.shm.get(shmid)
        if window is None:
            self.service_errors.append(f"SHMEM request for unknown shmid {shmid}")
            return False
        m = ShmMapping(shm_offset, length, fd_offset, flags)
        try:
            if is_map:
                if not msg.fds:
                    raise FrontendError("SHMEM_MAP without an fd")
                if self.on_shmem_map is not None:
                    self.on_shmem_map(m, msg.fds[0])
                window.map(msg.fds[0], m)
            else:
                window.unmap(m)
        except (FrontendError, WindowError, OSError) as e:
            self.service_errors.append(str(e))
            return False
        return True

    # --- teardown ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        if self._service is not None:
            os.write(self._stop_w, b"q")
            self._service.join(5)
        self._sel.close()
        for ch in (self._backend_chan, self._display_chan):
            if ch is not None:
                ch.close()
        if self.display is not None:
            self.display.close()
        self.channel.close()
        for q in self.queues.values():
            q.close()
        self.queues.clear()
        for w in self.shm.values():
            w.close()
        os.close(self._stop_r)
        os.close(self._stop_w)

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _select(rlist: list[Any], timeout: float) -> tuple[list[Any], list[Any], list[Any]]:
    return select.select(rlist, [], [], timeout)


def _state(index: int, num: int) -> bytes:
    return index.to_bytes(4, "little") + num.to_bytes(4, "little")


def build_vring_addr(index: int, desc: int, used: int, avail: int, flags: int = 0, log: int = 0) -> bytes:
    return build(VringAddr, index=index, flags=flags, desc_user_addr=desc, used_user_addr=used,
                 avail_user_addr=avail, log_guest_addr=log)


def _region(region: dict[str, int], xen: bool) -> dict[str, int]:
    """The region's fields in the layout negotiated: the Xen fields default to 0 (a plain file region) with
    XEN_MMAP, and must be absent without it."""
    if xen:
        return {"xen_mmap_flags": 0, "domid": 0, **region}
    if region.get("xen_mmap_flags") or region.get("domid"):
        raise FrontendError("a Xen region needs XEN_MMAP negotiated")
    return {k: v for k, v in region.items() if k not in ("xen_mmap_flags", "domid")}


def _single_region(region: dict[str, int], xen: bool = False) -> bytes:
    return (XenSingleMemoryRegion if xen else SingleMemoryRegion).build({"region": _region(region, xen)})


def _mem_table(regions: list[dict[str, int]], xen: bool = False) -> bytes:
    return (XenMemoryTable if xen else MemoryTable).build(
        {"num_regions": len(regions), "regions": [_region(r, xen) for r in regions]})
