"""Code checks of the virtio-gpu device: sequences, display-socket traffic and config space, where a single
request and an expected response type cannot say enough."""

from __future__ import annotations

import struct
import time
from typing import Any, Final

from ..protocol import (
    CTRL_HDR_SIZE,
    CtrlFlag,
    CtrlHdr,
    CtrlType,
    CtxCreate,
    DisplayOne,
    Format,
    GetDisplayInfo,
    GetEdid,
    GpuFeature,
    MemEntries,
    Rect,
    ResourceAssignUuid,
    ResourceCreate2D,
    ResourceCreateBlob,
    ResourceDetachBacking,
    ResourceFlush,
    ResourceMapBlob,
    ResourceUnref,
    SetScanout,
    TransferToHost2D,
    encode_command,
)
from ..protocol import structs as s
from ..session import (
    DISPLAY_INFO_SIZE,
    DISPLAY_MODES,
    EDID_RESP_SIZE,
    PAGE,
    Session,
    hdr,
    make_display,
    pattern,
)
from ..vhost_user.frontend import Display, DisplayEvent, FrontendError
from ..vhost_user.wire import GPU_UPDATE_SIZE, GpuRequest
from .context import CheckContext
from .errors import CheckFailed, NotApplicable, expect, no_display_socket
from .registry import check

E = CtrlType
FENCE = int(CtrlFlag.FLAG_FENCE)
RING = int(CtrlFlag.FLAG_INFO_RING_IDX)
XRGB = Format.FORMAT_B8G8R8X8_UNORM
ARGB = Format.FORMAT_B8G8R8A8_UNORM
WAIT: Final = 3.0
QUIET: Final = 0.3  # how long we watch for something that must not happen
EVENTS_CLEAR: Final = 4


def rgb(data: bytes) -> bytes:
    """Pixels without their X/A byte (a back end may fill it as it likes on the display socket)."""
    out = bytearray(data)
    out[3::4] = bytes(len(out) // 4)
    return bytes(out)


def subimage(data: bytes, width: int, r: Rect) -> bytes:
    return b"".join(data[((r.y + j) * width + r.x) * 4:((r.y + j) * width + r.x + r.width) * 4]
                    for j in range(r.height))


def events_after(display: Display, start: int, req: GpuRequest) -> list[DisplayEvent]:
    with display.cond:
        return [e for e in display.events[start:] if e.request == req]


def wait_events(display: Display, start: int, req: GpuRequest, pred: object = None,
                timeout: float = WAIT) -> list[DisplayEvent]:
    """Events of type `req` since index `start`, once one satisfies `pred` (or the timeout passes)."""
    assert pred is None or callable(pred)
    deadline = time.monotonic() + timeout
    while True:
        got = events_after(display, start, req)
        if (got if pred is None else any(pred(e) for e in got)) or time.monotonic() > deadline:
            return got
        time.sleep(0.01)


def mark(display: Display) -> int:
    with display.cond:
        return len(display.events)


def need_display(sess: Session) -> Display:
    """The display socket's recorder; a check that watches it does not apply under a profile without one."""
    if sess.display is None:
        raise no_display_socket(sess.profile)
    return sess.display


def show(sess: Session, rid: int, scanout: int, r: Rect) -> None:
    """SET_SCANOUT and wait for the display to hear of it, so later traffic is not mistaken for its picture."""
    d = need_display(sess)
    start = mark(d)
    sess.ok(SetScanout(hdr(E.CMD_SET_SCANOUT), r, scanout, rid), f"SET_SCANOUT {scanout} to resource {rid}")
    wait_events(d, start, GpuRequest.SCANOUT, lambda e: e.payload[:4] == struct.pack("<I", scanout), 1.0)
    time.sleep(0.1)


def updates(sess: Session, start: int, scanout: int) -> list[tuple[Rect, bytes]]:
    out = []
    for e in events_after(need_display(sess), start, GpuRequest.UPDATE):
        sid, x, y, w, h = Display.update_rect(e.payload)
        if sid == scanout:
            out.append((Rect(x, y, w, h), e.payload[GPU_UPDATE_SIZE:]))
    return out


def flush_and_collect(sess: Session, rid: int, r: Rect, scanout: int, area: int) -> list[tuple[Rect, bytes]]:
    d = need_display(sess)
    start = mark(d)
    sess.ok(ResourceFlush(hdr(E.CMD_RESOURCE_FLUSH), r, rid), f"RESOURCE_FLUSH {rid}")
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        got = updates(sess, start, scanout)
        if sum(u.width * u.height for u, _ in got) >= area:
            return got
        time.sleep(0.01)
    return updates(sess, start, scanout)


def picture(sess: Session, rid: int, width: int, height: int, scanout: int = 0) -> bytes:
    """What the display shows of a whole width x height resource after a full flush (RGB only)."""
    got = flush_and_collect(sess, rid, Rect(0, 0, width, height), scanout, width * height)
    canvas = bytearray(width * height * 4)
    for r, data in got:
        for j in range(r.height):
            row = data[j * r.width * 4:(j + 1) * r.width * 4]
            at = ((r.y + j) * width + r.x) * 4
            canvas[at:at + len(row)] = row
    if sum(r.width * r.height for r, _ in got) < width * height:
        raise CheckFailed(f"flush of {width}x{height} brought UPDATEs covering "
                          f"{[(r.x, r.y, r.width, r.height) for r, _ in got]}")
    return rgb(bytes(canvas))


# --- header, fences, generic ------------------------------------------------------------------------------------


@check("GPU-HDR-SHORT", "short-request-not-executed")
def short_request_not_executed(ctx: CheckContext) -> str | None:
    """A CREATE_2D cut off after its format field is refused, and the resource id stays free."""
    sess = ctx.session()
    cut = encode_command(ResourceCreate2D(hdr(E.CMD_RESOURCE_CREATE_2D), 1, XRGB, 64, 64))[:32]
    sess.expect(cut, (E.RESP_ERR_INVALID_PARAMETER, E.RESP_ERR_UNSPEC), "32-byte CREATE_2D")
    sess.ok(ResourceCreate2D(hdr(E.CMD_RESOURCE_CREATE_2D), 1, XRGB, 64, 64), "full CREATE_2D of the same id")
    return None


@check("GPU-FENCE-DONE", "fenced-transfer-complete")
def fenced_transfer_complete(ctx: CheckContext) -> str | None:
    """A fenced TRANSFER_TO_HOST_2D is answered as that fence's completion only once the copy is done:
    overwriting the guest backing right after the answer must not change what the resource holds."""
    sess = ctx.session()
    w = h = 32
    first, second = pattern(w, h, 1).tobytes(), pattern(w, h, 2).tobytes()
    gpa = sess.image_2d(1, w, h, pixels=first, transfer=False).gpa
    req = TransferToHost2D(CtrlHdr(E.CMD_TRANSFER_TO_HOST_2D, FENCE, 41), Rect(0, 0, w, h), 0, 1)
    resp = sess.expect(req, E.RESP_OK_NODATA, "fenced TRANSFER_TO_HOST_2D")
    a = s.ctrl_hdr.parse(resp[:CTRL_HDR_SIZE])
    # The driver learns that fence 41 is done only from an answer that says so.
    expect(a.flags & FENCE != 0 and a.fence_id == 41, f"the answer does not complete fence 41 (flags {a.flags:#x} "
           f"fence_id {a.fence_id})", resp)
    sess.ram.write(gpa, second)
    show(sess, 1, 0, Rect(0, 0, w, h))
    got = picture(sess, 1, w, h)
    expect(got == rgb(first), "the resource does not hold what the guest had when the fence completed",
           got[:64])
    return None


@check("GPU-HDR-ECHO-RING", "ring-idx-echo")
def ring_idx_echo(ctx: CheckContext) -> str | None:
    """With CONTEXT_INIT a request carrying FLAG_INFO_RING_IDX is answered with that flag and ring_idx."""
    sess = ctx.session()
    create_context(ctx, sess, 1)
    req = encode_command(GetDisplayInfo(CtrlHdr(E.CMD_GET_DISPLAY_INFO, FENCE | RING, 9, 1, 3)))
    resp = sess.expect(req, E.RESP_OK_DISPLAY_INFO, "GET_DISPLAY_INFO on ring 3", DISPLAY_INFO_SIZE)
    a = s.ctrl_hdr.parse(resp[:CTRL_HDR_SIZE])
    expect(a.flags & RING != 0 and a.ring_idx == 3 and a.ctx_id == 1 and a.fence_id == 9,
           f"answered flags {a.flags:#x} ctx {a.ctx_id} ring {a.ring_idx} fence {a.fence_id}", resp[:24])
    return None


def create_context(ctx: CheckContext, sess: Session, ctx_id: int) -> int:
    """CTX_CREATE with the first offered capset as its type (CONTEXT_INIT) or the device default."""
    capset = min(ctx.offer.capsets) if ctx.offer.capsets and sess.has(GpuFeature.F_CONTEXT_INIT.mask) else 0
    sess.ok(CtxCreate(hdr(E.CMD_CTX_CREATE, ctx_id=ctx_id), 4, capset, b"conf"), f"CTX_CREATE {ctx_id}")
    return capset


@check("GPU-FENCE-TIMELINE", "fence-timelines")
def fence_timelines(ctx: CheckContext) -> str | None:
    """Fenced requests on two rings of one context, in one batch: on each timeline a fence never completes
    before a lower fence of the same timeline, and each answer names its own timeline and fence."""
    sess = ctx.session()
    create_context(ctx, sess, 1)
    plan = [(0, 1), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3), (0, 4)]
    q = sess.fe.queues[0]
    pend = []
    for ring, fence in plan:
        raw = encode_command(GetDisplayInfo(CtrlHdr(E.CMD_GET_DISPLAY_INFO, FENCE | RING, fence, 1, ring)))
        p = q.add([raw], [DISPLAY_INFO_SIZE])
        q.publish(p)
        pend.append((p, ring, fence))
    q.kick(force=True)
    order: list[tuple[int, int, bytes]] = []
    deadline = time.monotonic() + WAIT
    by_head = {id(p): (ring, fence) for p, ring, fence in pend}
    while len(order) < len(plan) and time.monotonic() < deadline:
        for done, written in q.collect():
            resp = q.read_response(done, written)
            ring, fence = by_head[id(done)]
            order.append((ring, fence, resp))
            q.release(done)
        q.wait(0.05)
    expect(len(order) == len(plan), f"{len(order)} of {len(plan)} fenced requests completed")
    last: dict[int, int] = {}
    for ring, fence, resp in order:
        a = s.ctrl_hdr.parse(resp[:CTRL_HDR_SIZE])
        expect(a.flags & FENCE != 0 and a.fence_id == fence and a.flags & RING != 0 and a.ring_idx == ring,
               f"fence {fence} on ring {ring} answered with flags {a.flags:#x} fence {a.fence_id} ring "
               f"{a.ring_idx}", resp[:24])
        expect(fence > last.get(ring, 0), f"fence {fence} on ring {ring} completed after fence {last.get(ring)}")
        last[ring] = fence
    return None


@check("GPU-UNKNOWN-CMD", "unknown-command-keeps-serving")
def unknown_command(ctx: CheckContext) -> str | None:
    """Types the spec does not define (0x0999, 0x0000, a response type) answer RESP_ERR_UNSPEC; the device
    carries on."""
    sess = ctx.session()
    for t in (0x0999, 0x0000, int(E.RESP_OK_NODATA)):
        sess.expect(struct.pack("<IIQIB3x", t, 0, 0, 0, 0) + bytes(32), E.RESP_ERR_UNSPEC, f"type {t:#06x}")
    sess.serving()
    return None


@check("GPU-FEATURE-GATING", "feature-gating")
def feature_gating(ctx: CheckContext) -> str | None:
    """With no device feature negotiated, GET_EDID, RESOURCE_CREATE_BLOB, CTX_CREATE and MAP_BLOB are refused
    and the refused blob leaves its id free."""
    sess = ctx.session(features=0)
    errors = tuple(t for t in CtrlType if t.is_error)
    sess.expect(GetEdid(hdr(E.CMD_GET_EDID), 0), errors, "GET_EDID without F_EDID", EDID_RESP_SIZE)
    gpa = sess.backing(PAGE).gpa
    sess.expect(ResourceCreateBlob(hdr(E.CMD_RESOURCE_CREATE_BLOB), 5, 1, 0, 0, PAGE, MemEntries.of([(gpa, PAGE)])),
                errors, "RESOURCE_CREATE_BLOB without F_RESOURCE_BLOB")
    sess.expect(CtxCreate(hdr(E.CMD_CTX_CREATE, ctx_id=1), 0, 0, b""), errors, "CTX_CREATE without F_VIRGL")
    sess.expect(ResourceMapBlob(hdr(E.CMD_RESOURCE_MAP_BLOB), 5, 0), errors,
                "RESOURCE_MAP_BLOB without F_RESOURCE_BLOB", 32)
    sess.ok(ResourceCreate2D(hdr(E.CMD_RESOURCE_CREATE_2D), 5, XRGB, 16, 16), "CREATE_2D of the refused blob's id")
    return None


@check("GPU-RESP-TYPES", "response-types")
def response_types(ctx: CheckContext) -> str | None:
    """Successful commands without payload answer RESP_OK_NODATA; those with one answer its own OK_* type."""
    sess = ctx.session()
    sess.image_2d(1, 64, 64, pixels=pattern(64, 64, 3), transfer=False)
    sess.ok(TransferToHost2D(hdr(E.CMD_TRANSFER_TO_HOST_2D), Rect(0, 0, 64, 64), 0, 1), "TRANSFER_TO_HOST_2D")
    sess.ok(SetScanout(hdr(E.CMD_SET_SCANOUT), Rect(0, 0, 64, 64), 0, 1), "SET_SCANOUT")
    sess.ok(ResourceFlush(hdr(E.CMD_RESOURCE_FLUSH), Rect(0, 0, 64, 64), 1), "RESOURCE_FLUSH")
    sess.ok(SetScanout(hdr(E.CMD_SET_SCANOUT), Rect(0, 0, 0, 0), 0, 0), "SET_SCANOUT to 0")
    sess.ok(ResourceDetachBacking(hdr(E.CMD_RESOURCE_DETACH_BACKING), 1), "DETACH_BACKING")
    sess.ok(ResourceUnref(hdr(E.CMD_RESOURCE_UNREF), 1), "RESOURCE_UNREF")
    sess.expect(GetDisplayInfo(hdr(E.CMD_GET_DISPLAY_INFO)), E.RESP_OK_DISPLAY_INFO, "GET_DISPLAY_INFO",
                DISPLAY_INFO_SIZE)
    if sess.has(GpuFeature.F_EDID.mask):
        sess.expect(GetEdid(hdr(E.CMD_GET_EDID), 0), E.RESP_OK_EDID, "GET_EDID", EDID_RESP_SIZE)
    if sess.has(GpuFeature.F_RESOURCE_UUID.mask):
        sess.ok(ResourceCreate2D(hdr(E.CMD_RESOURCE_CREATE_2D), 2, XRGB, 16, 16), "CREATE_2D")
        sess.expect(ResourceAssignUuid(hdr(E.CMD_RESOURCE_ASSIGN_UUID), 2), E.RESP_OK_RESOURCE_UUID,
                    "RESOURCE_ASSIGN_UUID", 40)
    return None


@check("GPU-RESP-BOUNDS", "small-response-buffer")
def small_response_buffer(ctx: CheckContext) -> str | None:
    """A 30-byte response buffer for the 408-byte display info: the device writes at most 30 bytes (the canary
    after the buffer survives) and keeps serving."""
    sess = ctx.session()
    q = sess.fe.queues[0]
    req = encode_command(GetDisplayInfo(hdr(E.CMD_GET_DISPLAY_INFO)))
    req_gpa = sess.ram.alloc(len(req))
    sess.ram.write(req_gpa, req)
    out = sess.ram.alloc(512, 64)
    canary = b"\xa5" * 512
    sess.ram.write(out, canary)
    p = q.add_raw([(req_gpa, len(req), False), (out, 30, True)])
    q.publish(p)
    q.kick(force=True)
    deadline = time.monotonic() + WAIT
    written = -1
    while written < 0 and time.monotonic() < deadline:
        for done, n in q.collect():
            if done is p:
                written = n
        q.wait(0.05)
    expect(written >= 0, "no completion for the request with a 30-byte response buffer")
    expect(written <= 30, f"used length {written} for a 30-byte buffer")
    after = sess.ram.read(out + 30, 512 - 30)
    expect(after == canary[30:], "bytes after the 30-byte buffer were overwritten", after[:48])
    sess.serving()
    return None


# --- config, display, EDID --------------------------------------------------------------------------------------


def config(sess: Session) -> Any:
    return s.config.parse(sess.fe.get_config(0, 16))


@check("GPU-CFG-SCANOUTS", "config-num-scanouts")
def config_num_scanouts(ctx: CheckContext) -> str | None:
    """num_scanouts in the config space is 1..16."""
    sess = ctx.session()
    raw = sess.fe.get_config(0, 16)
    n = s.config.parse(raw).num_scanouts
    expect(1 <= n <= 16, f"num_scanouts is {n}", raw)
    return None


@check("GPU-CFG-CAPSETS", "config-num-capsets")
def config_num_capsets(ctx: CheckContext) -> str | None:
    """Without VIRGL offered there are no capsets to report: num_capsets is 0."""
    if ctx.offer.has("virtio:VIRGL"):
        raise NotApplicable("VIRGL offered: the rule is about back ends without it")
    sess = ctx.session()
    raw = sess.fe.get_config(0, 16)
    expect(s.config.parse(raw).num_capsets == 0, "num_capsets is not 0 without VIRGL", raw)
    return None


@check("GPU-CFG-BLOB-ALIGNMENT", "config-blob-alignment")
def config_blob_alignment(ctx: CheckContext) -> str | None:
    """With BLOB_ALIGNMENT the 20-byte config carries a power-of-two blob_alignment."""
    sess = ctx.session()
    raw = sess.fe.get_config(0, 20)
    expect(len(raw) == 20, f"GET_CONFIG of 20 bytes returned {len(raw)}", raw)
    a = struct.unpack_from("<I", raw, 16)[0]
    expect(a != 0 and a & (a - 1) == 0, f"blob_alignment {a} is not a power of two", raw)
    return None


def _events_read(sess: Session) -> int:
    return int(config(sess).events_read)


@check("GPU-CFG-EVENTS-CLEAR", "events-clear")
def events_clear(ctx: CheckContext) -> str | None:
    """A write to events_read changes nothing; writing 1 to events_clear clears EVENT_DISPLAY."""
    sess = ctx.session(display=make_display(modes=(DisplayOne(Rect(0, 0, 1280, 720), True),)))
    time.sleep(0.2)
    before = _events_read(sess)
    try:
        sess.fe.set_config(0, struct.pack("<I", before ^ 1))
    except FrontendError:
        pass  # refusing the write is fine
    after = _events_read(sess)
    expect(after == before, f"writing events_read changed it from {before:#x} to {after:#x}")
    if not before & 1:
        return "EVENT_DISPLAY was never raised, so only the read-only half could be checked"
    sess.fe.set_config(EVENTS_CLEAR, struct.pack("<I", 1))
    cleared = _events_read(sess)
    expect(not cleared & 1, f"events_read still {cleared:#x} after writing 1 to events_clear")
    return None


@check("GPU-EVENT-DISPLAY", "display-event")
def display_event(ctx: CheckContext) -> str | None:
    """A display with a new layout makes the device raise EVENT_DISPLAY and send CONFIG_CHANGE_MSG."""
    ctx.need_display_socket()
    sess = ctx.session()
    sess.serving("first GET_DISPLAY_INFO")
    try:
        sess.fe.set_config(EVENTS_CLEAR, struct.pack("<I", 1))
    except FrontendError:
        pass
    changes = sess.fe.config_changes
    sess.fe.set_display(make_display(modes=(DisplayOne(Rect(0, 0, 1280, 720), True),)))
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and sess.fe.config_changes == changes:
        time.sleep(0.02)
    raw = sess.fe.get_config(0, 16)
    expect(sess.fe.config_changes > changes, "no BACKEND_CONFIG_CHANGE_MSG after the display layout changed", raw)
    expect(s.config.parse(raw).events_read & 1 == 1, "EVENT_DISPLAY not set after the layout changed", raw)
    return None


@check("GPU-DISPLAY-INFO", "display-info")
def display_info(ctx: CheckContext) -> str | None:
    """OK_DISPLAY_INFO of 408 bytes: the display's connected outputs enabled with their sizes, every other entry
    disabled, entries past num_scanouts zero."""
    ctx.need_display_socket()  # the outputs and their sizes are the display socket's answer
    sess = ctx.session()
    resp = sess.expect(GetDisplayInfo(hdr(E.CMD_GET_DISPLAY_INFO)), E.RESP_OK_DISPLAY_INFO, "GET_DISPLAY_INFO",
                       DISPLAY_INFO_SIZE)
    expect(len(resp) == DISPLAY_INFO_SIZE, f"{len(resp)} bytes written", resp[:48])
    info = s.resp_display_info.parse(resp)
    n = ctx.offer.scanouts
    for i, m in enumerate(info.pmodes):
        entry = resp[24 + 24 * i:48 + 24 * i]
        if i < min(n, len(DISPLAY_MODES)):
            want = DISPLAY_MODES[i].r
            expect(m.enabled == 1 and (m.r.width, m.r.height) == (want.width, want.height),
                   f"scanout {i}: enabled {m.enabled} {m.r.width}x{m.r.height}, the display has "
                   f"{want.width}x{want.height}", entry)
        elif i >= n:
            expect(entry == bytes(24), f"entry {i} (past num_scanouts {n}) is not zero", entry)
        else:
            expect(m.enabled == 0, f"scanout {i} enabled but not connected", entry)
    return None


@check("GPU-EDID", "edid")
def edid(ctx: CheckContext) -> str | None:
    """GET_EDID answers a valid EDID (header, checksums, size <= 1024) per scanout and refuses a scanout past
    num_scanouts."""
    sess = ctx.session()
    for sid in range(min(ctx.offer.scanouts, len(DISPLAY_MODES))):
        resp = sess.expect(GetEdid(hdr(E.CMD_GET_EDID), sid), E.RESP_OK_EDID, f"GET_EDID {sid}", EDID_RESP_SIZE)
        r = s.resp_edid.parse(resp)
        blob = bytes(r.edid[:r.size]) if r.size <= 1024 else b""
        expect(0 < r.size <= 1024 and r.size % 128 == 0, f"EDID size {r.size}", resp[24:40])
        expect(blob[:8] == bytes.fromhex("00ffffffffffff00"), "no EDID header", blob[:16])
        for b in range(0, r.size, 128):
            expect(sum(blob[b:b + 128]) % 256 == 0, f"EDID block {b // 128} checksum", blob[b + 120:b + 128])
    sess.expect(GetEdid(hdr(E.CMD_GET_EDID), ctx.offer.scanouts),
                (E.RESP_ERR_INVALID_PARAMETER, E.RESP_ERR_INVALID_SCANOUT_ID),
                f"GET_EDID {ctx.offer.scanouts} (past num_scanouts)", EDID_RESP_SIZE)
    return None


# --- 2D resources -----------------------------------------------------------------------------------------------
