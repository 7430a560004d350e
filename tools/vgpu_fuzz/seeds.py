"""The seed corpus: what a driver and a VMM really send, so the fuzzer starts from inside the device.

``python -m vgpu_fuzz seeds`` rewrites ``corpus/commands`` and ``corpus/vhost_user`` from the sequences below (the
files are committed; the fuzzer only reads them). Commands seeds are the life of each kind of resource as the
Linux driver drives it (2D image on a scanout with a cursor; a guest blob on a scanout; a cross-domain host blob
mapped into the host-visible window) plus one well-sized, fenced request per command type. vhost-user seeds are
QEMU's set-up in its order, memory table changes, and a whole connection whose guest RAM (a memfd written by the
input) holds rings with a command on them, so messages reach the device.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from vgpu.protocol import (
    COMMAND_CLASSES,
    BlobFlag,
    BlobMem,
    Command,
    CtrlFlag,
    CtrlHdr,
    CtrlType,
    CtxAttachResource,
    CtxCreate,
    CtxDestroy,
    CtxDetachResource,
    CursorPos,
    Format,
    GetCapset,
    GetCapsetInfo,
    GetDisplayInfo,
    GetEdid,
    MemEntries,
    MoveCursor,
    Rect,
    ResourceAssignUuid,
    ResourceAttachBacking,
    ResourceCreate2D,
    ResourceCreateBlob,
    ResourceDetachBacking,
    ResourceFlush,
    ResourceMapBlob,
    ResourceUnmapBlob,
    ResourceUnref,
    SetScanout,
    SetScanoutBlob,
    SubmitCmd,
    TransferToHost2D,
    UpdateCursor,
    command_size,
    encode_command,
)
from vgpu.protocol.cross_domain import CrossDomainGetImageRequirements, CrossDomainInitV1
from vgpu.vhost_user.driver import DriverQueue, GuestRam
from vgpu.vhost_user.virtqueue import ring_sizes
from vgpu.vhost_user.wire import (
    FLAG_NEED_REPLY,
    VHOST_USER_VERSION,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    ConfigHeader,
    FrontendRequest,
    MemoryTable,
    ProtocolFeature,
    SingleMemoryRegion,
    VringAddr,
    VringState,
    bit,
    build,
    build_u64,
)

from .commands import DRIVER_AREA
from .inputs import (
    PAGE,
    SEL_BLOB,
    SEL_DISPLAY,
    SEL_EDID,
    SEL_UUID,
    SEL_VIRGL,
    Chain,
    CommandsInput,
    FdKind,
    FdSpec,
    Framed,
    Raw,
    Record,
    write_commands,
    write_vhost_user,
)

HERE = Path(__file__).resolve().parent
E = CtrlType
XR24 = int.from_bytes(b"XR24", "little")
ALL = SEL_EDID | SEL_UUID | SEL_BLOB | SEL_VIRGL
#: Guest pages the seeds use for backing: above the driver's area, where the harness zeroes after every input.
DATA = DRIVER_AREA


def h(t: CtrlType, ctx: int = 0, fence: int = 0) -> CtrlHdr:
    return CtrlHdr(t, flags=int(CtrlFlag.FLAG_FENCE) if fence else 0, fence_id=fence, ctx_id=ctx)


def pages(first: int, n: int) -> MemEntries:
    return MemEntries.of([(first + i * PAGE, PAGE) for i in range(n)])


def chain(cmd: Command | bytes, size: int = 24, queue: int = 0, kick: bool = False, split: int = 1,
          indirect: bool = False) -> Chain:
    raw = cmd if isinstance(cmd, bytes) else encode_command(cmd)
    return Chain(queue, kick, split, indirect, size, raw)


def two_d() -> CommandsInput:
    r = Rect(0, 0, 64, 64)
    return CommandsInput(SEL_EDID | SEL_UUID, [
        chain(GetDisplayInfo(h(E.CMD_GET_DISPLAY_INFO)), 408),
        chain(GetEdid(h(E.CMD_GET_EDID), 0), 1056),
        chain(ResourceCreate2D(h(E.CMD_RESOURCE_CREATE_2D), 1, Format.FORMAT_B8G8R8X8_UNORM, 64, 64)),
        chain(ResourceAttachBacking(h(E.CMD_RESOURCE_ATTACH_BACKING), 1, pages(DATA, 4)), split=2),
        chain(TransferToHost2D(h(E.CMD_TRANSFER_TO_HOST_2D), r, 0, 1)),
        chain(SetScanout(h(E.CMD_SET_SCANOUT), r, 0, 1)),
        chain(ResourceFlush(h(E.CMD_RESOURCE_FLUSH, fence=7), r, 1), kick=True),
        chain(ResourceAssignUuid(h(E.CMD_RESOURCE_ASSIGN_UUID), 1), 40),
        chain(ResourceCreate2D(h(E.CMD_RESOURCE_CREATE_2D), 2, Format.FORMAT_B8G8R8A8_UNORM, 64, 64)),
        chain(ResourceAttachBacking(h(E.CMD_RESOURCE_ATTACH_BACKING), 2, pages(DATA + 4 * PAGE, 4)),
              indirect=True),
        chain(TransferToHost2D(h(E.CMD_TRANSFER_TO_HOST_2D), r, 0, 2), kick=True),
        chain(UpdateCursor(h(E.CMD_UPDATE_CURSOR), CursorPos(0, 10, 10), 2, 1, 1), queue=1),
        chain(MoveCursor(h(E.CMD_MOVE_CURSOR), CursorPos(0, 20, 20)), queue=1, kick=True),
        chain(SetScanout(h(E.CMD_SET_SCANOUT), Rect(0, 0, 0, 0), 0, 0)),
        chain(ResourceDetachBacking(h(E.CMD_RESOURCE_DETACH_BACKING), 1)),
        chain(ResourceUnref(h(E.CMD_RESOURCE_UNREF), 1)),
        chain(ResourceUnref(h(E.CMD_RESOURCE_UNREF), 2)),
    ])


def guest_blob() -> CommandsInput:
    size = 64 * 64 * 4
    return CommandsInput(SEL_BLOB, [
        chain(ResourceCreateBlob(h(E.CMD_RESOURCE_CREATE_BLOB), 3, BlobMem.BLOB_MEM_GUEST,
                                 int(BlobFlag.BLOB_FLAG_USE_SHAREABLE), 0, size, pages(DATA, size // PAGE))),
        chain(SetScanoutBlob(h(E.CMD_SET_SCANOUT_BLOB), Rect(0, 0, 64, 64), 0, 3, 64, 64,
                             Format.FORMAT_B8G8R8X8_UNORM, (256, 0, 0, 0), (0, 0, 0, 0))),
        chain(ResourceFlush(h(E.CMD_RESOURCE_FLUSH), Rect(0, 0, 64, 64), 3), kick=True),
        chain(UpdateCursor(h(E.CMD_UPDATE_CURSOR), CursorPos(0, 1, 1), 3, 0, 0), queue=1, kick=True),
        chain(ResourceUnref(h(E.CMD_RESOURCE_UNREF), 3)),
    ])


def host_blob() -> CommandsInput:
    """The cross-domain sequence of minigbm under sommelier: context, query ring, INIT, image requirements, a
    HOST3D blob of the blob_id the device hands out first (1), mapped and unmapped."""
    init = CrossDomainInitV1.build(dict(hdr=dict(cmd=1, ring_idx=0, cmd_size=20), query_ring_id=100,
                                        channel_ring_id=0, channel_type=0))
    reqs = CrossDomainGetImageRequirements.build(dict(hdr=dict(cmd=2, ring_idx=0, cmd_size=24), width=256,
                                                      height=256, drm_format=XR24, flags=0x11))
    mappable = int(BlobFlag.BLOB_FLAG_USE_MAPPABLE | BlobFlag.BLOB_FLAG_USE_SHAREABLE)
    return CommandsInput(ALL, [
        chain(GetCapsetInfo(h(E.CMD_GET_CAPSET_INFO), 0), 40),
        chain(GetCapset(h(E.CMD_GET_CAPSET), 5, 0), 40),
        chain(CtxCreate(h(E.CMD_CTX_CREATE, ctx=1), 4, 5, b"fuzz")),
        chain(ResourceCreateBlob(h(E.CMD_RESOURCE_CREATE_BLOB), 100, BlobMem.BLOB_MEM_GUEST, 1, 0, PAGE,
                                 pages(DATA, 1))),
        chain(CtxAttachResource(h(E.CMD_CTX_ATTACH_RESOURCE, ctx=1), 100)),
        chain(SubmitCmd(h(E.CMD_SUBMIT_3D, ctx=1), bytes(init))),
        chain(SubmitCmd(h(E.CMD_SUBMIT_3D, ctx=1, fence=3), bytes(reqs)), kick=True),
        chain(ResourceCreateBlob(h(E.CMD_RESOURCE_CREATE_BLOB, ctx=1), 5, BlobMem.BLOB_MEM_HOST3D, mappable, 1,
                                 256 * 256 * 4, MemEntries.of([]))),
        chain(CtxAttachResource(h(E.CMD_CTX_ATTACH_RESOURCE, ctx=1), 5)),
        chain(ResourceMapBlob(h(E.CMD_RESOURCE_MAP_BLOB, ctx=1), 5, 0), 32),
        chain(ResourceUnmapBlob(h(E.CMD_RESOURCE_UNMAP_BLOB, ctx=1), 5), kick=True),
        chain(CtxDetachResource(h(E.CMD_CTX_DETACH_RESOURCE, ctx=1), 5)),
        chain(ResourceUnref(h(E.CMD_RESOURCE_UNREF), 5)),
        chain(CtxDestroy(h(E.CMD_CTX_DESTROY, ctx=1))),
    ])


def one_of_each() -> list[CommandsInput]:
    """Every command type, fenced, zero-filled to its size: the decoder's whole table as a starting point."""
    out = []
    for cls in COMMAND_CLASSES:
        t = int(cls.TYPE)
        size = command_size(t) or 24
        raw = bytearray(size)
        raw[:24] = encode_command(GetDisplayInfo(h(E.CMD_GET_DISPLAY_INFO, ctx=1, fence=t)))[:24]
        raw[:4] = t.to_bytes(4, "little")
        queue = 1 if t in (E.CMD_UPDATE_CURSOR, E.CMD_MOVE_CURSOR) else 0
        out.append(CommandsInput(ALL, [Chain(queue, False, 1, False, 24, bytes(raw))]))
    return out


# --- vhost-user ---------------------------------------------------------------------------------------------------

V = VHOST_USER_VERSION
ACK = VHOST_USER_VERSION | FLAG_NEED_REPLY
UVA = 0x7F00_0000_0000
RING_PAGES = 16
FEATURES = bit(VIRTIO_F_VERSION_1) | bit(30) | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_RING_F_INDIRECT_DESC)
PROTOCOL = (bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.BACKEND_REQ)
            | bit(ProtocolFeature.CONFIG) | bit(ProtocolFeature.BACKEND_SEND_FD) | bit(ProtocolFeature.STATUS)
            | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS) | bit(ProtocolFeature.SHMEM))


def msg(req: FrontendRequest, payload: bytes = b"", *fds: FdSpec, flags: int = V) -> Framed:
    return Framed(int(req), flags, payload, tuple(fds))


def state(index: int, num: int) -> bytes:
    return build(VringState, index=index, num=num)


def negotiate(gpu: int = 0) -> list[Record]:
    F = FrontendRequest
    return [
        msg(F.GET_FEATURES), msg(F.GET_PROTOCOL_FEATURES), msg(F.SET_PROTOCOL_FEATURES, build_u64(PROTOCOL)),
        msg(F.SET_OWNER, flags=ACK), msg(F.GET_QUEUE_NUM), msg(F.GET_MAX_MEM_SLOTS),
        msg(F.SET_BACKEND_REQ_FD, b"", FdSpec(FdKind.SOCKET), flags=ACK),
        msg(F.SET_FEATURES, build_u64(FEATURES | gpu), flags=ACK),
        msg(F.GET_SHMEM_CONFIG),
        msg(F.GET_CONFIG, build(ConfigHeader, offset=0, size=24, flags=0) + bytes(24)),
        msg(F.SET_CONFIG, build(ConfigHeader, offset=4, size=4, flags=0) + build_u64(1)[:4], flags=ACK),
        msg(F.SET_STATUS, build_u64(0xF), flags=ACK), msg(F.GET_STATUS),
    ]


def ram_with_command(cmd: bytes) -> tuple[bytes, list[Record]]:
    """Guest RAM (RING_PAGES pages, at guest address 0 and front-end address UVA) holding both rings and one
    chain on queue 0, and the ring set-up messages that point at it."""
    ram = GuestRam(RING_PAGES * PAGE)
    try:
        queues = [DriverQueue(ram, i, 8, event_idx=True) for i in range(2)]
        p = queues[0].add([cmd], [408])
        queues[0].publish(p)
        records: list[Record] = []
        for i, q in enumerate(queues):
            F = FrontendRequest
            records += [
                msg(F.SET_VRING_NUM, state(i, 8)), msg(F.SET_VRING_BASE, state(i, 0)),
                msg(F.SET_VRING_ADDR, build(VringAddr, index=i, flags=0, desc_user_addr=UVA + q.desc_gpa,
                                            used_user_addr=UVA + q.used_gpa, avail_user_addr=UVA + q.avail_gpa,
                                            log_guest_addr=0)),
                msg(F.SET_VRING_CALL, build_u64(i), FdSpec(FdKind.EVENTFD)),
                msg(F.SET_VRING_KICK, build_u64(i), FdSpec(FdKind.EVENTFD)),
                msg(F.SET_VRING_ENABLE, state(i, 1)),
            ]
        # Everything laid out so far (rings, the chain's buffers) lies below the end of the last of them.
        ends = [gpa + n for gpa, n, _ in p.buffers]
        ends += [q.used_gpa + ring_sizes(8)[2] for q in queues]
        content = ram.read(0, max(ends))
        for q in queues:
            q.close()
    finally:
        ram.close()
    return content, records


def whole_connection() -> list[Record]:
    cmd = encode_command(GetDisplayInfo(h(E.CMD_GET_DISPLAY_INFO, fence=1)))
    content, rings = ram_with_command(cmd)
    region = dict(guest_phys_addr=0, memory_size=RING_PAGES * PAGE, userspace_addr=UVA, mmap_offset=0)
    F = FrontendRequest
    return [*negotiate(), msg(F.SET_MEM_TABLE, build(MemoryTable, num_regions=1, regions=[region]),
                               FdSpec(FdKind.MEMFD, RING_PAGES, content), flags=ACK),
            *rings, msg(F.GET_VRING_BASE, state(0, 0)), msg(F.GET_VRING_BASE, state(1, 0)),
            msg(F.RESET_DEVICE, flags=ACK)]


def memory_changes() -> list[Record]:
    F = FrontendRequest
    one = dict(guest_phys_addr=0, memory_size=16 * PAGE, userspace_addr=UVA, mmap_offset=0)
    two = dict(guest_phys_addr=1 << 20, memory_size=4 * PAGE, userspace_addr=UVA + (1 << 20), mmap_offset=0)
    return [msg(F.SET_PROTOCOL_FEATURES, build_u64(PROTOCOL)),
            msg(F.ADD_MEM_REG, SingleMemoryRegion.build({"region": one}), FdSpec(FdKind.MEMFD, 16), flags=ACK),
            msg(F.ADD_MEM_REG, SingleMemoryRegion.build({"region": two}), FdSpec(FdKind.MEMFD, 4), flags=ACK),
            msg(F.REM_MEM_REG, SingleMemoryRegion.build({"region": one}), flags=ACK),
            msg(F.SET_MEM_TABLE, build(MemoryTable, num_regions=2, regions=[one, two]),
                FdSpec(FdKind.MEMFD, 16), FdSpec(FdKind.MEMFD, 4), flags=ACK)]


def display_socket() -> list[Record]:
    return [*negotiate(), msg(FrontendRequest.GPU_SET_SOCKET, b"", FdSpec(FdKind.SOCKET))]


def every_request() -> list[Record]:
    """Each request id (and a few past the last) with no payload, asking for an ack: one connection apiece would
    end at the first violation, so they are grouped by fives."""
    return [Framed(r, ACK, b"") for r in range(0, 50)]


def framing() -> list[Record]:
    """A header cut in two, then a message whose declared size runs past what is sent."""
    get = msg(FrontendRequest.GET_FEATURES)
    return [Raw(b"\x01\x00\x00\x00\x01"), Raw(b"\x00\x00\x00\x00\x00\x00\x00"), get,
            Raw(b"\x02\x00\x00\x00\x01\x00\x00\x00\x08\x00\x00\x00\x00")]


def write_all(out: Path | None = None) -> None:
    base = out or HERE / "corpus"
    shown = [CommandsInput(c.features | SEL_DISPLAY, c.chains) for c in (two_d(), guest_blob())]
    commands = [two_d(), guest_blob(), host_blob(), *shown, *one_of_each()]
    vhost = [negotiate(), whole_connection(), memory_changes(), display_socket(), framing(),
             *(every_request()[i:i + 5] for i in range(0, 50, 5))]
    for name, blobs in (("commands", [write_commands(c) for c in commands]),
                        ("vhost_user", [write_vhost_user(r) for r in vhost])):
        d = base / name
        d.mkdir(parents=True, exist_ok=True)
        for old in d.iterdir():
            old.unlink()
        for data in blobs:
            (d / hashlib.sha1(data).hexdigest()).write_bytes(data)
