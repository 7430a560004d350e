"""Conformance checks of what reaches the screen: 2D resources and their unref, transfers, scanouts, flushes,
the cursor, and the vhost-user-gpu display protocol (helpers shared with the other GPU checks in checks_gpu)."""

from __future__ import annotations

import struct
import time
from typing import Final

from ..protocol import (
    CTRL_HDR_SIZE,
    CtrlHdr,
    CtrlType,
    CursorPos,
    GetEdid,
    GpuFeature,
    MoveCursor,
    Rect,
    ResourceCreate2D,
    ResourceDetachBacking,
    ResourceFlush,
    ResourceUnref,
    SetScanout,
    TransferToHost2D,
    UpdateCursor,
)
from ..session import (
    EDID_RESP_SIZE,
    Session,
    hdr,
    make_display,
    pattern,
    rtype,
    type_name,
)
from ..vhost_user.frontend import Display
from ..vhost_user.wire import GPU_UPDATE_SIZE, GpuCursorUpdate, GpuProtocolFeature, GpuRequest, bit
from .checks_gpu import (
    ARGB,
    FENCE,
    QUIET,
    WAIT,
    XRGB,
    E,
    events_after,
    flush_and_collect,
    mark,
    need_display,
    picture,
    rgb,
    show,
    subimage,
    updates,
    wait_events,
)
from .context import CheckContext
from .errors import CheckFailed, expect
from .registry import check


@check("GPU-2D-UNREF", "unref-frees-id")
def unref_frees_id(ctx: CheckContext) -> str | None:
    """After RESOURCE_UNREF the id can be created again."""
    sess = ctx.session()
    sess.image_2d(1, 32, 32)
    sess.ok(ResourceUnref(hdr(E.CMD_RESOURCE_UNREF), 1), "RESOURCE_UNREF")
    sess.ok(ResourceCreate2D(hdr(E.CMD_RESOURCE_CREATE_2D), 1, XRGB, 16, 16), "CREATE_2D of the freed id")
    return None


def _disabled(sess: Session, start: int, scanout: int) -> bool:
    d = need_display(sess)
    for e in events_after(d, start, GpuRequest.SCANOUT) + events_after(d, start, GpuRequest.DMABUF_SCANOUT):
        sid, w, h = struct.unpack_from("<III", e.payload) if e.request == GpuRequest.SCANOUT else \
            struct.unpack_from("<I12xII", e.payload)
        if sid == scanout and w == 0 and h == 0:
            return True
    return False


def _wait_disabled(sess: Session, start: int, scanout: int) -> bool:
    deadline = time.monotonic() + WAIT
    while not _disabled(sess, start, scanout):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@check("GPU-2D-UNREF-SCANOUT", "unref-scanned-out")
def unref_scanned_out(ctx: CheckContext) -> str | None:
    """Unreferencing the resource a scanout shows disables that scanout (the display hears SCANOUT 0x0)."""
    sess = ctx.session()
    sess.image_2d(1, 64, 64, pixels=pattern(64, 64, 4), transfer=False)
    show(sess, 1, 0, Rect(0, 0, 64, 64))
    start = mark(need_display(sess))
    sess.ok(ResourceUnref(hdr(E.CMD_RESOURCE_UNREF), 1), "RESOURCE_UNREF of the shown resource")
    expect(_wait_disabled(sess, start, 0), "scanout 0 was not disabled when its resource went away")
    sess.expect(ResourceFlush(hdr(E.CMD_RESOURCE_FLUSH), Rect(0, 0, 64, 64), 1), E.RESP_ERR_INVALID_RESOURCE_ID,
                "RESOURCE_FLUSH of the freed resource")
    sess.serving()
    return None


@check("GPU-2D-DETACH", "detach-then-transfer")
def detach_then_transfer(ctx: CheckContext) -> str | None:
    """After DETACH_BACKING a transfer has nothing to read from and fails."""
    sess = ctx.session()
    sess.image_2d(1, 32, 32)
    sess.ok(ResourceDetachBacking(hdr(E.CMD_RESOURCE_DETACH_BACKING), 1), "DETACH_BACKING")
    errors = tuple(t for t in CtrlType if t.is_error)
    sess.expect(TransferToHost2D(hdr(E.CMD_TRANSFER_TO_HOST_2D), Rect(0, 0, 32, 32), 0, 1), errors,
                "TRANSFER_TO_HOST_2D without backing")
    return None


@check("GPU-2D-TRANSFER-OFFSET", "transfer-beyond-backing")
def transfer_beyond_backing(ctx: CheckContext) -> str | None:
    """A transfer whose offset plus span passes the end of the backing fails instead of reading past it."""
    sess = ctx.session()
    sess.image_2d(1, 32, 32)  # 4096 bytes of backing
    errors = tuple(t for t in CtrlType if t.is_error)
    sess.expect(TransferToHost2D(hdr(E.CMD_TRANSFER_TO_HOST_2D), Rect(0, 0, 32, 32), 2048, 1), errors,
                "TRANSFER_TO_HOST_2D of 4096 bytes at offset 2048 of a 4096-byte backing")
    sess.expect(TransferToHost2D(hdr(E.CMD_TRANSFER_TO_HOST_2D), Rect(0, 0, 1, 1), 1 << 40, 1), errors,
                "TRANSFER_TO_HOST_2D at offset 2^40")
    sess.serving()
    return None


@check("GPU-2D-TRANSFER-EXACT", "transfer-exact-rect")
def transfer_exact_rect(ctx: CheckContext) -> str | None:
    """TRANSFER_TO_HOST_2D of a sub-rectangle copies exactly it, reading rows `width*4` apart from `offset`."""
    sess = ctx.session()
    w, h = 32, 32
    data = pattern(w, h, 5).tobytes()
    sess.image_2d(1, w, h, pixels=data, transfer=False)
    sub = Rect(8, 4, 10, 6)
    offset = (sub.y * w + sub.x) * 4
    sess.ok(TransferToHost2D(hdr(E.CMD_TRANSFER_TO_HOST_2D), sub, offset, 1), "TRANSFER of (8,4) 10x6")
    show(sess, 1, 0, Rect(0, 0, w, h))
    got = picture(sess, 1, w, h)
    want = bytearray(w * h * 4)
    for j in range(sub.height):
        at = ((sub.y + j) * w + sub.x) * 4
        want[at:at + sub.width * 4] = data[at:at + sub.width * 4]
    if got != rgb(bytes(want)):
        bad = next(i for i in range(0, len(got), 4) if got[i:i + 4] != rgb(bytes(want))[i:i + 4]) // 4
        raise CheckFailed(f"pixel ({bad % w},{bad // w}) differs", got[bad * 4:bad * 4 + 32])
    return None


@check("GPU-SCANOUT-ID", "scanout-id-range")
def scanout_id_range(ctx: CheckContext) -> str | None:
    """SET_SCANOUT to scanout num_scanouts (one past the last) answers ERR_INVALID_SCANOUT_ID."""
    sess = ctx.session()
    sess.image_2d(1, 64, 64)
    sess.expect(SetScanout(hdr(E.CMD_SET_SCANOUT), Rect(0, 0, 64, 64), ctx.offer.scanouts, 1),
                E.RESP_ERR_INVALID_SCANOUT_ID, f"SET_SCANOUT {ctx.offer.scanouts}")
    sess.expect(SetScanout(hdr(E.CMD_SET_SCANOUT), Rect(0, 0, 64, 64), 0xFFFFFFFF, 1),
                E.RESP_ERR_INVALID_SCANOUT_ID, "SET_SCANOUT 0xffffffff")
    return None


@check("GPU-SCANOUT-DISABLE", "scanout-disable")
def scanout_disable(ctx: CheckContext) -> str | None:
    """SET_SCANOUT with resource 0 answers OK_NODATA and tells the display SCANOUT 0x0."""
    sess = ctx.session()
    sess.image_2d(1, 64, 64)
    show(sess, 1, 0, Rect(0, 0, 64, 64))
    start = mark(need_display(sess))
    sess.ok(SetScanout(hdr(E.CMD_SET_SCANOUT), Rect(0, 0, 0, 0), 0, 0), "SET_SCANOUT resource 0")
    expect(_wait_disabled(sess, start, 0), "the display was not told scanout 0 is disabled")
    return None


@check("GPU-FLUSH", "flush-updates-display")
def flush_updates_display(ctx: CheckContext) -> str | None:
    """Flushing part of a shown resource sends the display an UPDATE of that part (and no more), with the
    resource's pixels."""
    sess = ctx.session()
    w = h = 64
    data = pattern(w, h, 6).tobytes()
    sess.image_2d(1, w, h, pixels=data, transfer=False)
    sess.ok(TransferToHost2D(hdr(E.CMD_TRANSFER_TO_HOST_2D), Rect(0, 0, w, h), 0, 1), "TRANSFER_TO_HOST_2D")
    show(sess, 1, 0, Rect(0, 0, w, h))
    r = Rect(8, 8, 16, 16)
    got = flush_and_collect(sess, 1, r, 0, r.width * r.height)
    expect(bool(got), "no UPDATE for scanout 0 after RESOURCE_FLUSH")
    area = 0
    for u, px in got:
        expect(u.x >= r.x and u.y >= r.y and u.x + u.width <= r.x + r.width and u.y + u.height <= r.y + r.height,
               f"UPDATE ({u.x},{u.y}) {u.width}x{u.height} outside the flushed (8,8) 16x16")
        expect(len(px) == u.width * u.height * 4, f"UPDATE of {u.width}x{u.height} carries {len(px)} bytes")
        expect(rgb(px) == rgb(subimage(data, w, u)), "UPDATE pixels differ from the resource", px[:32])
        area += u.width * u.height
    expect(area >= r.width * r.height, f"UPDATEs cover {area} of {r.width * r.height} pixels")
    return None


@check("GPU-FLUSH-MIRROR", "flush-mirrored")
def flush_mirrored(ctx: CheckContext) -> str | None:
    """One resource on scanouts 0 and 1: one RESOURCE_FLUSH updates both."""
    sess = ctx.session()
    sess.image_2d(1, 64, 64, pixels=pattern(64, 64, 7), transfer=False)
    show(sess, 1, 0, Rect(0, 0, 64, 64))
    show(sess, 1, 1, Rect(0, 0, 64, 64))
    start = mark(need_display(sess))
    sess.ok(ResourceFlush(hdr(E.CMD_RESOURCE_FLUSH), Rect(0, 0, 64, 64), 1), "RESOURCE_FLUSH")
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and not (updates(sess, start, 0) and updates(sess, start, 1)):
        time.sleep(0.01)
    expect(bool(updates(sess, start, 0)), "no UPDATE for scanout 0")
    expect(bool(updates(sess, start, 1)), "no UPDATE for scanout 1 (the mirror)")
    return None


# --- cursor -----------------------------------------------------------------------------------------------------


def cursor_cmd(sess: Session, cmd: UpdateCursor | MoveCursor) -> bytes:
    return sess.cmd(cmd, CTRL_HDR_SIZE, queue=1)


def cursor_image(sess: Session, rid: int, size: int = 64) -> bytes:
    data = pattern(size, size, 8).tobytes()
    sess.image_2d(rid, size, size, ARGB, data, transfer=False)
    sess.ok(TransferToHost2D(CtrlHdr(E.CMD_TRANSFER_TO_HOST_2D, FENCE, 1), Rect(0, 0, size, size), 0, rid),
            "fenced TRANSFER of the cursor image")
    return data


@check("GPU-CURSOR-ANSWER", "cursor-answers")
def cursor_answers(ctx: CheckContext) -> str | None:
    """UPDATE_CURSOR and MOVE_CURSOR on the cursor queue are answered with RESP_OK_NODATA."""
    sess = ctx.session()
    cursor_image(sess, 1)
    for what, cmd in (("UPDATE_CURSOR", UpdateCursor(hdr(E.CMD_UPDATE_CURSOR), CursorPos(0, 10, 10), 1, 0, 0)),
                      ("MOVE_CURSOR", MoveCursor(hdr(E.CMD_MOVE_CURSOR), CursorPos(0, 20, 20)))):
        resp = cursor_cmd(sess, cmd)
        expect(rtype(resp) == E.RESP_OK_NODATA and len(resp) >= 24,
               f"{what} answered {type_name(rtype(resp))} ({len(resp)} bytes written)", resp)
    return None


@check("GPU-CURSOR-MOVE", "cursor-move")
def cursor_move(ctx: CheckContext) -> str | None:
    """MOVE_CURSOR looks only at pos: a bogus resource id and hotspot cause no error, the display gets
    CURSOR_POS with the new position."""
    sess = ctx.session()
    start = mark(need_display(sess))
    raw = struct.pack("<IIQIB3xIIIIIII", E.CMD_MOVE_CURSOR, 0, 0, 0, 0, 0, 100, 50, 0, 999, 7, 7) + bytes(4)
    resp = sess.cmd(raw, CTRL_HDR_SIZE, queue=1)
    expect(rtype(resp) not in {int(t) for t in CtrlType if t.is_error}, f"MOVE_CURSOR answered "
           f"{type_name(rtype(resp))}", resp)
    got = wait_events(need_display(sess), start, GpuRequest.CURSOR_POS,
                      lambda e: e.payload[:12] == struct.pack("<III", 0, 100, 50))
    expect(any(e.payload[:12] == struct.pack("<III", 0, 100, 50) for e in got),
           "no CURSOR_POS (0, 100, 50) on the display", got[0].payload if got else None)
    return None


@check("GPU-CURSOR-UPDATE", "cursor-update")
def cursor_update(ctx: CheckContext) -> str | None:
    """UPDATE_CURSOR of a 64x64 resource sends CURSOR_UPDATE (16404 bytes: position, hotspot, the image);
    resource 0 sends CURSOR_POS_HIDE."""
    sess = ctx.session()
    data = cursor_image(sess, 1)
    d = need_display(sess)
    start = mark(d)
    cursor_cmd(sess, UpdateCursor(hdr(E.CMD_UPDATE_CURSOR), CursorPos(0, 30, 40), 1, 3, 5))
    got = wait_events(d, start, GpuRequest.CURSOR_UPDATE)
    expect(bool(got), "no CURSOR_UPDATE on the display")
    p = got[0].payload
    expect(len(p) == GpuCursorUpdate.sizeof(), f"CURSOR_UPDATE of {len(p)} bytes", p[:32])
    u = GpuCursorUpdate.parse(p)
    expect((u.pos.scanout_id, u.pos.x, u.pos.y, u.hot_x, u.hot_y) == (0, 30, 40, 3, 5),
           f"CURSOR_UPDATE pos ({u.pos.scanout_id},{u.pos.x},{u.pos.y}) hot ({u.hot_x},{u.hot_y})", p[:20])
    expect(bytes(u.data) == data, "CURSOR_UPDATE image differs from the resource", bytes(u.data[:32]))
    start = mark(d)
    cursor_cmd(sess, UpdateCursor(hdr(E.CMD_UPDATE_CURSOR), CursorPos(0, 30, 40), 0, 0, 0))
    hidden = wait_events(d, start, GpuRequest.CURSOR_POS_HIDE)
    seen = [e for e in d.events[start:]]
    expect(bool(hidden), f"resource 0 did not hide the cursor (display got {[e.request.name for e in seen]})",
           seen[0].payload[:24] if seen else None)
    return None


@check("GPU-CURSOR-BAD", "cursor-bad")
def cursor_bad(ctx: CheckContext) -> str | None:
    """UPDATE_CURSOR of an unknown or a 32x32 resource changes no cursor image and breaks nothing."""
    sess = ctx.session()
    sess.image_2d(2, 32, 32, ARGB, pattern(32, 32, 9), transfer=False)
    d = need_display(sess)
    start = mark(d)
    cursor_cmd(sess, UpdateCursor(hdr(E.CMD_UPDATE_CURSOR), CursorPos(0, 1, 1), 999, 0, 0))
    cursor_cmd(sess, UpdateCursor(hdr(E.CMD_UPDATE_CURSOR), CursorPos(0, 1, 1), 2, 0, 0))
    time.sleep(QUIET)
    got = events_after(d, start, GpuRequest.CURSOR_UPDATE)
    expect(not got, "a CURSOR_UPDATE was sent for a missing or 32x32 resource", got[0].payload[:20] if got else None)
    sess.serving()
    resp = cursor_cmd(sess, MoveCursor(hdr(E.CMD_MOVE_CURSOR), CursorPos(0, 2, 2)))
    expect(rtype(resp) not in {int(t) for t in CtrlType if t.is_error}, "the cursor queue stopped working", resp)
    return None


# --- the display socket -----------------------------------------------------------------------------------------


def _display_traffic(ctx: CheckContext, sess: Session) -> None:
    """Everything that talks to the display: info, EDID, a scanout, a flush, the cursor."""
    sess.serving()
    if sess.has(GpuFeature.F_EDID.mask):
        sess.cmd(GetEdid(hdr(E.CMD_GET_EDID), 0), EDID_RESP_SIZE)
    sess.image_2d(1, 64, 64, pixels=pattern(64, 64, 10), transfer=False)
    sess.ok(TransferToHost2D(hdr(E.CMD_TRANSFER_TO_HOST_2D), Rect(0, 0, 64, 64), 0, 1), "TRANSFER_TO_HOST_2D")
    show(sess, 1, 0, Rect(0, 0, 64, 64))
    flush_and_collect(sess, 1, Rect(0, 0, 64, 64), 0, 64 * 64)
    cursor_image(sess, 2)
    cursor_cmd(sess, UpdateCursor(hdr(E.CMD_UPDATE_CURSOR), CursorPos(0, 5, 5), 2, 1, 1))
    cursor_cmd(sess, MoveCursor(hdr(E.CMD_MOVE_CURSOR), CursorPos(0, 6, 6)))
    cursor_cmd(sess, UpdateCursor(hdr(E.CMD_UPDATE_CURSOR), CursorPos(0, 5, 5), 0, 0, 0))
    sess.ok(SetScanout(hdr(E.CMD_SET_SCANOUT), Rect(0, 0, 0, 0), 0, 0), "SET_SCANOUT 0")
    time.sleep(QUIET)


@check("VUG-SOCKET-FIRST", "display-negotiation-first")
def display_negotiation_first(ctx: CheckContext) -> str | None:
    """On the display socket the back end's first messages are GET_PROTOCOL_FEATURES then SET_PROTOCOL_FEATURES,
    acknowledging only what the display offered."""
    sess = ctx.session()
    _display_traffic(ctx, sess)
    d = need_display(sess)
    seen = [e.request for e in d.events]
    expect(seen[:2] == [GpuRequest.GET_PROTOCOL_FEATURES, GpuRequest.SET_PROTOCOL_FEATURES],
           f"display conversation starts {[r.name for r in seen[:3]]}")
    acked = d.acked_protocol_features or 0
    expect(acked & ~d.protocol_features == 0, f"acknowledged {acked:#x} of offered {d.protocol_features:#x}")
    return None


@check("VUG-FEATURE-GATED", "display-feature-gated")
def display_feature_gated(ctx: CheckContext) -> str | None:
    """A display offering no protocol features gets no GET_EDID and no DMABUF_SCANOUT2."""
    sess = ctx.session(display=make_display(protocol_features=0))
    _display_traffic(ctx, sess)
    d = need_display(sess)
    bad = [e for e in d.events if e.request in (GpuRequest.GET_EDID, GpuRequest.DMABUF_SCANOUT2)]
    expect(not bad, f"{bad[0].request.name} sent without its protocol feature" if bad else "",
           bad[0].payload if bad else None)
    expect(not d.acked_protocol_features, f"acknowledged {d.acked_protocol_features:#x} of nothing offered")
    return None


_SIZES: Final = {
    GpuRequest.GET_PROTOCOL_FEATURES: 0, GpuRequest.SET_PROTOCOL_FEATURES: 8, GpuRequest.GET_DISPLAY_INFO: 0,
    GpuRequest.CURSOR_POS: 12, GpuRequest.CURSOR_POS_HIDE: 12, GpuRequest.CURSOR_UPDATE: 16404,
    GpuRequest.SCANOUT: 12, GpuRequest.DMABUF_SCANOUT: 40, GpuRequest.DMABUF_UPDATE: 20, GpuRequest.GET_EDID: 4,
    GpuRequest.DMABUF_SCANOUT2: 48,
}


@check("VUG-MESSAGE-LAYOUT", "display-message-layout")
def display_message_layout(ctx: CheckContext) -> str | None:
    """Every display message has its documented payload size (UPDATE: 20 bytes plus width*height*4)."""
    sess = ctx.session(display=make_display(protocol_features=bit(GpuProtocolFeature.EDID)))
    _display_traffic(ctx, sess)
    for e in need_display(sess).events:
        if e.request == GpuRequest.UPDATE:
            _, _, _, w, h = Display.update_rect(e.payload)
            want = GPU_UPDATE_SIZE + w * h * 4
        else:
            want = _SIZES[e.request]
        expect(len(e.payload) == want, f"{e.request.name} with {len(e.payload)} payload bytes, expected {want}",
               e.payload[:32])
    return None
