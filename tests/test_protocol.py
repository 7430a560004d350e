"""Wire-format layer: sizes from the spec tables, round-trips, decoding of every command, rejection of
malformed requests, and the response-header echo rules."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest
from construct import Construct, Struct

from vgpu import protocol as p
from vgpu.protocol import cross_domain as xd
from vgpu.protocol import responses as r
from vgpu.protocol import structs as s
from vgpu.protocol.edid import EDID_HEADER, Timing, build_edid, parse_dtd

T = p.CtrlType
ERR_INVAL = T.RESP_ERR_INVALID_PARAMETER

# Sizes from specs.md §A.2b and cross-domain.md.
EXPECTED_SIZES: dict[str, tuple[Construct[Any, Any], int]] = {
    "ctrl_hdr": (s.ctrl_hdr, 24),
    "config": (s.config, 16),
    "config_v1_4": (s.config_v1_4, 20),
    "rect": (s.rect, 16),
    "box": (s.box, 24),
    "mem_entry": (s.mem_entry, 16),
    "cursor_pos": (s.cursor_pos, 16),
    "display_one": (s.display_one, 24),
    "get_display_info": (s.get_display_info, 24),
    "resp_display_info": (s.resp_display_info, 408),
    "get_edid": (s.get_edid, 32),
    "resp_edid": (s.resp_edid, 1056),
    "resource_create_2d": (s.resource_create_2d, 40),
    "resource_unref": (s.resource_unref, 32),
    "set_scanout": (s.set_scanout, 48),
    "resource_flush": (s.resource_flush, 48),
    "transfer_to_host_2d": (s.transfer_to_host_2d, 56),
    "resource_attach_backing": (s.resource_attach_backing, 32),
    "resource_detach_backing": (s.resource_detach_backing, 32),
    "get_capset_info": (s.get_capset_info, 32),
    "resp_capset_info": (s.resp_capset_info, 40),
    "get_capset": (s.get_capset, 32),
    "resp_capset": (s.resp_capset, 24),
    "resource_assign_uuid": (s.resource_assign_uuid, 32),
    "resp_resource_uuid": (s.resp_resource_uuid, 40),
    "resource_create_blob": (s.resource_create_blob, 56),
    "set_scanout_blob": (s.set_scanout_blob, 96),
    "resource_map_blob": (s.resource_map_blob, 40),
    "resp_map_info": (s.resp_map_info, 32),
    "resource_unmap_blob": (s.resource_unmap_blob, 32),
    "ctx_create": (s.ctx_create, 96),
    "ctx_destroy": (s.ctx_destroy, 24),
    "ctx_resource": (s.ctx_resource, 32),
    "resource_create_3d": (s.resource_create_3d, 72),
    "transfer_host_3d": (s.transfer_host_3d, 72),
    "cmd_submit": (s.cmd_submit, 32),
    "update_cursor": (s.update_cursor, 56),
    "CrossDomainHeader": (xd.CrossDomainHeader, 8),
    "CrossDomainInit": (xd.CrossDomainInit, 36),
    "CrossDomainInitV1": (xd.CrossDomainInitV1, 20),
    "CrossDomainInitLegacy": (xd.CrossDomainInitLegacy, 16),
    "CrossDomainGetImageRequirements": (xd.CrossDomainGetImageRequirements, 24),
    "CrossDomainImageRequirements": (xd.CrossDomainImageRequirements, 64),
    "CrossDomainCapabilities": (xd.CrossDomainCapabilities, 16),
}

def field_offset(con: Struct, path: str) -> int:
    """Offset of a (dotted) field, derived through the numpy dtype so it is independent of the encoder."""
    dt = p.struct_dtype(con)
    off = 0
    for part in path.split("."):
        assert dt.fields is not None
        sub, o = dt.fields[part][:2]
        off += o
        dt = sub
    return off


def noisy(n: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# ---------------------------------------------------------------------------------------------- structs


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
def test_struct_size_matches_spec(name: str) -> None:
    con, size = EXPECTED_SIZES[name]
    assert con.sizeof() == size


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
def test_struct_round_trip(name: str) -> None:
    con, size = EXPECTED_SIZES[name]
    raw = noisy(size, seed=size)
    parsed = con.parse(raw)
    built = con.build(parsed)
    assert len(built) == size
    assert con.parse(built) == parsed
    assert con.build(con.parse(built)) == built


@pytest.mark.parametrize("name", sorted(s.ALL))
def test_every_struct_is_in_size_table(name: str) -> None:
    assert any(con is s.ALL[name] for con, _ in EXPECTED_SIZES.values()), name


def test_padding_is_written_as_zero_and_ignored_on_parse() -> None:
    raw = bytearray(noisy(24))
    raw[0:4] = (0x0100).to_bytes(4, "little")
    built = s.ctrl_hdr.build(s.ctrl_hdr.parse(bytes(raw)))
    assert built[:21] == raw[:21]
    assert built[21:24] == b"\0\0\0"


@pytest.mark.parametrize(
    ("con", "path", "offset"),
    [
        (s.ctrl_hdr, "fence_id", 8),
        (s.ctrl_hdr, "ring_idx", 20),
        (s.transfer_to_host_2d, "offset", 40),
        (s.transfer_to_host_2d, "resource_id", 48),
        (s.resource_create_blob, "nr_entries", 36),
        (s.resource_create_blob, "blob_id", 40),
        (s.resource_create_blob, "size", 48),
        (s.resource_map_blob, "offset", 32),
        (s.update_cursor, "pos.y", 32),
        (s.update_cursor, "hot_y", 48),
        (s.transfer_host_3d, "box.d", 44),
        (s.transfer_host_3d, "layer_stride", 68),
        (s.set_scanout_blob, "strides", 64),
        (s.set_scanout_blob, "offsets", 80),
        (s.config_v1_4, "blob_alignment", 16),
        (xd.CrossDomainImageRequirements, "modifier", 32),
        (xd.CrossDomainImageRequirements, "blob_id", 48),
        (xd.CrossDomainImageRequirements, "map_info", 52),
        (xd.CrossDomainInit, "internal_socket_uuid", 20),
    ],
)
def test_field_offsets_match_spec(con: Struct, path: str, offset: int) -> None:
    assert field_offset(con, path) == offset


def test_dtype_matches_construct_for_every_struct() -> None:
    for name, con in s.ALL.items():
        dt = p.struct_dtype(con)
        assert dt.itemsize == con.sizeof(), name


def test_cross_domain_init_sizes_are_distinct() -> None:
    assert {16, 20, 36} == xd.CROSS_DOMAIN_INIT_SIZES


# ---------------------------------------------------------------------------------------------- commands


def hdr(t: T, **kw: Any) -> p.CtrlHdr:
    return p.request_hdr(t, **kw)


ENTRIES = p.MemEntries.of([(0x1000, 4096), (0x8000, 8192), (0xFFFF_FFFF_F000, 0xFFFF_FFFF)])


def sample_commands() -> list[p.Command]:
    return [
        p.GetDisplayInfo(hdr(T.CMD_GET_DISPLAY_INFO)),
        p.ResourceCreate2D(hdr(T.CMD_RESOURCE_CREATE_2D), 1, p.Format.FORMAT_B8G8R8X8_UNORM, 1024, 768),
        p.ResourceUnref(hdr(T.CMD_RESOURCE_UNREF), 9),
        p.SetScanout(hdr(T.CMD_SET_SCANOUT), p.Rect(1, 2, 3, 4), 0, 1),
        p.ResourceFlush(hdr(T.CMD_RESOURCE_FLUSH, fence_id=77), p.Rect(0, 0, 64, 64), 1),
        p.TransferToHost2D(hdr(T.CMD_TRANSFER_TO_HOST_2D), p.Rect(0, 0, 64, 64), 1 << 40, 1),
        p.ResourceAttachBacking(hdr(T.CMD_RESOURCE_ATTACH_BACKING), 1, ENTRIES),
        p.ResourceDetachBacking(hdr(T.CMD_RESOURCE_DETACH_BACKING), 1),
        p.GetCapsetInfo(hdr(T.CMD_GET_CAPSET_INFO), 0),
        p.GetCapset(hdr(T.CMD_GET_CAPSET), 5, 0),
        p.GetEdid(hdr(T.CMD_GET_EDID), 0),
        p.ResourceAssignUuid(hdr(T.CMD_RESOURCE_ASSIGN_UUID), 3),
        p.ResourceCreateBlob(
            hdr(T.CMD_RESOURCE_CREATE_BLOB, ctx_id=2),
            4,
            p.BlobMem.BLOB_MEM_HOST3D,
            p.BlobFlag.BLOB_FLAG_USE_MAPPABLE | p.BlobFlag.BLOB_FLAG_USE_SHAREABLE,
            2,
            1 << 20,
            p.MemEntries.of([]),
        ),
        p.ResourceCreateBlob(hdr(T.CMD_RESOURCE_CREATE_BLOB), 5, p.BlobMem.BLOB_MEM_GUEST, 1, 0, 3 << 12, ENTRIES),
        p.SetScanoutBlob(
            hdr(T.CMD_SET_SCANOUT_BLOB),
            p.Rect(0, 0, 640, 480),
            0,
            4,
            640,
            480,
            2,
            (2560, 0, 0, 0),
            (0, 1, 2, 3),
        ),
        p.CtxCreate(hdr(T.CMD_CTX_CREATE, ctx_id=2), 5, 0x05, b"sommelier"[:5]),
        p.CtxDestroy(hdr(T.CMD_CTX_DESTROY, ctx_id=2)),
        p.CtxAttachResource(hdr(T.CMD_CTX_ATTACH_RESOURCE, ctx_id=2), 4),
        p.CtxDetachResource(hdr(T.CMD_CTX_DETACH_RESOURCE, ctx_id=2), 4),
        p.ResourceCreate3D(hdr(T.CMD_RESOURCE_CREATE_3D), 6, 2, 1, 8, 256, 256, 1, 1, 0, 0, 1),
        p.TransferToHost3D(hdr(T.CMD_TRANSFER_TO_HOST_3D), p.Box(0, 0, 0, 8, 8, 1), 64, 6, 0, 32, 0),
        p.TransferFromHost3D(hdr(T.CMD_TRANSFER_FROM_HOST_3D), p.Box(1, 1, 0, 2, 2, 1), 0, 6, 1, 32, 256),
        p.SubmitCmd(hdr(T.CMD_SUBMIT_3D, ctx_id=2, fence_id=3, ring_idx=1), b"\x01\x00\x14\x00" + bytes(16)),
        p.ResourceMapBlob(hdr(T.CMD_RESOURCE_MAP_BLOB), 4, 0x10_0000),
        p.ResourceUnmapBlob(hdr(T.CMD_RESOURCE_UNMAP_BLOB), 4),
        p.UpdateCursor(hdr(T.CMD_UPDATE_CURSOR), p.CursorPos(0, 100, 200), 7, 3, 4),
        p.MoveCursor(hdr(T.CMD_MOVE_CURSOR), p.CursorPos(1, 10, 20)),
    ]


def test_samples_cover_every_command_class() -> None:
    assert {type(c) for c in sample_commands()} == set(p.COMMAND_CLASSES)
    assert {c.TYPE for c in p.COMMAND_CLASSES} == {t for t in T if t.name.startswith("CMD_")}


@pytest.mark.parametrize("cmd", sample_commands(), ids=lambda c: type(c).__name__)
def test_decode_every_command_type(cmd: p.Command) -> None:
    raw = p.encode_command(cmd)
    fixed = p.command_size(cmd.hdr.type)
    assert fixed is not None and len(raw) >= fixed
    for buf in (raw, bytearray(raw), memoryview(raw)):
        out = p.decode(buf)
        assert type(out) is type(cmd)
        assert out == cmd
        assert out.hdr.ctrl_type is cmd.TYPE


@pytest.mark.parametrize("cmd", sample_commands(), ids=lambda c: type(c).__name__)
def test_trailing_bytes_are_ignored(cmd: p.Command) -> None:
    assert p.decode(p.encode_command(cmd) + noisy(40)) == cmd


def test_decode_reads_fields_at_spec_offsets() -> None:
    raw = bytearray(56)
    raw[0:4] = T.CMD_TRANSFER_TO_HOST_2D.to_bytes(4, "little")
    raw[4:8] = (1).to_bytes(4, "little")
    raw[8:16] = (0x1122334455667788).to_bytes(8, "little")
    raw[16:20] = (9).to_bytes(4, "little")
    raw[24:40] = b"".join(v.to_bytes(4, "little") for v in (1, 2, 3, 4))
    raw[40:48] = (0xABCDEF).to_bytes(8, "little")
    raw[48:52] = (42).to_bytes(4, "little")
    raw[52:56] = b"\xff\xff\xff\xff"  # padding: ignored
    cmd = p.decode(bytes(raw))
    assert cmd == p.TransferToHost2D(p.CtrlHdr(T.CMD_TRANSFER_TO_HOST_2D, 1, 0x1122334455667788, 9, 0),
                                     p.Rect(1, 2, 3, 4), 0xABCDEF, 42)  # fmt: skip


def test_move_cursor_ignores_everything_but_pos() -> None:
    upd = p.UpdateCursor(hdr(T.CMD_MOVE_CURSOR), p.CursorPos(0, 5, 6), 0xDEAD, 1, 2)
    cmd = p.decode(p.encode_command(upd))
    assert cmd == p.MoveCursor(upd.hdr, p.CursorPos(0, 5, 6))


def test_ctx_create_debug_name_is_clipped_to_nlen() -> None:
    raw = bytearray(p.encode_command(p.CtxCreate(hdr(T.CMD_CTX_CREATE), 64, 0, b"x" * 64)))
    raw[24:28] = (3).to_bytes(4, "little")
    cmd = p.decode(bytes(raw))
    assert isinstance(cmd, p.CtxCreate)
    assert cmd.debug_name == b"xxx"
    raw[24:28] = (1000).to_bytes(4, "little")
    cmd = p.decode(bytes(raw))
    assert isinstance(cmd, p.CtxCreate) and cmd.debug_name == b"x" * 64 and cmd.nlen == 1000


def test_ctx_create_capset_id() -> None:
    cmd = p.CtxCreate(hdr(T.CMD_CTX_CREATE), 0, 0x1205, b"")
    assert cmd.capset_id == p.Capset.CAPSET_CROSS_DOMAIN


def test_submit_size_is_data_length() -> None:
    raw = p.encode_command(p.SubmitCmd(hdr(T.CMD_SUBMIT_3D), b"abcd"))
    assert int.from_bytes(raw[24:28], "little") == 4
    cmd = p.decode(raw + b"trailing")
    assert isinstance(cmd, p.SubmitCmd) and cmd.data == b"abcd" and cmd.size == 4


# ---------------------------------------------------------------------------------------------- rejections


def expect_error(buf: bytes, code: T) -> p.CommandError:
    with pytest.raises(p.CommandError) as info:
        p.decode(buf)
    assert info.value.response_type is code
    return info.value


@pytest.mark.parametrize("cmd", sample_commands(), ids=lambda c: type(c).__name__)
def test_short_request_is_rejected(cmd: p.Command) -> None:
    raw = p.encode_command(cmd)
    size = p.command_size(cmd.hdr.type)
    assert size is not None
    if size > 24:
        expect_error(raw[: size - 1], ERR_INVAL)
        assert p.decode_hdr(raw[: size - 1]) == cmd.hdr  # so the error response can still echo fence/ctx/ring
    expect_error(raw[:23], ERR_INVAL)
    with pytest.raises(p.CommandError):
        p.decode_hdr(raw[:23])  # nothing to echo
    expect_error(b"", ERR_INVAL)


def test_unknown_type_is_err_unspec() -> None:
    for t in (0, 0x10E, 0x20A, 0x302, 0x1100, 0x1205, 0xFFFFFFFF):
        raw = s.ctrl_hdr.build({"type": t, "flags": 1, "fence_id": 5, "ctx_id": 0, "ring_idx": 0}) + bytes(200)
        expect_error(raw, T.RESP_ERR_UNSPEC)
        h = p.decode_hdr(raw)
        assert h.type == t and h.fence_id == 5


def attach_raw(nr_entries: int, entries_present: int) -> bytes:
    fixed = s.resource_attach_backing.build(
        {
            "hdr": {"type": T.CMD_RESOURCE_ATTACH_BACKING, "flags": 0, "fence_id": 0, "ctx_id": 0, "ring_idx": 0},
            "resource_id": 1,
            "nr_entries": nr_entries,
        }
    )
    return fixed + bytes(16 * entries_present)


def blob_raw(nr_entries: int, entries_present: int) -> bytes:
    fixed = s.resource_create_blob.build(
        {
            "hdr": {"type": T.CMD_RESOURCE_CREATE_BLOB, "flags": 0, "fence_id": 0, "ctx_id": 0, "ring_idx": 0},
            "resource_id": 1,
            "blob_mem": 1,
            "blob_flags": 0,
            "nr_entries": nr_entries,
            "blob_id": 0,
            "size": 4096,
        }
    )
    return fixed + bytes(16 * entries_present)


@pytest.mark.parametrize("make", [attach_raw, blob_raw])
def test_nr_entries_larger_than_request_is_rejected(make: Any) -> None:
    expect_error(make(3, 2), ERR_INVAL)
    expect_error(make(1, 0), ERR_INVAL)
    expect_error(make(0xFFFFFFFF, 1), ERR_INVAL)
    partial = make(2, 1) + bytes(15)  # one byte short of the second entry
    expect_error(partial, ERR_INVAL)
    assert len(p.decode(make(2, 2)).entries) == 2  # type: ignore[union-attr]


@pytest.mark.parametrize("make", [attach_raw, blob_raw])
def test_entry_cap(make: Any) -> None:
    ok = p.decode(make(p.MAX_MEM_ENTRIES, p.MAX_MEM_ENTRIES))
    assert len(ok.entries) == p.MAX_MEM_ENTRIES  # type: ignore[union-attr]
    err = expect_error(make(p.MAX_MEM_ENTRIES + 1, p.MAX_MEM_ENTRIES + 1), ERR_INVAL)
    assert "limit" in err.message


def test_entry_cap_checked_before_length() -> None:
    # A huge count with no entries present must fail on the cap, without sizing anything by the count.
    err = expect_error(attach_raw(0x7FFFFFFF, 0), ERR_INVAL)
    assert "limit" in err.message


def test_submit_size_beyond_request_is_rejected() -> None:
    good = p.encode_command(p.SubmitCmd(hdr(T.CMD_SUBMIT_3D, ctx_id=1), bytes(64)))
    expect_error(good[:-1], ERR_INVAL)
    raw = bytearray(good)
    raw[24:28] = (0xFFFFFFFF).to_bytes(4, "little")
    expect_error(bytes(raw), ERR_INVAL)
    assert p.decode_hdr(raw).ctx_id == 1


def test_ring_idx_range() -> None:
    ok = p.encode_command(p.GetDisplayInfo(hdr(T.CMD_GET_DISPLAY_INFO, ring_idx=63)))
    assert p.decode(ok).hdr.ring_idx == 63
    bad = p.encode_command(p.GetDisplayInfo(hdr(T.CMD_GET_DISPLAY_INFO, ring_idx=64)))
    expect_error(bad, ERR_INVAL)
    # Without FLAG_INFO_RING_IDX the byte is not a ring index and must not be judged.
    unflagged = p.encode_command(p.GetDisplayInfo(p.CtrlHdr(T.CMD_GET_DISPLAY_INFO, 0, 0, 0, 200)))
    assert p.decode(unflagged).hdr.ring_idx == 200


def test_command_error_requires_error_code() -> None:
    with pytest.raises(ValueError):
        p.CommandError(T.RESP_OK_NODATA, "not an error")


# ---------------------------------------------------------------------------------------------- mem entries


def test_mem_entries_are_detached_from_guest_memory() -> None:
    guest = bytearray(attach_raw(2, 0) + ENTRIES[:2].to_wire())
    cmd = p.decode(memoryview(guest))
    assert isinstance(cmd, p.ResourceAttachBacking)
    guest[32:48] = bytes(16)
    assert list(cmd.entries) == [p.MemEntry(0x1000, 4096), p.MemEntry(0x8000, 8192)]
    assert not cmd.entries.addr.flags.writeable


def test_mem_entries_sequence_behaviour() -> None:
    assert len(ENTRIES) == 3
    assert ENTRIES[2] == p.MemEntry(0xFFFF_FFFF_F000, 0xFFFF_FFFF)
    assert ENTRIES[1:] == p.MemEntries.of(list(ENTRIES)[1:])
    assert hash(ENTRIES) == hash(p.MemEntries.of(list(ENTRIES)))
    assert p.MemEntries.of([(0x1000, 4096)]) != ENTRIES
    assert ENTRIES.total_length() == 4096 + 8192 + 0xFFFF_FFFF
    big = p.MemEntries.of([(0, 0xFFFF_FFFF)] * 5)
    assert big.total_length() == 5 * 0xFFFF_FFFF
    assert "more" not in repr(ENTRIES)


def test_mem_entry_padding_is_ignored() -> None:
    raw = bytearray(attach_raw(1, 1))
    raw[32:48] = (0x5000).to_bytes(8, "little") + (12).to_bytes(4, "little") + b"\xaa" * 4
    cmd = p.decode(bytes(raw))
    assert isinstance(cmd, p.ResourceAttachBacking)
    assert list(cmd.entries) == [p.MemEntry(0x5000, 12)]
    assert p.encode_command(cmd)[44:48] == bytes(4)


# ---------------------------------------------------------------------------------------------- responses

FENCED_RING = p.CtrlHdr(T.CMD_SUBMIT_3D, int(p.CtrlFlag.FLAG_FENCE | p.CtrlFlag.FLAG_INFO_RING_IDX), 1234, 7, 5)
PLAIN = p.CtrlHdr(T.CMD_GET_DISPLAY_INFO, 0, 999, 3, 9)  # fence_id / ring_idx present but not flagged


def resp_hdr(raw: bytes) -> Any:
    return s.ctrl_hdr.parse(raw[:24])


def all_responses(h: p.CtrlHdr) -> list[tuple[bytes, T, int]]:
    mode = p.DisplayOne(p.Rect(0, 0, 1024, 768), True)
    return [
        (r.ok_nodata(h), T.RESP_OK_NODATA, 24),
        (r.error(h, T.RESP_ERR_INVALID_RESOURCE_ID), T.RESP_ERR_INVALID_RESOURCE_ID, 24),
        (r.display_info(h, [mode]), T.RESP_OK_DISPLAY_INFO, 408),
        (r.edid(h, build_edid(1024, 768)), T.RESP_OK_EDID, 1056),
        (r.capset_info(h, 5, 0, 16), T.RESP_OK_CAPSET_INFO, 40),
        (r.capset(h, bytes(16)), T.RESP_OK_CAPSET, 40),
        (r.resource_uuid(h, uuid.UUID(int=1)), T.RESP_OK_RESOURCE_UUID, 40),
        (r.map_info(h, p.MapCache.MAP_CACHE_WC), T.RESP_OK_MAP_INFO, 32),
    ]


@pytest.mark.parametrize("index", range(8))
def test_response_echoes_fence_ctx_and_ring(index: int) -> None:
    raw, t, size = all_responses(FENCED_RING)[index]
    assert len(raw) == size
    h = resp_hdr(raw)
    assert h.type == t
    assert h.flags == p.CtrlFlag.FLAG_FENCE | p.CtrlFlag.FLAG_INFO_RING_IDX
    assert (h.fence_id, h.ctx_id, h.ring_idx) == (1234, 7, 5)
    assert raw[21:24] == b"\0\0\0"


@pytest.mark.parametrize("index", range(8))
def test_unfenced_response_has_no_fence(index: int) -> None:
    raw, t, _ = all_responses(PLAIN)[index]
    h = resp_hdr(raw)
    assert (h.type, h.flags, h.fence_id, h.ctx_id, h.ring_idx) == (t, 0, 0, 3, 0)


def test_fence_without_ring_idx() -> None:
    h = resp_hdr(r.ok_nodata(p.request_hdr(T.CMD_RESOURCE_FLUSH, fence_id=42, ctx_id=1)))
    assert (h.flags, h.fence_id, h.ctx_id, h.ring_idx) == (1, 42, 1, 0)


def test_error_for_headerless_request() -> None:
    h = resp_hdr(r.error(None, T.RESP_ERR_INVALID_PARAMETER))
    assert (h.type, h.flags, h.fence_id, h.ctx_id) == (T.RESP_ERR_INVALID_PARAMETER, 0, 0, 0)
    with pytest.raises(ValueError):
        r.error(PLAIN, T.RESP_OK_NODATA)


def test_display_info_layout() -> None:
    modes = [
        p.DisplayOne(p.Rect(0, 0, 1280, 800), True, 0),
        p.DisplayOne(p.Rect(1280, 0, 640, 480), False, 2),
    ]
    parsed = s.resp_display_info.parse(r.display_info(PLAIN, modes))
    assert parsed.pmodes[0].r.width == 1280 and parsed.pmodes[0].enabled == 1
    assert parsed.pmodes[1].r.x == 1280 and parsed.pmodes[1].enabled == 0 and parsed.pmodes[1].flags == 2
    assert all(m.r.width == 0 and m.enabled == 0 for m in parsed.pmodes[2:])
    with pytest.raises(ValueError):
        r.display_info(PLAIN, modes * 9)


def test_edid_response() -> None:
    blob = build_edid(800, 600)
    parsed = s.resp_edid.parse(r.edid(PLAIN, blob))
    assert parsed.size == 128 and parsed.edid[:128] == blob and parsed.edid[128:] == bytes(896)
    with pytest.raises(ValueError):
        r.edid(PLAIN, bytes(1025))


def test_capset_and_uuid_responses() -> None:
    raw = r.capset(PLAIN, b"\x01\x02\x03")
    assert raw[24:] == b"\x01\x02\x03"
    u = uuid.uuid4()
    assert r.resource_uuid(PLAIN, u)[24:] == u.bytes == r.resource_uuid(PLAIN, u.bytes)[24:]
    with pytest.raises(ValueError):
        r.resource_uuid(PLAIN, b"short")
    parsed = s.resp_capset_info.parse(r.capset_info(PLAIN, 5, 0, 16))
    assert (parsed.capset_id, parsed.capset_max_version, parsed.capset_max_size) == (5, 0, 16)


@pytest.mark.parametrize("value", [1, 2, 3])
def test_map_info_values(value: int) -> None:
    raw = r.map_info(PLAIN, value)
    assert int.from_bytes(raw[24:28], "little") == value and raw[28:32] == bytes(4)


@pytest.mark.parametrize("value", [0, 4, 0x13, 0x31, 0xFF])
def test_map_info_rejects_anything_but_cached_uncached_wc(value: int) -> None:
    with pytest.raises(ValueError):
        r.map_info(PLAIN, value)


# ---------------------------------------------------------------------------------------------- EDID


@pytest.mark.parametrize(("w", "h"), [(640, 480), (1024, 768), (1280, 800), (1920, 1080), (3840, 2160), (64, 64)])
def test_edid_block(w: int, h: int) -> None:
    blob = build_edid(w, h, serial=0x01020304)
    assert len(blob) == 128
    assert blob[:8] == EDID_HEADER
    assert sum(blob) % 256 == 0
    assert (blob[18], blob[19]) == (1, 4)
    assert blob[12:16] == bytes((4, 3, 2, 1))
    assert blob[24] & 0x02  # preferred timing mode flag
    hw, vw, clk = parse_dtd(blob[54:72])
    assert (hw, vw) == (w, h)
    t = Timing(w, h)
    assert clk == t.pixel_clock_hz
    assert abs(t.refresh_hz - 60) < 0.5
    h_total = w + (blob[57] | ((blob[58] & 0x0F) << 8))
    v_total = h + (blob[60] | ((blob[61] & 0x0F) << 8))
    assert abs(clk / (h_total * v_total) - 60) < 0.5
    names = [blob[o + 5 : o + 18] for o in (72, 90, 108) if blob[o : o + 4] == b"\0\0\0\xfc"]
    assert names and names[0].split(b"\n")[0] == b"vgpu"
    assert blob[126] == 0


def test_edid_is_deterministic_and_serial_sensitive() -> None:
    assert build_edid(1024, 768) == build_edid(1024, 768)
    assert build_edid(1024, 768, 1) != build_edid(1024, 768, 2)


@pytest.mark.parametrize(("w", "h"), [(0, 480), (640, 0), (4096, 2160), (4095, 4095)])
def test_edid_rejects_undescribable_modes(w: int, h: int) -> None:
    with pytest.raises(ValueError):
        build_edid(w, h)


# ---------------------------------------------------------------------------------------------- constants


def test_constants_spot_values() -> None:
    assert p.VIRTIO_GPU_MAX_SCANOUTS == 16
    assert int(T.CMD_RESOURCE_MAP_BLOB) == 0x208 and int(T.RESP_OK_MAP_INFO) == 0x1106
    assert int(p.GpuFeature.F_BLOB_ALIGNMENT) == 5 and p.GpuFeature.F_CONTEXT_INIT.mask == 0x10
    assert int(p.ShmId.SHM_ID_HOST_VISIBLE) == 1 and int(p.Capset.CAPSET_CROSS_DOMAIN) == 5
    assert T.RESP_ERR_UNSPEC.is_error and not T.RESP_OK_NODATA.is_error
    assert T.RESP_OK_NODATA.is_response and not T.CMD_MOVE_CURSOR.is_response
