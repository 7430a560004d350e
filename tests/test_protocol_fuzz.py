"""Property tests: the decoder's only failure mode is CommandError, and every valid command round-trips."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vgpu import protocol as p
from vgpu.protocol import responses as r
from vgpu.protocol import structs as s

T = p.CtrlType
u8 = st.integers(0, 0xFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)

COMMAND_TYPES = [int(c.TYPE) for c in p.COMMAND_CLASSES]


@st.composite
def ctrl_hdrs(draw: st.DrawFn, ctrl_type: int) -> p.CtrlHdr:
    flags = draw(u32)
    ring_max = p.VIRTIO_GPU_MAX_RING_IDX if flags & p.CtrlFlag.FLAG_INFO_RING_IDX else 0xFF
    return p.CtrlHdr(ctrl_type, flags, draw(u64), draw(u32), draw(st.integers(0, ring_max)))


mem_entries = st.lists(st.tuples(u64, u32), max_size=24).map(p.MemEntries.of)
rects = st.builds(p.Rect, u32, u32, u32, u32)
boxes = st.builds(p.Box, u32, u32, u32, u32, u32, u32)
cursor_positions = st.builds(p.CursorPos, u32, u32, u32)
quad = st.tuples(u32, u32, u32, u32)


@st.composite
def ctx_creates(draw: st.DrawFn) -> p.CtxCreate:
    name = draw(st.binary(max_size=64))
    nlen = draw(st.integers(64, 0xFFFF_FFFF)) if len(name) == 64 else len(name)
    return p.CtxCreate(draw(ctrl_hdrs(T.CMD_CTX_CREATE)), nlen, draw(u32), name)


def _h(cls: Any) -> st.SearchStrategy[p.CtrlHdr]:
    return ctrl_hdrs(int(cls.TYPE))


COMMAND_STRATEGIES: dict[type[Any], st.SearchStrategy[Any]] = {
    p.GetDisplayInfo: st.builds(p.GetDisplayInfo, _h(p.GetDisplayInfo)),
    p.ResourceCreate2D: st.builds(p.ResourceCreate2D, _h(p.ResourceCreate2D), u32, u32, u32, u32),
    p.ResourceUnref: st.builds(p.ResourceUnref, _h(p.ResourceUnref), u32),
    p.SetScanout: st.builds(p.SetScanout, _h(p.SetScanout), rects, u32, u32),
    p.ResourceFlush: st.builds(p.ResourceFlush, _h(p.ResourceFlush), rects, u32),
    p.TransferToHost2D: st.builds(p.TransferToHost2D, _h(p.TransferToHost2D), rects, u64, u32),
    p.ResourceAttachBacking: st.builds(p.ResourceAttachBacking, _h(p.ResourceAttachBacking), u32, mem_entries),
    p.ResourceDetachBacking: st.builds(p.ResourceDetachBacking, _h(p.ResourceDetachBacking), u32),
    p.GetCapsetInfo: st.builds(p.GetCapsetInfo, _h(p.GetCapsetInfo), u32),
    p.GetCapset: st.builds(p.GetCapset, _h(p.GetCapset), u32, u32),
    p.GetEdid: st.builds(p.GetEdid, _h(p.GetEdid), u32),
    p.ResourceAssignUuid: st.builds(p.ResourceAssignUuid, _h(p.ResourceAssignUuid), u32),
    p.ResourceCreateBlob: st.builds(
        p.ResourceCreateBlob, _h(p.ResourceCreateBlob), u32, u32, u32, u64, u64, mem_entries
    ),
    p.SetScanoutBlob: st.builds(p.SetScanoutBlob, _h(p.SetScanoutBlob), rects, u32, u32, u32, u32, u32, quad, quad),
    p.CtxCreate: ctx_creates(),
    p.CtxDestroy: st.builds(p.CtxDestroy, _h(p.CtxDestroy)),
    p.CtxAttachResource: st.builds(p.CtxAttachResource, _h(p.CtxAttachResource), u32),
    p.CtxDetachResource: st.builds(p.CtxDetachResource, _h(p.CtxDetachResource), u32),
    p.ResourceCreate3D: st.builds(
        p.ResourceCreate3D, _h(p.ResourceCreate3D), u32, u32, u32, u32, u32, u32, u32, u32, u32, u32, u32
    ),
    p.TransferToHost3D: st.builds(p.TransferToHost3D, _h(p.TransferToHost3D), boxes, u64, u32, u32, u32, u32),
    p.TransferFromHost3D: st.builds(p.TransferFromHost3D, _h(p.TransferFromHost3D), boxes, u64, u32, u32, u32, u32),
    p.SubmitCmd: st.builds(p.SubmitCmd, _h(p.SubmitCmd), st.binary(max_size=512)),
    p.ResourceMapBlob: st.builds(p.ResourceMapBlob, _h(p.ResourceMapBlob), u32, u64),
    p.ResourceUnmapBlob: st.builds(p.ResourceUnmapBlob, _h(p.ResourceUnmapBlob), u32),
    p.UpdateCursor: st.builds(p.UpdateCursor, _h(p.UpdateCursor), cursor_positions, u32, u32, u32),
    p.MoveCursor: st.builds(p.MoveCursor, _h(p.MoveCursor), cursor_positions),
}

any_command = st.one_of(*COMMAND_STRATEGIES.values())


def test_every_command_class_has_a_strategy() -> None:
    assert set(COMMAND_STRATEGIES) == set(p.COMMAND_CLASSES)


def _decode_or_error(buf: bytes) -> p.Command | p.CommandError:
    try:
        return p.decode(buf)
    except p.CommandError as e:
        assert e.response_type.is_error
        return e


@settings(max_examples=500)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_only_raise_command_error(buf: bytes) -> None:
    _decode_or_error(buf)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(COMMAND_TYPES), u32, u8, st.binary(max_size=800))
def test_known_type_with_garbage_body(ctrl_type: int, flags: int, ring_idx: int, body: bytes) -> None:
    # Random bytes almost never hit a valid type, so fix the type and let the rest be garbage.
    raw = s.ctrl_hdr.build({"type": ctrl_type, "flags": flags, "fence_id": 0, "ctx_id": 0, "ring_idx": ring_idx})
    out = _decode_or_error(raw + body)
    if isinstance(out, p.CommandError):
        assert p.decode_hdr(raw + body).type == ctrl_type  # the boundary can echo the header
    else:
        assert int(out.TYPE) == ctrl_type


@settings(max_examples=300)
@given(any_command)
def test_valid_commands_round_trip(cmd: Any) -> None:
    raw = p.encode_command(cmd)
    out = p.decode(raw)
    assert out == cmd
    assert p.encode_command(out) == raw


@settings(max_examples=200)
@given(any_command, st.data())
def test_truncated_valid_commands_are_rejected_cleanly(cmd: Any, data: st.DataObject) -> None:
    raw = p.encode_command(cmd)
    cut = data.draw(st.integers(0, len(raw) - 1))
    out = _decode_or_error(raw[:cut])
    # The encoding is exactly fixed part + declared tail, so any cut leaves one of them incomplete.
    assert isinstance(out, p.CommandError)
    assert out.response_type is T.RESP_ERR_INVALID_PARAMETER


@settings(max_examples=300)
@given(st.sampled_from(COMMAND_TYPES).flatmap(ctrl_hdrs))
def test_response_header_echo_rules(h: p.CtrlHdr) -> None:
    for raw in (r.ok_nodata(h), r.error(h, T.RESP_ERR_UNSPEC), r.map_info(h, 1), r.capset(h, b"x")):
        out = s.ctrl_hdr.parse(raw[:24])
        assert out.ctx_id == h.ctx_id
        assert bool(out.flags & p.CtrlFlag.FLAG_FENCE) == h.fenced
        assert out.fence_id == (h.fence_id if h.fenced else 0)
        assert bool(out.flags & p.CtrlFlag.FLAG_INFO_RING_IDX) == h.has_ring_idx
        assert out.ring_idx == (h.ring_idx if h.has_ring_idx else 0)
        assert out.flags & ~3 == 0
