"""Entry point (a): guest commands through the device, over real rings in real guest memory.

One session lives for the whole run, set up as a front end would (SET_MEM_TABLE with a memfd of guest RAM, a
back-end channel, both rings): the product's own `Session` and `GpuDevice`, driven through the product's request
handlers. For each input the driver side (`DriverQueue`, as tests and benchmarks use it) lays each command into
guest memory as a descriptor chain, and a kick has the session serve the queue exactly as an eventfd kick would.
After the input the device is reset (what RESET_DEVICE does to it; that closes the display socket an input may
have handed over, served by `display.DisplayPeer`) and the guest pages the input could have reached are zeroed,
so every input starts from the same device and the same memory, and a reproducer replays alone.

The back-end channel is negotiated without REPLY_ACK, so SHMEM_MAP/UNMAP do not wait for an answer; the harness
reads them off the other end after each input (and closes the buffer fds they carry), as a VMM would.

Checked per input: every chain comes back, with a response of a valid type that echoes the request's fence,
context and ring (when the buffer can hold a header); after the reset the device holds no resource, context,
mapping or host memory; and the product caught no unexpected exception (`checks`).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import socket
import struct
from typing import Final

from vgpu.blob.allocators import MemfdAllocator
from vgpu.blob.resolve import Resolver
from vgpu.gpu.config import GpuConfig
from vgpu.gpu.device import GpuDevice
from vgpu.gpu.resources import Limits
from vgpu.protocol import Capset, CtrlFlag, CtrlType, GpuFeature, decode_hdr
from vgpu.protocol.errors import CommandError
from vgpu.vhost_user.backend import TRANSPORT_FEATURES, Session
from vgpu.vhost_user.driver import DriverQueue, GuestRam, Pending
from vgpu.vhost_user.message import Channel, Message
from vgpu.vhost_user.wire import (
    VHOST_USER_VERSION,
    FrontendRequest,
    MemoryTable,
    ProtocolFeature,
    VringAddr,
    VringState,
    bit,
    build,
    build_u64,
)

from .checks import Failure, Hang, Leak
from .display import DisplayPeer
from .inputs import MAX_SPLIT, SEL_BLOB, SEL_DISPLAY, SEL_EDID, SEL_UUID, SEL_VIRGL, Chain, parse_commands

RAM_SIZE: Final = 16 << 20
QUEUE_SIZE: Final = 256
#: Guest pages below this hold the rings and the chains' buffers (the driver's); the rest is what backing entries
#: may point at, zeroed after every input.
DRIVER_AREA: Final = 1 << 20
LIMITS: Final = Limits(max_resources=256, max_host_bytes=32 << 20, max_backing_entries=1024, max_contexts=8)
CONFIG: Final = GpuConfig(limits=LIMITS, context_types=(int(Capset.CAPSET_CROSS_DOMAIN),),
                          host_visible_size=64 << 20, map_timeout=1.0)
# Chains and command bytes of one input at most; more are ignored (an input is a burst, not a session, and its
# buffers must fit the driver's area).
MAX_CHAINS: Final = 128
MAX_INPUT_BYTES: Final = 256 << 10
_VALID_TYPES: Final = frozenset(int(t) for t in CtrlType if 0x1100 <= t < 0x1300)
_ECHO: Final = int(CtrlFlag.FLAG_FENCE) | int(CtrlFlag.FLAG_INFO_RING_IDX)
_FALLOC_PUNCH: Final = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
#: How long the display thread may take to see the device close its socket at the end of an input.
DISPLAY_JOIN: Final = 10.0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def gpu_features(selector: int) -> int:
    f = 0
    if selector & SEL_EDID:
        f |= GpuFeature.F_EDID.mask
    if selector & SEL_UUID:
        f |= GpuFeature.F_RESOURCE_UUID.mask
    if selector & SEL_BLOB:
        f |= GpuFeature.F_RESOURCE_BLOB.mask
    if selector & SEL_VIRGL:
        f |= GpuFeature.F_VIRGL.mask | GpuFeature.F_CONTEXT_INIT.mask
    return f


class CommandsTarget:
    """The device behind one long-lived session; `run(data)` feeds it one input and returns the commands run."""

    name = "commands"

    def __init__(self) -> None:
        self.ram = GuestRam(RAM_SIZE)
        # Rings first (at the bottom), then the rest above DRIVER_AREA is set aside: the chains' buffers come
        # from the low megabyte only, and everything above it is the guest's to point backing at.
        self.queues = [DriverQueue(self.ram, index, QUEUE_SIZE, event_idx=True) for index in range(2)]
        if self.ram.alloc(RAM_SIZE - DRIVER_AREA, DRIVER_AREA) != DRIVER_AREA:
            raise RuntimeError("the rings do not fit below DRIVER_AREA")
        allocator = MemfdAllocator(max_size=LIMITS.max_host_bytes)
        self.device = GpuDevice(CONFIG, allocator, Resolver())
        self._frontend, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.session = Session(self.device, Channel(theirs))
        self._backend_peer, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._backend_peer.setblocking(False)
        self._display: DisplayPeer | None = None
        self._setup(theirs)

    def _send(self, req: FrontendRequest, payload: bytes = b"", fds: list[int] | None = None) -> None:
        self.session.requests.handle(Message(int(req), VHOST_USER_VERSION, payload, fds or []))

    def _setup(self, backend_end: socket.socket) -> None:
        """QEMU's order: owner, protocol features (no REPLY_ACK), back-end channel, memory, both rings."""
        st = self.session.state
        self._send(FrontendRequest.SET_OWNER)
        self._send(FrontendRequest.SET_PROTOCOL_FEATURES,
                   build_u64(st.offered_protocol & ~bit(ProtocolFeature.REPLY_ACK)))
        self._send(FrontendRequest.SET_BACKEND_REQ_FD, fds=[backend_end.detach()])
        self._set_features(0)
        region = dict(guest_phys_addr=0, memory_size=self.ram.size, userspace_addr=self.ram.uva, mmap_offset=0)
        table = build(MemoryTable, num_regions=1, regions=[region])
        self._send(FrontendRequest.SET_MEM_TABLE, table, [os.dup(self.ram.fd)])
        for index, q in enumerate(self.queues):
            self._send(FrontendRequest.SET_VRING_NUM, build(VringState, index=index, num=QUEUE_SIZE))
            self._send(FrontendRequest.SET_VRING_BASE, build(VringState, index=index, num=0))
            desc, used, avail = q.addresses
            self._send(FrontendRequest.SET_VRING_ADDR, build(VringAddr, index=index, flags=0, desc_user_addr=desc,
                                                              used_user_addr=used, avail_user_addr=avail,
                                                              log_guest_addr=0))
            self._send(FrontendRequest.SET_VRING_CALL, build_u64(index), [os.dup(q.call_fd)])
            self._send(FrontendRequest.SET_VRING_KICK, build_u64(index), [os.dup(q.kick_fd)])
            self._send(FrontendRequest.SET_VRING_ENABLE, build(VringState, index=index, num=1))
        if not all(vq.ready for vq in self.session.queues):
            raise RuntimeError("the harness could not start both rings")

    def _set_features(self, selector: int) -> None:
        self._send(FrontendRequest.SET_FEATURES, build_u64(TRANSPORT_FEATURES | gpu_features(selector)))

    # --- one input ----------------------------------------------------------------------------------------------

    def run(self, data: bytes) -> int:
        inp = parse_commands(data)
        self._set_features(inp.features)
        if inp.features & SEL_DISPLAY:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self._display = DisplayPeer(ours)
            self._display.start()
            self._send(FrontendRequest.GPU_SET_SOCKET, fds=[theirs.detach()])
        chains = inp.chains[:MAX_CHAINS]
        while sum(len(c.command) for c in chains) > MAX_INPUT_BYTES:
            chains.pop()
        published: list[list[tuple[Pending, Chain]]] = [[], []]
        try:
            for c in chains:
                q = self.queues[c.queue]
                if q.free_descriptors < MAX_SPLIT + 1:
                    self._kick(c.queue, published[c.queue])
                parts = _split(c.command, c.split)
                p = q.add(parts, [c.response_size] if c.response_size else [], c.indirect)
                q.publish(p)
                published[c.queue].append((p, c))
                if c.kick:
                    self._kick(c.queue, published[c.queue])
            for index in range(2):
                if published[index]:
                    self._kick(index, published[index])
        finally:
            self._end_of_input()
        return len(chains)

    def _kick(self, index: int, published: list[tuple[Pending, Chain]]) -> None:
        q = self.queues[index]
        self.session.process(self.session.queues[index])
        done = {id(p): written for p, written in q.collect()}
        try:
            for p, c in published:
                if id(p) not in done:
                    raise Failure(f"queue {index}: a well-formed chain was not returned ({c.command[:32].hex()})")
                _check_response(c, q.read_response(p, done[id(p)]), done[id(p)])
        finally:
            for p, _ in published:
                if id(p) in done:
                    q.release(p)
            published[:] = [(p, c) for p, c in published if id(p) not in done]
        try:
            os.eventfd_read(q.call_fd)
        except BlockingIOError:
            pass

    def _end_of_input(self) -> None:
        """Reset the device as RESET_DEVICE would, drain what it told the VMM, zero the pages it could reach."""
        self.device.reset()  # closes the display socket too
        if self._display is not None:
            self._display.join(DISPLAY_JOIN)
            alive, self._display = self._display.is_alive(), None
            if alive:
                raise Hang(f"the display thread still runs {DISPLAY_JOIN:.0f} s after the device closed it")
        self.session.state.memory.collect()
        for q in self.queues:
            q.drop_pool()
        _drain(self._backend_peer)
        _drain(self._frontend)
        if _libc.fallocate(self.ram.fd, _FALLOC_PUNCH, DRIVER_AREA, RAM_SIZE - DRIVER_AREA):
            raise OSError(ctypes.get_errno(), "fallocate(PUNCH_HOLE) of guest RAM")
        d = self.device
        left = (len(d.resources), d.resources.host_bytes, len(d.blobs.contexts), len(d.blobs.region))
        if any(left):
            raise Leak(f"after reset: {left[0]} resources, {left[1]} host bytes, {left[2]} contexts, "
                       f"{left[3]} mappings")

    def close(self) -> None:
        self.session.close()
        for q in self.queues:
            q.close()
        self.ram.close()
        self._backend_peer.close()
        self._frontend.close()


def _split(command: bytes, parts: int) -> list[bytes]:
    """The command over `parts` readable descriptors (the device must read a request however it is cut)."""
    if parts == 1 or len(command) < parts:
        return [command]
    step = len(command) // parts
    cuts = [i * step for i in range(parts)] + [len(command)]
    return [command[a:b] for a, b in itertools.pairwise(cuts)]


def _check_response(c: Chain, resp: bytes, written: int) -> None:
    if written > c.response_size:
        raise Failure(f"device wrote {written} bytes into a {c.response_size}-byte buffer")
    if c.response_size < 24:
        return
    if written < 24:
        raise Failure(f"a {written}-byte response to {c.command[:32].hex()}")
    rtype, flags, fence, ctx, ring = struct.unpack_from("<IIQIB", resp)
    if rtype not in _VALID_TYPES:
        raise Failure(f"response type {rtype:#x} to {c.command[:32].hex()}")
    try:
        req = decode_hdr(c.command)
    except CommandError:
        return  # too short to have a header: nothing to echo
    want = (req.flags & _ECHO, req.fence_id if req.flags & CtrlFlag.FLAG_FENCE else 0, req.ctx_id,
            req.ring_idx if req.flags & CtrlFlag.FLAG_INFO_RING_IDX else 0)
    if (flags, fence, ctx, ring) != want:
        raise Failure(f"response {rtype:#x} echoes flags/fence/ctx/ring {(flags, fence, ctx, ring)}, request had "
                      f"{want}: {c.command[:32].hex()}")


def _drain(sock: socket.socket) -> None:
    """Read everything the back end sent to this peer, closing the fds that came with it."""
    while True:
        try:
            data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4), socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for (fd,) in struct.iter_unpack("i", cdata[:len(cdata) - len(cdata) % 4]):
                    os.close(fd)
        if not data:
            return
