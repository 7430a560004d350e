"""Bytes → typed command: the single entry point for everything a guest puts on the control or cursor queue.

Error policy (the spec fixes no codes for malformed requests; this follows QEMU/Linux convention):

* unknown or non-command ``type`` → RESP_ERR_UNSPEC;
* request shorter than its command struct, an ``nr_entries`` or SUBMIT_3D ``size`` that needs more bytes than
  the request holds, more than ``MAX_MEM_ENTRIES`` entries, or FLAG_INFO_RING_IDX with ring_idx > 63
  → RESP_ERR_INVALID_PARAMETER.

Nothing is allocated in proportion to a guest-supplied count before that count has been checked against the
bytes actually present.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from construct import Construct

from . import commands as c
from . import structs as s
from .constants import VIRTIO_GPU_MAX_RING_IDX, CtrlFlag, CtrlType
from .errors import CommandError
from .mem_entries import MEM_ENTRY_SIZE, MemEntries
from .records import Box, CtrlHdr, CursorPos, Rect

# Upper bound on scatter-gather entries per request. 16384 4-KiB pages cover 64 MiB with no merging; Linux
# merges contiguous pages, so real framebuffers need far fewer. It bounds work per request, not resource size.
MAX_MEM_ENTRIES = 16384

CTRL_HDR_SIZE: int = s.ctrl_hdr.sizeof()
_RING_IDX_FLAG = int(CtrlFlag.FLAG_INFO_RING_IDX)

_Builder = Callable[[CtrlHdr, Any, memoryview], c.Command]


class _Spec(NamedTuple):
    con: Construct[Any, Any]
    size: int
    build: _Builder


def _hdr(p: Any) -> CtrlHdr:
    return CtrlHdr(p.type, p.flags, p.fence_id, p.ctx_id, p.ring_idx)


def _rect(p: Any) -> Rect:
    return Rect(p.x, p.y, p.width, p.height)


def _box(p: Any) -> Box:
    return Box(p.x, p.y, p.z, p.w, p.h, p.d)


def _pos(p: Any) -> CursorPos:
    return CursorPos(p.scanout_id, p.x, p.y)


def _entries(hdr: CtrlHdr, nr_entries: int, tail: memoryview) -> MemEntries:
    if nr_entries > MAX_MEM_ENTRIES:
        raise CommandError(
            CtrlType.RESP_ERR_INVALID_PARAMETER,
            f"nr_entries {nr_entries} exceeds the limit of {MAX_MEM_ENTRIES}",
            hdr,
        )
    need = nr_entries * MEM_ENTRY_SIZE
    if len(tail) < need:
        raise CommandError(
            CtrlType.RESP_ERR_INVALID_PARAMETER,
            f"nr_entries {nr_entries} needs {need} bytes of mem_entry, request has {len(tail)}",
            hdr,
        )
    return MemEntries.from_wire(tail[:need], nr_entries)


def _submit(hdr: CtrlHdr, p: Any, tail: memoryview) -> c.Command:
    if p.size > len(tail):
        raise CommandError(
            CtrlType.RESP_ERR_INVALID_PARAMETER,
            f"SUBMIT_3D size {p.size} exceeds the {len(tail)} bytes that follow the header",
            hdr,
        )
    return c.SubmitCmd(hdr, bytes(tail[: p.size]))


def _ctx_create(hdr: CtrlHdr, p: Any, _: memoryview) -> c.Command:
    name: bytes = p.debug_name
    return c.CtxCreate(hdr, p.nlen, p.context_init, name[: min(p.nlen, len(name))])


def _spec(con: Construct[Any, Any], build: _Builder) -> _Spec:
    # Every command is decoded on the hot path; construct's compiled parser is several times faster.
    return _Spec(s.compiled(con), con.sizeof(), build)


_SPECS: dict[int, _Spec] = {
    CtrlType.CMD_GET_DISPLAY_INFO: _spec(s.get_display_info, lambda h, p, t: c.GetDisplayInfo(h)),
    CtrlType.CMD_RESOURCE_CREATE_2D: _spec(
        s.resource_create_2d_c,
        lambda h, p, t: c.ResourceCreate2D(h, p.resource_id, p.format, p.width, p.height),
    ),
    CtrlType.CMD_RESOURCE_UNREF: _spec(s.resource_unref, lambda h, p, t: c.ResourceUnref(h, p.resource_id)),
    CtrlType.CMD_SET_SCANOUT: _spec(
        s.set_scanout, lambda h, p, t: c.SetScanout(h, _rect(p.r), p.scanout_id, p.resource_id)
    ),
    CtrlType.CMD_RESOURCE_FLUSH: _spec(
        s.resource_flush_c, lambda h, p, t: c.ResourceFlush(h, _rect(p.r), p.resource_id)
    ),
    CtrlType.CMD_TRANSFER_TO_HOST_2D: _spec(
        s.transfer_to_host_2d_c,
        lambda h, p, t: c.TransferToHost2D(h, _rect(p.r), p.offset, p.resource_id),
    ),
    CtrlType.CMD_RESOURCE_ATTACH_BACKING: _spec(
        s.resource_attach_backing_c,
        lambda h, p, t: c.ResourceAttachBacking(h, p.resource_id, _entries(h, p.nr_entries, t)),
    ),
    CtrlType.CMD_RESOURCE_DETACH_BACKING: _spec(
        s.resource_detach_backing, lambda h, p, t: c.ResourceDetachBacking(h, p.resource_id)
    ),
    CtrlType.CMD_GET_CAPSET_INFO: _spec(s.get_capset_info, lambda h, p, t: c.GetCapsetInfo(h, p.capset_index)),
    CtrlType.CMD_GET_CAPSET: _spec(s.get_capset, lambda h, p, t: c.GetCapset(h, p.capset_id, p.capset_version)),
    CtrlType.CMD_GET_EDID: _spec(s.get_edid, lambda h, p, t: c.GetEdid(h, p.scanout)),
    CtrlType.CMD_RESOURCE_ASSIGN_UUID: _spec(
        s.resource_assign_uuid, lambda h, p, t: c.ResourceAssignUuid(h, p.resource_id)
    ),
    CtrlType.CMD_RESOURCE_CREATE_BLOB: _spec(
        s.resource_create_blob_c,
        lambda h, p, t: c.ResourceCreateBlob(
            h, p.resource_id, p.blob_mem, p.blob_flags, p.blob_id, p.size, _entries(h, p.nr_entries, t)
        ),
    ),
    CtrlType.CMD_SET_SCANOUT_BLOB: _spec(
        s.set_scanout_blob,
        lambda h, p, t: c.SetScanoutBlob(
            h,
            _rect(p.r),
            p.scanout_id,
            p.resource_id,
            p.width,
            p.height,
            p.format,
            (p.strides[0], p.strides[1], p.strides[2], p.strides[3]),
            (p.offsets[0], p.offsets[1], p.offsets[2], p.offsets[3]),
        ),
    ),
    CtrlType.CMD_CTX_CREATE: _spec(s.ctx_create, _ctx_create),
    CtrlType.CMD_CTX_DESTROY: _spec(s.ctx_destroy, lambda h, p, t: c.CtxDestroy(h)),
    CtrlType.CMD_CTX_ATTACH_RESOURCE: _spec(s.ctx_resource, lambda h, p, t: c.CtxAttachResource(h, p.resource_id)),
    CtrlType.CMD_CTX_DETACH_RESOURCE: _spec(s.ctx_resource, lambda h, p, t: c.CtxDetachResource(h, p.resource_id)),
    CtrlType.CMD_RESOURCE_CREATE_3D: _spec(
        s.resource_create_3d,
        lambda h, p, t: c.ResourceCreate3D(
            h,
            p.resource_id,
            p.target,
            p.format,
            p.bind,
            p.width,
            p.height,
            p.depth,
            p.array_size,
            p.last_level,
            p.nr_samples,
            p.flags,
        ),
    ),
    CtrlType.CMD_TRANSFER_TO_HOST_3D: _spec(
        s.transfer_host_3d,
        lambda h, p, t: c.TransferToHost3D(h, _box(p.box), p.offset, p.resource_id, p.level, p.stride, p.layer_stride),
    ),
    CtrlType.CMD_TRANSFER_FROM_HOST_3D: _spec(
        s.transfer_host_3d,
        lambda h, p, t: c.TransferFromHost3D(
            h, _box(p.box), p.offset, p.resource_id, p.level, p.stride, p.layer_stride
        ),
    ),
    CtrlType.CMD_SUBMIT_3D: _spec(s.cmd_submit, _submit),
    CtrlType.CMD_RESOURCE_MAP_BLOB: _spec(
        s.resource_map_blob_c, lambda h, p, t: c.ResourceMapBlob(h, p.resource_id, p.offset)
    ),
    CtrlType.CMD_RESOURCE_UNMAP_BLOB: _spec(
        s.resource_unmap_blob, lambda h, p, t: c.ResourceUnmapBlob(h, p.resource_id)
    ),
    CtrlType.CMD_UPDATE_CURSOR: _spec(
        s.update_cursor_c,
        lambda h, p, t: c.UpdateCursor(h, _pos(p.pos), p.resource_id, p.hot_x, p.hot_y),
    ),
    CtrlType.CMD_MOVE_CURSOR: _spec(s.update_cursor_c, lambda h, p, t: c.MoveCursor(h, _pos(p.pos))),
}


def command_size(ctrl_type: int) -> int | None:
    """Fixed request size of a command type (without variable tail), or None for unknown types."""
    spec = _SPECS.get(ctrl_type)
    return spec.size if spec is not None else None


def decode_hdr(buf: bytes | bytearray | memoryview) -> CtrlHdr:
    """Decode only the header, e.g. to answer a request whose body the device will not look at."""
    if len(buf) < CTRL_HDR_SIZE:
        raise CommandError(
            CtrlType.RESP_ERR_INVALID_PARAMETER,
            f"request of {len(buf)} bytes is shorter than ctrl_hdr ({CTRL_HDR_SIZE})",
        )
    return _hdr(s.ctrl_hdr_c.parse(bytes(buf[:CTRL_HDR_SIZE])))


def decode(buf: bytes | bytearray | memoryview) -> c.Command:
    """Decode one request (the concatenated device-readable part of a descriptor chain).

    Raises only ``CommandError``. Bytes beyond the command struct and its declared tail are ignored, as
    drivers may hand over larger buffers than needed.
    """
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1 or not view.c_contiguous:
        view = memoryview(view.tobytes())
    if len(view) < CTRL_HDR_SIZE:
        decode_hdr(view)  # raises the short-request error
    # Fast path: peek at type, flags and ring_idx and parse the whole fixed struct once; the header object is
    # built separately only on error paths.
    ctrl_type = int.from_bytes(view[0:4], "little")
    spec = _SPECS.get(ctrl_type)
    if spec is None:
        raise CommandError(CtrlType.RESP_ERR_UNSPEC, f"unknown command type {ctrl_type:#06x}", decode_hdr(view))
    if int.from_bytes(view[4:8], "little") & _RING_IDX_FLAG and view[20] > VIRTIO_GPU_MAX_RING_IDX:
        raise CommandError(
            CtrlType.RESP_ERR_INVALID_PARAMETER,
            f"ring_idx {view[20]} is outside 0..{VIRTIO_GPU_MAX_RING_IDX}",
            decode_hdr(view),
        )
    if len(view) < spec.size:
        raise CommandError(
            CtrlType.RESP_ERR_INVALID_PARAMETER,
            f"{CtrlType(ctrl_type).name} needs {spec.size} bytes, request has {len(view)}",
            decode_hdr(view),
        )
    parsed = spec.con.parse(bytes(view[: spec.size]))
    return spec.build(_hdr(parsed.hdr), parsed, view[spec.size :])
