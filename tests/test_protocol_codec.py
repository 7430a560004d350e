"""The derived codec against its reference: for every layout, the ``struct`` codec made from the construct
definition reads and writes the same bytes as construct itself, on random values and on truncated input; for
every command, the generated decoder and encoder agree with construct field by field."""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import pytest
from construct import ConstructError
from hypothesis import given, settings
from hypothesis import strategies as st

from vgpu import protocol as p
from vgpu.protocol import responses as r
from vgpu.protocol import structs as s
from vgpu.protocol.derive import DERIVED
from vgpu.vhost_user.layout import LayoutError, flatten, to_values

T = p.CtrlType


@pytest.mark.parametrize("name", sorted(s.ALL))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_flat_codec_agrees_with_construct(name: str, data: st.DataObject) -> None:
    con = s.ALL[name]
    flat = flatten(con)
    raw = data.draw(st.binary(min_size=con.sizeof(), max_size=con.sizeof()))
    parsed = con.parse(raw)
    assert flat.st.unpack(raw) == to_values(flat, parsed)
    assert flat.st.pack(*flat.st.unpack(raw)) == con.build(parsed)  # padding written as zeros by both
    cut = data.draw(st.integers(0, con.sizeof() - 1))
    with pytest.raises(struct.error):
        flat.st.unpack_from(raw[:cut])
    with pytest.raises(ConstructError):
        con.parse(raw[:cut])


def test_variable_length_layout_is_refused() -> None:
    from construct import GreedyBytes, Int32ul, Struct

    with pytest.raises(LayoutError):
        flatten(Struct("n" / Int32ul, "rest" / GreedyBytes))


def _record_values(cmd: Any, path: str) -> Any:
    v = cmd
    for part in path.split("."):
        v = v[int(part)] if part.isdigit() else getattr(v, part)
    return v


# Layout fields a record leaves out on purpose: counts derived from tails, clipped lengths kept as sent, and
# MOVE_CURSOR's borrowed UPDATE_CURSOR fields the spec tells the device to ignore.
_UNCLAIMED = {
    p.ResourceAttachBacking: {"nr_entries"},
    p.ResourceCreateBlob: {"nr_entries"},
    p.SubmitCmd: {"size"},
    p.MoveCursor: {"resource_id", "hot_x", "hot_y"},
}


@pytest.mark.parametrize("cls", p.COMMAND_CLASSES, ids=lambda c: c.__name__)
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_derived_command_codec_agrees_with_construct(cls: type[p.Command], data: st.DataObject) -> None:
    d = DERIVED[cls]
    size = cls.LAYOUT.sizeof()
    raw = bytearray(data.draw(st.binary(min_size=size, max_size=size)))
    raw[0:4] = int(cls.TYPE).to_bytes(4, "little")
    raw[4:8] = bytes(4)  # no FLAG_INFO_RING_IDX: any ring_idx byte is then legal
    counted = {"nr_entries", "size"} & set(d.flat.fields)
    parsed = cls.LAYOUT.parse(bytes(raw))
    for name in counted:  # a small count, with its tail present
        parsed[name] = 2
    raw = bytearray(cls.LAYOUT.build(parsed))
    parsed = cls.LAYOUT.parse(bytes(raw))
    tail = bytes(range(32)) if counted else b""
    cmd = p.decode(bytes(raw) + tail)
    assert type(cmd) is cls
    claimed = {f.name for f in dataclasses.fields(cls)}
    for path in d.flat.fields:
        top = path.split(".")[0]
        if top in _UNCLAIMED.get(cls, set()):
            continue
        assert top in claimed, f"{cls.__name__} drops layout field {path}"
        want = to_values(flatten(cls.LAYOUT), parsed)[d.flat.index(path)]
        got = _record_values(cmd, path)
        if path == "debug_name":
            want = want[: parsed.nlen]
        assert got == want, path
    # Encoding what was decoded gives construct's bytes for the same values (unclaimed fields as zero).
    expected = dict(parsed)
    for name in _UNCLAIMED.get(cls, set()) - counted:
        expected[name] = 0
    if cls is p.CtxCreate:
        expected["debug_name"] = parsed.debug_name[: parsed.nlen].ljust(64, b"\0")
    assert p.encode_command(cmd)[:size] == cls.LAYOUT.build(expected)


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 255),
       st.integers(0, 2**32 - 1))
def test_response_header_echo_agrees_with_construct(flags: int, fence: int, ctx: int, ring: int,
                                                    resp_type: int) -> None:
    req = p.CtrlHdr(T.CMD_RESOURCE_FLUSH, flags, fence, ctx, ring)
    out = s.ctrl_hdr.parse(r.ok_nodata(req))
    fenced, ringed = flags & p.CtrlFlag.FLAG_FENCE, flags & p.CtrlFlag.FLAG_INFO_RING_IDX
    assert out.type == T.RESP_OK_NODATA
    assert out.flags == flags & (p.CtrlFlag.FLAG_FENCE | p.CtrlFlag.FLAG_INFO_RING_IDX)
    assert out.fence_id == (fence if fenced else 0)
    assert out.ctx_id == ctx
    assert out.ring_idx == (ring if ringed else 0)


def test_display_info_response_round_trips_through_construct() -> None:
    modes = [p.DisplayOne(p.Rect(0, 0, 1280, 800), True), p.DisplayOne(p.Rect(1280, 0, 640, 480), False, 7)]
    raw = r.display_info(p.CtrlHdr(T.CMD_GET_DISPLAY_INFO), modes)
    ref = s.resp_display_info.parse(raw)
    assert [(m.r.x, m.r.width, m.enabled, m.flags) for m in ref.pmodes[:2]] == [(0, 1280, 1, 0), (1280, 640, 0, 7)]
    assert all(m.r.width == 0 and m.enabled == 0 for m in ref.pmodes[2:])
    assert r.parse_display_info(raw, 2) == modes


def test_edid_response_parse_checks_block_size() -> None:
    blob = bytes(range(128)) * 2
    raw = r.edid(p.CtrlHdr(T.CMD_GET_EDID), blob)
    assert s.resp_edid.parse(raw).size == 256
    assert r.parse_edid(raw) == blob
    assert r.parse_edid(r.edid(p.CtrlHdr(T.CMD_GET_EDID), bytes(100))) is None
