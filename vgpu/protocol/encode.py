"""Typed command → bytes, the inverse of ``decode``.

The device never sends requests; this exists for the driver side: the project's front end, tests, benchmarks
and fuzzers build guest traffic with it, so they exercise the same layouts the decoder reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from construct import ConstructError

from . import commands as c
from . import structs as s
from .records import Box, CtrlHdr, CursorPos, Rect


def hdr_dict(hdr: CtrlHdr) -> dict[str, int]:
    return {
        "type": hdr.type,
        "flags": hdr.flags,
        "fence_id": hdr.fence_id,
        "ctx_id": hdr.ctx_id,
        "ring_idx": hdr.ring_idx,
    }


def rect_dict(r: Rect) -> dict[str, int]:
    return {"x": r.x, "y": r.y, "width": r.width, "height": r.height}


def _box(b: Box) -> dict[str, int]:
    return {"x": b.x, "y": b.y, "z": b.z, "w": b.w, "h": b.h, "d": b.d}


def _pos(p: CursorPos) -> dict[str, int]:
    return {"scanout_id": p.scanout_id, "x": p.x, "y": p.y}


def _resource_id_only(con: Any) -> Callable[[Any], bytes]:
    return lambda m: bytes(con.build({"hdr": hdr_dict(m.hdr), "resource_id": m.resource_id}))


def _hdr_only(m: Any) -> bytes:
    return s.ctrl_hdr.build(hdr_dict(m.hdr))


def _attach_backing(m: c.ResourceAttachBacking) -> bytes:
    fixed = s.resource_attach_backing.build(
        {"hdr": hdr_dict(m.hdr), "resource_id": m.resource_id, "nr_entries": len(m.entries)}
    )
    return fixed + m.entries.to_wire()


def _create_blob(m: c.ResourceCreateBlob) -> bytes:
    fixed = s.resource_create_blob.build(
        {
            "hdr": hdr_dict(m.hdr),
            "resource_id": m.resource_id,
            "blob_mem": m.blob_mem,
            "blob_flags": m.blob_flags,
            "nr_entries": len(m.entries),
            "blob_id": m.blob_id,
            "size": m.size,
        }
    )
    return fixed + m.entries.to_wire()


def _transfer_3d(m: c.TransferToHost3D | c.TransferFromHost3D) -> bytes:
    return s.transfer_host_3d.build(
        {
            "hdr": hdr_dict(m.hdr),
            "box": _box(m.box),
            "offset": m.offset,
            "resource_id": m.resource_id,
            "level": m.level,
            "stride": m.stride,
            "layer_stride": m.layer_stride,
        }
    )


def _ctx_create(m: c.CtxCreate) -> bytes:
    if len(m.debug_name) > 64:
        raise ValueError("debug_name is at most 64 bytes")
    return s.ctx_create.build(
        {
            "hdr": hdr_dict(m.hdr),
            "nlen": m.nlen,
            "context_init": m.context_init,
            "debug_name": m.debug_name.ljust(64, b"\0"),
        }
    )


def _cursor(m: c.UpdateCursor | c.MoveCursor) -> bytes:
    resource_id, hot_x, hot_y = (m.resource_id, m.hot_x, m.hot_y) if isinstance(m, c.UpdateCursor) else (0, 0, 0)
    return s.update_cursor.build(
        {
            "hdr": hdr_dict(m.hdr),
            "pos": _pos(m.pos),
            "resource_id": resource_id,
            "hot_x": hot_x,
            "hot_y": hot_y,
        }
    )


_ENCODERS: dict[type[c.Command], Callable[[Any], bytes]] = {
    c.GetDisplayInfo: _hdr_only,
    c.ResourceCreate2D: lambda m: s.resource_create_2d.build(
        {
            "hdr": hdr_dict(m.hdr),
            "resource_id": m.resource_id,
            "format": m.format,
            "width": m.width,
            "height": m.height,
        }
    ),
    c.ResourceUnref: _resource_id_only(s.resource_unref),
    c.SetScanout: lambda m: s.set_scanout.build(
        {
            "hdr": hdr_dict(m.hdr),
            "r": rect_dict(m.r),
            "scanout_id": m.scanout_id,
            "resource_id": m.resource_id,
        }
    ),
    c.ResourceFlush: lambda m: s.resource_flush.build(
        {"hdr": hdr_dict(m.hdr), "r": rect_dict(m.r), "resource_id": m.resource_id}
    ),
    c.TransferToHost2D: lambda m: s.transfer_to_host_2d.build(
        {"hdr": hdr_dict(m.hdr), "r": rect_dict(m.r), "offset": m.offset, "resource_id": m.resource_id}
    ),
    c.ResourceAttachBacking: _attach_backing,
    c.ResourceDetachBacking: _resource_id_only(s.resource_detach_backing),
    c.GetCapsetInfo: lambda m: s.get_capset_info.build({"hdr": hdr_dict(m.hdr), "capset_index": m.capset_index}),
    c.GetCapset: lambda m: s.get_capset.build(
        {"hdr": hdr_dict(m.hdr), "capset_id": m.capset_id, "capset_version": m.capset_version}
    ),
    c.GetEdid: lambda m: s.get_edid.build({"hdr": hdr_dict(m.hdr), "scanout": m.scanout}),
    c.ResourceAssignUuid: _resource_id_only(s.resource_assign_uuid),
    c.ResourceCreateBlob: _create_blob,
    c.SetScanoutBlob: lambda m: s.set_scanout_blob.build(
        {
            "hdr": hdr_dict(m.hdr),
            "r": rect_dict(m.r),
            "scanout_id": m.scanout_id,
            "resource_id": m.resource_id,
            "width": m.width,
            "height": m.height,
            "format": m.format,
            "strides": list(m.strides),
            "offsets": list(m.offsets),
        }
    ),
    c.CtxCreate: _ctx_create,
    c.CtxDestroy: _hdr_only,
    c.CtxAttachResource: _resource_id_only(s.ctx_resource),
    c.CtxDetachResource: _resource_id_only(s.ctx_resource),
    c.ResourceCreate3D: lambda m: s.resource_create_3d.build(
        {
            "hdr": hdr_dict(m.hdr),
            "resource_id": m.resource_id,
            "target": m.target,
            "format": m.format,
            "bind": m.bind,
            "width": m.width,
            "height": m.height,
            "depth": m.depth,
            "array_size": m.array_size,
            "last_level": m.last_level,
            "nr_samples": m.nr_samples,
            "flags": m.flags,
        }
    ),
    c.TransferToHost3D: _transfer_3d,
    c.TransferFromHost3D: _transfer_3d,
    c.SubmitCmd: lambda m: s.cmd_submit.build({"hdr": hdr_dict(m.hdr), "size": len(m.data)}) + m.data,
    c.ResourceMapBlob: lambda m: s.resource_map_blob.build(
        {"hdr": hdr_dict(m.hdr), "resource_id": m.resource_id, "offset": m.offset}
    ),
    c.ResourceUnmapBlob: _resource_id_only(s.resource_unmap_blob),
    c.UpdateCursor: _cursor,
    c.MoveCursor: _cursor,
}


def encode_command(cmd: c.Command) -> bytes:
    """Serialise a request exactly as a guest driver would; the header is written as given (tests may
    deliberately send a header type that disagrees with the class)."""
    try:
        return _ENCODERS[type(cmd)](cmd)
    except ConstructError as e:
        raise ValueError(f"cannot encode {cmd!r}: {e}") from e
