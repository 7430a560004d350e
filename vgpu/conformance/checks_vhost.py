"""Checks of the vhost-user conversation: replies, REPLY_ACK, ring life cycle, memory tables, config space,
reset and disconnect — everything the GPU does not decide but a back end must get right to be driven at all."""

from __future__ import annotations

import os
import time
from typing import Final

from ..procfs import open_fds, wait_until
from ..protocol import (
    CtrlType,
    CursorPos,
    Format,
    MemEntries,
    MoveCursor,
    Rect,
    ResourceAttachBacking,
    ResourceCreate2D,
    ResourceUnref,
    TransferToHost2D,
    encode_command,
)
from ..session import PAGE, Session, hdr
from ..vhost_user.driver import DriverQueue, GuestRam
from ..vhost_user.frontend import FRONTEND_PROTOCOL_FEATURES, Frontend, FrontendError, build_vring_addr
from ..vhost_user.message import Message, PeerClosed
from ..vhost_user.wire import (
    FLAG_NEED_REPLY,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_VERSION,
    VIRTIO_F_VERSION_1,
    VRING_NOFD_MASK,
    ConfigHeader,
    FrontendRequest,
    MemoryTable,
    ProtocolFeature,
    SingleMemoryRegion,
    bit,
    build,
    build_u64,
    parse_u64,
)
from .context import CheckContext
from .errors import CheckFailed, NotApplicable, expect
from .registry import check

R = FrontendRequest
E = CtrlType
REPLY_FLAGS: Final = VHOST_USER_VERSION | 0x4
QUIET: Final = 0.3
XRGB = Format.FORMAT_B8G8R8X8_UNORM


def state(index: int, num: int) -> bytes:
    return index.to_bytes(4, "little") + num.to_bytes(4, "little")


def create_2d(rid: int, w: int = 16, h: int = 16) -> ResourceCreate2D:
    return ResourceCreate2D(hdr(E.CMD_RESOURCE_CREATE_2D), rid, XRGB, w, h)


def raw_reply(fe: Frontend, req: int, payload: bytes = b"", flags: int = VHOST_USER_VERSION,
              timeout: float = 2.0) -> Message:
    fe.send(req, payload, flags=flags)
    return fe.recv(timeout)


def _expect_eof_or_nothing(fe: Frontend, timeout: float) -> str:
    """'eof' if the back end closed the connection, 'quiet' if it sent nothing, else the message."""
    try:
        msg = fe.recv(timeout)
    except TimeoutError:
        return "quiet"
    except (PeerClosed, OSError):
        return "eof"
    return f"message {msg.request} flags {msg.flags:#x}"


def _replies(ctx: CheckContext) -> list[tuple[str, Message, int]]:
    """Requests with a reply body, sent raw, with the payload size each reply must have."""
    fe = ctx.frontend()
    out: list[tuple[str, Message, int]] = []
    feats = raw_reply(fe, R.GET_FEATURES)
    out.append(("GET_FEATURES", feats, 8))
    offered = parse_u64(feats.payload) if len(feats.payload) == 8 else 0
    if not offered & bit(VHOST_USER_F_PROTOCOL_FEATURES):
        return out
    pf = raw_reply(fe, R.GET_PROTOCOL_FEATURES)
    out.append(("GET_PROTOCOL_FEATURES", pf, 8))
    proto = parse_u64(pf.payload) if len(pf.payload) == 8 else 0
    fe.send(R.SET_PROTOCOL_FEATURES, build_u64(proto & FRONTEND_PROTOCOL_FEATURES))
    fe.protocol_features = proto & FRONTEND_PROTOCOL_FEATURES
    fe.send(R.SET_OWNER)
    fe.send(R.SET_FEATURES, build_u64(offered & (bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES))))
    if proto & bit(ProtocolFeature.CONFIG):
        out.append(("GET_CONFIG", raw_reply(fe, R.GET_CONFIG, build(ConfigHeader, offset=0, size=16, flags=0)
                                            + bytes(16)), 12 + 16))
    if proto & bit(ProtocolFeature.MQ):
        out.append(("GET_QUEUE_NUM", raw_reply(fe, R.GET_QUEUE_NUM), 8))
    if proto & bit(ProtocolFeature.CONFIGURE_MEM_SLOTS):
        out.append(("GET_MAX_MEM_SLOTS", raw_reply(fe, R.GET_MAX_MEM_SLOTS), 8))
    if proto & bit(ProtocolFeature.STATUS):
        out.append(("GET_STATUS", raw_reply(fe, R.GET_STATUS), 8))
    if proto & bit(ProtocolFeature.SHMEM):
        out.append(("GET_SHMEM_CONFIG", raw_reply(fe, R.GET_SHMEM_CONFIG), 2056))
    out.append(("GET_VRING_BASE", raw_reply(fe, R.GET_VRING_BASE, state(0, 0)), 8))
    return out


@check("VU-REPLIES-MANDATORY", "mandatory-replies")
def mandatory_replies(ctx: CheckContext) -> str | None:
    """Every request with a reply body that the back end's features make valid gets its reply."""
    got = _replies(ctx)  # a missing reply raises TimeoutError, which fails the check
    return f"answered {', '.join(name for name, _, _ in got)}"


@check("VU-REPLY-HEADER", "reply-header")
def reply_header(ctx: CheckContext) -> str | None:
    """Every reply has flags 0x5 (version 1 | REPLY), the request's id and the reply's size."""
    for name, msg, size in _replies(ctx):
        want = FrontendRequest[name]
        expect(msg.flags == REPLY_FLAGS, f"{name} reply flags {msg.flags:#x}", msg.payload[:16])
        expect(msg.request == want, f"{name} reply has request id {msg.request}")
        expect(len(msg.payload) == size, f"{name} reply of {len(msg.payload)} bytes, expected {size}",
               msg.payload[:16])
    return None


@check("VU-FEATURES", "features")
def features(ctx: CheckContext) -> str | None:
    """GET_PROTOCOL_FEATURES is answered as the very first request; GET_FEATURES offers PROTOCOL_FEATURES
    (bit 30) and VERSION_1 (bit 32)."""
    fe = ctx.frontend()
    msg = raw_reply(fe, R.GET_PROTOCOL_FEATURES)
    expect(msg.request == R.GET_PROTOCOL_FEATURES and len(msg.payload) == 8,
           "GET_PROTOCOL_FEATURES before GET_FEATURES not answered", msg.payload)
    f = parse_u64(raw_reply(fe, R.GET_FEATURES).payload)
    expect(f & bit(VHOST_USER_F_PROTOCOL_FEATURES) != 0, f"features {f:#x} lack bit 30", build_u64(f))
    expect(f & bit(VIRTIO_F_VERSION_1) != 0, f"features {f:#x} lack bit 32", build_u64(f))
    return None


def _ack(fe: Frontend, req: int, payload: bytes, what: str) -> int:
    """Send `req` with NEED_REPLY and return its u64 ack; fail if none comes or it is malformed."""
    fe.send(req, payload, flags=VHOST_USER_VERSION | FLAG_NEED_REPLY)
    try:
        msg = fe.recv()
    except TimeoutError:
        raise CheckFailed(f"no ack to {what} with NEED_REPLY within {fe.timeout:.0f} s") from None
    expect(msg.request == req and msg.flags == REPLY_FLAGS and len(msg.payload) == 8,
           f"{what} ack: request {msg.request} flags {msg.flags:#x} size {len(msg.payload)}", msg.payload)
    return parse_u64(msg.payload)


@check("VU-REPLY-ACK", "reply-ack")
def reply_ack(ctx: CheckContext) -> str | None:
    """With REPLY_ACK, NEED_REPLY gets a u64 ack: 0 for a request that worked, non-zero for one that did not;
    a request with its own reply body gets that reply and no extra ack."""
    sess = ctx.session()
    fe = sess.fe
    if not fe.has(ProtocolFeature.REPLY_ACK):
        raise NotApplicable("REPLY_ACK not negotiated")
    status = _ack(fe, R.SET_VRING_NUM, state(200, 256), "SET_VRING_NUM of queue 200")
    expect(status != 0, "SET_VRING_NUM of queue 200 acked as success", build_u64(status))
    status = _ack(fe, R.SET_FEATURES, build_u64(fe.features), "SET_FEATURES (same features, rings running)")
    expect(status == 0, f"SET_FEATURES of the negotiated features acked {status}", build_u64(status))
    fe.send(R.GET_FEATURES, flags=VHOST_USER_VERSION | FLAG_NEED_REPLY)
    first = fe.recv()
    fe.send(R.GET_PROTOCOL_FEATURES)
    second = fe.recv()
    expect(first.request == R.GET_FEATURES and second.request == R.GET_PROTOCOL_FEATURES,
           f"GET_FEATURES with NEED_REPLY answered by requests {first.request}, {second.request}", first.payload)
    sess.serving()
    return None


def _closed_or_reply(fe: Frontend, timeout: float) -> Message | None:
    """The next message, or None if the back end closed the connection."""
    try:
        return fe.recv(timeout)
    except (PeerClosed, OSError):
        return None


def _sent_unless_closed(fe: Frontend, req: int, payload: bytes = b"") -> bool:
    """Send `req`; False if the back end has closed the connection already.

    After a request the back end may legitimately answer by closing, our next write races that close: written
    before it, the close shows up on the next read; written after it, the write fails with EPIPE (or ECONNRESET
    when the back end closed with our bytes unread).  Either way the outcome is the close, not an error.
    """
    try:
        fe.send(req, payload)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


@check("VU-UNKNOWN-REQUEST", "unknown-request")
def unknown_request(ctx: CheckContext) -> str | None:
    """An unknown request with NEED_REPLY gets a failure ack (closing the connection is tolerated); without
    NEED_REPLY it is ignored or closes the connection; the process survives either way."""
    pid = ctx.backend.pid if ctx.backend.alive() else -1
    fe = ctx.session().fe
    notes = []
    fe.send(200, bytes(8), flags=VHOST_USER_VERSION | FLAG_NEED_REPLY)
    try:
        msg = _closed_or_reply(fe, 2.0)
    except TimeoutError:
        raise CheckFailed("unknown request with NEED_REPLY: no ack, connection left open") from None
    if msg is None:
        notes.append("closed the connection on an unknown request with NEED_REPLY")
    else:
        expect(msg.request == 200 and len(msg.payload) == 8 and parse_u64(msg.payload) != 0,
               f"unknown request with NEED_REPLY answered by request {msg.request} flags {msg.flags:#x}",
               msg.payload)
        notes.append("failure ack")
        follow: Message | None = None
        if _sent_unless_closed(fe, 201, bytes(8)) and _sent_unless_closed(fe, R.GET_FEATURES):
            try:
                follow = _closed_or_reply(fe, 2.0)
            except TimeoutError:
                raise CheckFailed("after an unknown request without NEED_REPLY, GET_FEATURES went unanswered"
                                  ) from None
        if follow is None:
            notes.append("closed on one without")
        else:
            expect(follow.request == R.GET_FEATURES, f"unknown request without NEED_REPLY answered by request "
                   f"{follow.request}", follow.payload)
            notes.append("ignored one without")
    ctx.close()
    time.sleep(QUIET)
    proc = ctx.backend.proc
    rc = proc.poll() if proc is not None and proc.pid == pid else None
    expect(rc is None or rc == 0, f"the back end died with status {rc}")
    return ", ".join(notes)


def _published(q: DriverQueue, sess: Session, request: bytes) -> None:
    p = q.add([request], [24])
    q.publish(p)


def _wait_used(q: DriverQueue, count: int, timeout: float) -> bool:
    return wait_until(lambda: q.used_idx() >= count, timeout)


def _restart_queue(fe: Frontend, q: DriverQueue, base: int) -> None:
    desc, used, avail = q.addresses
    fe.request(R.SET_VRING_NUM, state(q.index, q.size))
    fe.request(R.SET_VRING_BASE, state(q.index, base))
    fe.request(R.SET_VRING_ADDR, build_vring_addr(q.index, desc, used, avail))
    fe.request(R.SET_VRING_CALL, build_u64(q.index), fds=[q.call_fd])
    fe.request(R.SET_VRING_KICK, build_u64(q.index), fds=[q.kick_fd])
    if fe.features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
        fe.request(R.SET_VRING_ENABLE, state(q.index, 1))


@check("VU-GET-VRING-BASE", "get-vring-base")
def get_vring_base(ctx: CheckContext) -> str | None:
    """GET_VRING_BASE returns the next avail index and stops the ring (a kicked request stays untouched);
    SET_VRING_BASE with that value resumes exactly there."""
    sess = ctx.session()
    for i in range(3):
        sess.ok(create_2d(i + 1), f"CREATE_2D {i + 1}")
    base = sess.fe.get_vring_base(0)
    expect(base == 3, f"GET_VRING_BASE returned {base} after 3 requests", build_u64(base))
    q = sess.fe.queues[0]
    _published(q, sess, sess_bytes(create_2d(4)))
    q.kick(force=True)
    time.sleep(QUIET)
    expect(q.used_idx() == 3, f"used index moved to {q.used_idx()} on a stopped ring")
    _restart_queue(sess.fe, q, base)
    q.kick(force=True)
    expect(_wait_used(q, 4, 3.0), f"the ring did not resume at {base} (used index {q.used_idx()})")
    return None


def sess_bytes(cmd: ResourceCreate2D) -> bytes:
    return encode_command(cmd)


@check("VU-RING-START", "ring-start")
def ring_start(ctx: CheckContext) -> str | None:
    """A ring is not processed before its kick fd is set (and enabled, with PROTOCOL_FEATURES); without
    PROTOCOL_FEATURES a started ring runs with no SET_VRING_ENABLE at all."""
    sess = ctx.session(queues=False)
    fe, ram = sess.fe, sess.ram
    fe.share_memory(ram)
    q = DriverQueue(ram, 0, 64, False)
    fe.queues[0] = q
    desc, used, avail = q.addresses
    fe.request(R.SET_VRING_NUM, state(0, 64))
    fe.request(R.SET_VRING_BASE, state(0, 0))
    fe.request(R.SET_VRING_ADDR, build_vring_addr(0, desc, used, avail))
    fe.request(R.SET_VRING_CALL, build_u64(0), fds=[q.call_fd])
    _published(q, sess, sess_bytes(create_2d(1)))
    os.eventfd_write(q.kick_fd, 1)
    time.sleep(QUIET)
    expect(q.used_idx() == 0, "a request was processed before SET_VRING_KICK")
    fe.request(R.SET_VRING_KICK, build_u64(0), fds=[q.kick_fd])
    fe.request(R.SET_VRING_ENABLE, state(0, 1))
    q.kick(force=True)
    expect(_wait_used(q, 1, 3.0), "the request was not processed once the ring was kicked and enabled")
    ctx.drop(sess)
    ctx.settle_after_disconnect()
    # Without PROTOCOL_FEATURES: no SET_VRING_ENABLE is ever sent, the ring must run anyway.
    fe2 = ctx.frontend()
    offered = fe2.u64(R.GET_FEATURES)
    fe2.request(R.SET_OWNER)
    fe2.features = offered & bit(VIRTIO_F_VERSION_1)
    fe2.request(R.SET_FEATURES, build_u64(fe2.features))
    ram2 = GuestRam(8 << 20)
    try:
        fe2.share_memory(ram2, use_add_mem_reg=False)
        fe2.setup_queue(0, 64)
        resp = fe2.submit(0, sess_bytes(create_2d(1)), 24)
        expect(resp[:4] == int(E.RESP_OK_NODATA).to_bytes(4, "little"),
               "without PROTOCOL_FEATURES the request was not answered OK_NODATA", resp)
    finally:
        ctx.drop_frontend(fe2)
        ram2.close()
    return None


@check("VU-NOFD", "vring-nofd")
def vring_nofd(ctx: CheckContext) -> str | None:
    """SET_VRING_CALL and SET_VRING_KICK with the invalid-fd flag (bit 8) and no fd are accepted; with no call
    fd the ring still completes requests (the driver polls)."""
    sess = ctx.session()
    fe = sess.fe
    fe.request(R.SET_VRING_CALL, build_u64(0 | VRING_NOFD_MASK))
    sess.ok(create_2d(1), "CREATE_2D with no call fd")
    fe.request(R.SET_VRING_KICK, build_u64(1 | VRING_NOFD_MASK))
    sess.ok(create_2d(2), "CREATE_2D after queue 1 went to polling")
    return None


def _region(ram: GuestRam) -> dict[str, int]:
    return dict(guest_phys_addr=ram.gpa_base, memory_size=ram.size, userspace_addr=ram.uva, mmap_offset=0)


def _attach(sess: Session, rid: int, gpa: int) -> int:
    sess.ok(create_2d(rid), f"CREATE_2D {rid}")
    resp = sess.cmd(ResourceAttachBacking(hdr(E.CMD_RESOURCE_ATTACH_BACKING), rid, MemEntries.of([(gpa, PAGE)])))
    return int.from_bytes(resp[:4], "little")


@check("VU-MEM-TABLE", "mem-table")
def mem_table(ctx: CheckContext) -> str | None:
    """SET_MEM_TABLE with two regions maps both (rings in one, backing in the other); a second SET_MEM_TABLE,
    sent while the rings run, replaces the first (the dropped region no longer translates)."""
    proto = FRONTEND_PROTOCOL_FEATURES & ~bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
    sess = ctx.session(queues=False, protocol_features=proto)
    fe, a = sess.fe, sess.ram
    if not isinstance(a, GuestRam):  # a session over a Xen domain's own memory has no memfd to hand over
        raise NotApplicable("guest RAM is not a shared memfd")
    b = GuestRam(1 << 20, gpa_base=0x4000_0000, name="vgpu-conformance-b")
    c = GuestRam(1 << 20, gpa_base=0x8000_0000, name="vgpu-conformance-c")
    try:
        fe.request(R.SET_MEM_TABLE, MemoryTable.build({"num_regions": 2, "regions": [_region(a), _region(b)]}),
                   fds=[a.fd, b.fd])
        fe.ram = a
        fe.setup_queue(0, 64)
        fe.setup_queue(1, 64)
        ok = int(E.RESP_OK_NODATA)
        t = _attach(sess, 1, b.gpa_base)
        expect(t == ok, f"ATTACH_BACKING in the second region answered {t:#x}")
        sess.ok(TransferToHost2D(hdr(E.CMD_TRANSFER_TO_HOST_2D), Rect(0, 0, 16, 16), 0, 1), "TRANSFER from it")
        fe.request(R.SET_MEM_TABLE, MemoryTable.build({"num_regions": 2, "regions": [_region(a), _region(c)]}),
                   fds=[a.fd, c.fd])
        t = _attach(sess, 2, c.gpa_base)
        expect(t == ok, f"ATTACH_BACKING in the replacing region answered {t:#x}")
        t = _attach(sess, 3, b.gpa_base)
        expect(t != ok, "ATTACH_BACKING in the replaced region still succeeded")
    finally:
        ctx.drop(sess)
        b.close()
        c.close()
    return None


def _maps_of(pid: int, name: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(name in line for line in f)
    except FileNotFoundError:
        return False


@check("VU-MEM-SLOTS", "mem-slots")
def mem_slots(ctx: CheckContext) -> str | None:
    """ADD_MEM_REG adds a region that then translates; REM_MEM_REG removes it (unmapped from the process) and
    closes an fd wrongly attached to it."""
    sess = ctx.session()
    fe = sess.fe
    if not fe.has(ProtocolFeature.CONFIGURE_MEM_SLOTS):
        raise NotApplicable("CONFIGURE_MEM_SLOTS not negotiated")
    pid = ctx.backend.pid
    b = GuestRam(1 << 20, gpa_base=0x4000_0000, name="vgpu-conformance-added")
    stray = os.memfd_create("vgpu-conformance-stray", os.MFD_CLOEXEC)
    try:
        fe.add_mem_reg(b.gpa_base, b.size, b.uva, 0, b.fd)
        t = _attach(sess, 1, b.gpa_base)
        expect(t == int(E.RESP_OK_NODATA), f"ATTACH_BACKING in the added region answered {t:#x}")
        fe.request(R.REM_MEM_REG, SingleMemoryRegion.build({"region": _region(b)}), fds=[stray])
        sess.ok(ResourceCreate2D(hdr(E.CMD_RESOURCE_CREATE_2D), 9, XRGB, 4, 4), "a command after REM_MEM_REG")
        t = _attach(sess, 2, b.gpa_base)
        expect(t != int(E.RESP_OK_NODATA), "ATTACH_BACKING in the removed region still succeeded")
        held = [x for x in open_fds(pid) if "vgpu-conformance-stray" in x]
        expect(not held, "the fd sent with REM_MEM_REG is still open in the back end")
        sess.ok(ResourceCreate2D(hdr(E.CMD_RESOURCE_CREATE_2D), 10, XRGB, 4, 4), "drain")
        if _maps_of(pid, "vgpu-conformance-added"):
            # Resource 1's backing may legitimately keep the pages until it goes away.
            sess.ok(ResourceCreate2D(hdr(E.CMD_RESOURCE_CREATE_2D), 11, XRGB, 4, 4), "drain")
            sess.ok(ResourceUnref(hdr(E.CMD_RESOURCE_UNREF), 1), "UNREF of the resource backed there")
            expect(wait_until(lambda: not _maps_of(pid, "vgpu-conformance-added"), 2.0),
                   "the removed region is still mapped in the back end")
    finally:
        os.close(stray)
        ctx.drop(sess)
        b.close()
    return None


@check("VU-BAD-DESCRIPTOR", "bad-descriptor")
def bad_descriptor(ctx: CheckContext) -> str | None:
    """A chain whose buffer lies outside every region fails gracefully: the process lives and the vhost-user
    socket still answers."""
    sess = ctx.session()
    q = sess.fe.queues[0]
    resp = sess.ram.alloc(24)
    p = q.add_raw([(1 << 40, 24, False), (resp, 24, True)])
    q.publish(p)
    q.kick(force=True)
    time.sleep(QUIET)
    f = sess.fe.u64(R.GET_FEATURES)
    expect(f != 0, "GET_FEATURES after the bad descriptor")
    expect(ctx.backend.alive(), "the back end died")
    return None


@check("VU-SUSPENDED-QUIET", "suspended-quiet")
def suspended_quiet(ctx: CheckContext) -> str | None:
    """With every ring stopped (GET_VRING_BASE) kicked requests are not touched, nothing is written to guest
    memory and nothing is sent on the back-end channel or the display socket; front-end messages are still
    answered."""
    sess = ctx.session()
    sess.ok(create_2d(1), "CREATE_2D")
    fe = sess.fe
    fe.get_vring_base(0)
    fe.get_vring_base(1)
    time.sleep(0.1)
    display = sess.display  # none under a profile without a display socket: then only the back-end channel
    backend_msgs, display_msgs = len(fe.backend_requests), len(display.events) if display else 0
    before = sess.ram.read(0, sess.ram.size)
    q0, q1 = fe.queues[0], fe.queues[1]
    _published(q0, sess, sess_bytes(create_2d(2)))
    p = q1.add([encode_command(MoveCursor(hdr(E.CMD_MOVE_CURSOR), CursorPos(0, 9, 9)))], [24])
    q1.publish(p)
    ours = sess.ram.read(0, sess.ram.size)
    q0.kick(force=True)
    q1.kick(force=True)
    time.sleep(QUIET)
    expect(fe.u64(R.GET_FEATURES) != 0, "GET_FEATURES while suspended")
    after = sess.ram.read(0, sess.ram.size)
    del before
    if after != ours:
        at = next(i for i in range(len(after)) if after[i] != ours[i])
        raise CheckFailed(f"guest memory written at {at:#x} while every ring was stopped", after[at:at + 16])
    expect(len(fe.backend_requests) == backend_msgs, "back-end channel message while suspended")
    expect((len(display.events) if display else 0) == display_msgs, "display message while suspended")
    return None


@check("VU-CONFIG", "config-space")
def config_space(ctx: CheckContext) -> str | None:
    """GET_CONFIG returns exactly `size` bytes from `offset`; SET_CONFIG of num_scanouts or num_capsets changes
    nothing (only events_clear is writable)."""
    sess = ctx.session()
    fe = sess.fe
    full = fe.get_config(0, 16)
    expect(len(full) == 16, f"GET_CONFIG of 16 bytes returned {len(full)}", full)
    msg = fe.request(R.GET_CONFIG, build(ConfigHeader, offset=8, size=4, flags=0) + bytes(4), reply=True)
    assert msg is not None
    h = ConfigHeader.parse(msg.payload[:12])
    expect(h.size == 4 and len(msg.payload) == 16, f"GET_CONFIG(8, 4) reply header size {h.size}, payload "
           f"{len(msg.payload)}", msg.payload)
    expect(msg.payload[12:] == full[8:12], "GET_CONFIG(8, 4) differs from bytes 8..12 of the whole config",
           msg.payload)
    for off in (8, 12):
        try:
            fe.set_config(off, (int.from_bytes(full[off:off + 4], "little") + 5).to_bytes(4, "little"))
        except FrontendError:
            pass
    now = fe.get_config(0, 16)
    expect(now[8:16] == full[8:16], "SET_CONFIG changed a read-only field", now)
    return None


@check("VU-RESET-DEVICE", "reset-device")
def reset_device(ctx: CheckContext) -> str | None:
    """RESET_DEVICE drops every resource; after rings are set up again the device works with a clean slate."""
    sess = ctx.session()
    fe = sess.fe
    if not fe.has(ProtocolFeature.RESET_DEVICE):
        raise NotApplicable("RESET_DEVICE not negotiated")
    sess.ok(create_2d(1), "CREATE_2D")
    fe.request(R.RESET_DEVICE)
    for q in list(fe.queues.values()):
        q.close()
    fe.queues.clear()
    fe.setup_queue(0, 64)
    fe.setup_queue(1, 64)
    sess.ok(create_2d(1), "CREATE_2D of the same id after RESET_DEVICE")
    return None


@check("VU-RESET-OWNER", "reset-owner")
def reset_owner(ctx: CheckContext) -> str | None:
    """RESET_OWNER (deprecated) is ignored or disables the rings; it does not crash the back end."""
    sess = ctx.session()
    pid = ctx.backend.pid
    sess.fe.send(R.RESET_OWNER)
    outcome = "answered GET_FEATURES afterwards"
    try:
        sess.fe.u64(R.GET_FEATURES)
    except (OSError, TimeoutError, FrontendError, EOFError) as e:
        outcome = f"closed the connection ({type(e).__name__})"
    ctx.drop(sess)
    time.sleep(QUIET)
    proc = ctx.backend.proc
    rc = proc.poll() if proc is not None and proc.pid == pid else None
    expect(rc is None or rc == 0, f"the back end died with status {rc}")
    return outcome


@check("VU-DISCONNECT", "disconnect")
def disconnect(ctx: CheckContext) -> str | None:
    """After the front end goes away the back end either exits cleanly or releases the connection's state (its
    fd count returns to the idle one) and serves a new front end from scratch."""
    ctx.fresh_backend()
    b = ctx.backend
    idle = b.baseline_fds
    sess = ctx.session()
    sess.image_2d(1, 64, 64)
    sess.ok(ResourceCreate2D(hdr(E.CMD_RESOURCE_CREATE_2D), 2, XRGB, 8, 8), "CREATE_2D")
    ctx.drop(sess)
    proc = b.proc
    assert proc is not None
    if wait_until(lambda: proc.poll() is not None, 1.0):
        expect(proc.returncode == 0, f"the back end exited with {proc.returncode} on disconnect")
        return "exits on disconnect"
    now = b.settled_fds()
    expect(now == idle, f"{now} fds after the disconnect, {idle} when idle: {sorted(open_fds(b.pid))}")
    sess = ctx.session()
    sess.ok(create_2d(1), "CREATE_2D of an id the previous front end used")
    return "serves the next front end"


@check("VU-MQ", "multiqueue")
def multiqueue(ctx: CheckContext) -> str | None:
    """The back end offers MQ and GET_QUEUE_NUM reports both GPU queues."""
    fe = ctx.session().fe
    expect(fe.backend_protocol_features & bit(ProtocolFeature.MQ) != 0, "MQ not offered")
    n = fe.u64(R.GET_QUEUE_NUM)
    expect(n >= 2, f"GET_QUEUE_NUM says {n}", build_u64(n))
    return None


@check("VU-INBAND-NEEDS-CHANNEL", "inband-without-channel")
def inband_without_channel(ctx: CheckContext) -> str | None:
    """SET_PROTOCOL_FEATURES with INBAND_NOTIFICATIONS but without BACKEND_REQ and REPLY_ACK closes the
    connection."""
    fe = ctx.frontend()
    fe.u64(R.GET_FEATURES)
    fe.u64(R.GET_PROTOCOL_FEATURES)
    fe.send(R.SET_PROTOCOL_FEATURES, build_u64(bit(ProtocolFeature.INBAND_NOTIFICATIONS)))
    fe.send(R.GET_FEATURES)
    outcome = _expect_eof_or_nothing(fe, 2.0)
    expect(outcome == "eof", f"the connection stayed open ({outcome})")
    return None


@check("VU-NO-FD-LEAK", "fd-stable")
def fd_stable(ctx: CheckContext) -> str | None:
    """Forty commands of every kind leave the back end's fd count where it was."""
    sess = ctx.session()
    pid = ctx.backend.pid
    sess.image_2d(100, 16, 16)
    sess.serving()
    before = ctx.backend.settled_fds()
    names_before = sorted(open_fds(pid))
    for i in range(8):
        rid = i + 1
        sess.image_2d(rid, 16, 16)
        sess.ok(TransferToHost2D(hdr(E.CMD_TRANSFER_TO_HOST_2D), Rect(0, 0, 16, 16), 0, rid), "TRANSFER")
        sess.serving()
        sess.ok(ResourceUnref(hdr(E.CMD_RESOURCE_UNREF), rid), "UNREF")
    after = ctx.backend.settled_fds()
    grown = sorted(set(open_fds(pid)) - set(names_before))
    expect(after <= before, f"fd count grew from {before} to {after}: {grown[:6]}")
    return None

