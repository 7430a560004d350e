"""Response encoders. ``_response_hdr`` is the only place a response header is built, so the echo rules hold
for every response, success or error:

* FLAG_FENCE and the same fence_id when the request was fenced (virtio spec: fenced requests must be answered
  with the fence flag and id; the driver's fence signalling relies on it);
* ctx_id copied from the request;
* FLAG_INFO_RING_IDX and the same ring_idx when the request carried it (the fence belongs to that timeline).
"""

from __future__ import annotations

import uuid as uuid_mod
from collections.abc import Sequence
from typing import Any

from . import structs as s
from .constants import VIRTIO_GPU_MAX_SCANOUTS, CtrlFlag, CtrlType, MapCache
from .encode import rect_dict
from .records import CtrlHdr, DisplayOne

EDID_MAX_SIZE = 1024
UUID_SIZE = 16
_VALID_MAP_INFO = frozenset({MapCache.MAP_CACHE_CACHED, MapCache.MAP_CACHE_UNCACHED, MapCache.MAP_CACHE_WC})


def _response_hdr(req: CtrlHdr | None, resp_type: CtrlType) -> dict[str, int]:
    if req is None:
        # The request was too short to have a header: nothing to echo.
        return {"type": resp_type, "flags": 0, "fence_id": 0, "ctx_id": 0, "ring_idx": 0}
    flags = 0
    fence_id = 0
    ring_idx = 0
    if req.fenced:
        flags |= CtrlFlag.FLAG_FENCE
        fence_id = req.fence_id
    if req.has_ring_idx:
        flags |= CtrlFlag.FLAG_INFO_RING_IDX
        ring_idx = req.ring_idx
    return {
        "type": resp_type,
        "flags": flags,
        "fence_id": fence_id,
        "ctx_id": req.ctx_id,
        "ring_idx": ring_idx,
    }


_COMPILED: dict[int, Any] = {}


def _build(con: Any, obj: dict[str, Any]) -> bytes:
    # Responses are built for every command: use construct's compiled form, made once per struct.
    fast = _COMPILED.get(id(con))
    if fast is None:
        fast = _COMPILED[id(con)] = s.compiled(con)
    return bytes(fast.build(obj))


def ok_nodata(hdr: CtrlHdr) -> bytes:
    return _build(s.ctrl_hdr, _response_hdr(hdr, CtrlType.RESP_OK_NODATA))


def error(hdr: CtrlHdr | None, resp_type: CtrlType) -> bytes:
    """``hdr`` may be None for requests too short to carry one."""
    if not resp_type.is_error:
        raise ValueError(f"{resp_type!r} is not a RESP_ERR_* code")
    return _build(s.ctrl_hdr, _response_hdr(hdr, resp_type))


def display_info(hdr: CtrlHdr, modes: Sequence[DisplayOne]) -> bytes:
    """Always the full 408-byte struct: entries beyond ``modes`` (scanouts that do not exist) are zero."""
    if len(modes) > VIRTIO_GPU_MAX_SCANOUTS:
        raise ValueError(f"at most {VIRTIO_GPU_MAX_SCANOUTS} scanouts, got {len(modes)}")
    zero = {"r": {"x": 0, "y": 0, "width": 0, "height": 0}, "enabled": 0, "flags": 0}
    pmodes = [{"r": rect_dict(m.r), "enabled": int(m.enabled), "flags": m.flags} for m in modes]
    pmodes += [zero] * (VIRTIO_GPU_MAX_SCANOUTS - len(modes))
    return _build(s.resp_display_info_c, {"hdr": _response_hdr(hdr, CtrlType.RESP_OK_DISPLAY_INFO), "pmodes": pmodes})


def edid(hdr: CtrlHdr, data: bytes) -> bytes:
    if len(data) > EDID_MAX_SIZE:
        raise ValueError(f"EDID blob of {len(data)} bytes exceeds {EDID_MAX_SIZE}")
    return _build(
        s.resp_edid_c,
        {
            "hdr": _response_hdr(hdr, CtrlType.RESP_OK_EDID),
            "size": len(data),
            "edid": data.ljust(EDID_MAX_SIZE, b"\0"),
        },
    )


def capset_info(hdr: CtrlHdr, capset_id: int, capset_max_version: int, capset_max_size: int) -> bytes:
    return _build(
        s.resp_capset_info,
        {
            "hdr": _response_hdr(hdr, CtrlType.RESP_OK_CAPSET_INFO),
            "capset_id": capset_id,
            "capset_max_version": capset_max_version,
            "capset_max_size": capset_max_size,
        },
    )


def capset(hdr: CtrlHdr, data: bytes) -> bytes:
    return _build(s.resp_capset, {"hdr": _response_hdr(hdr, CtrlType.RESP_OK_CAPSET)}) + bytes(data)


def resource_uuid(hdr: CtrlHdr, uuid: bytes | uuid_mod.UUID) -> bytes:
    raw = uuid.bytes if isinstance(uuid, uuid_mod.UUID) else bytes(uuid)
    if len(raw) != UUID_SIZE:
        raise ValueError(f"a UUID is {UUID_SIZE} bytes, got {len(raw)}")
    return _build(s.resp_resource_uuid, {"hdr": _response_hdr(hdr, CtrlType.RESP_OK_RESOURCE_UUID), "uuid": raw})


def map_info(hdr: CtrlHdr, map_info: int) -> bytes:
    """Only CACHED, UNCACHED or WC may be sent: the Linux guest compares for equality and maps anything else
    as cached, which is exactly the silent mismatch this project exists to prevent."""
    if map_info not in _VALID_MAP_INFO:
        raise ValueError(f"map_info must be CACHED, UNCACHED or WC, got {map_info:#x}")
    return _build(s.resp_map_info, {"hdr": _response_hdr(hdr, CtrlType.RESP_OK_MAP_INFO), "map_info": int(map_info)})
