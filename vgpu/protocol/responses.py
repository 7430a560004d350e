"""Response encoders. ``_hdr_values`` is the only place a response header is made, so the echo rules hold for
every response, success or error:

* FLAG_FENCE and the same fence_id when the request was fenced (virtio spec: fenced requests must be answered
  with the fence flag and id; the driver's fence signalling relies on it);
* ctx_id copied from the request;
* FLAG_INFO_RING_IDX and the same ring_idx when the request carried it (the fence belongs to that timeline).

Each response is packed with the ``struct`` codec derived from its construct layout (``codec``); the layouts in
``structs`` stay the reference, and the tests hold the two to the same bytes.
"""

from __future__ import annotations

import uuid as uuid_mod
from collections.abc import Sequence

from ..vhost_user.layout import flatten
from . import structs as s
from .constants import VIRTIO_GPU_MAX_SCANOUTS, CtrlFlag, CtrlType, MapCache
from .records import CtrlHdr, DisplayOne, Rect

EDID_MAX_SIZE = 1024
UUID_SIZE = 16
_VALID_MAP_INFO = frozenset({MapCache.MAP_CACHE_CACHED, MapCache.MAP_CACHE_UNCACHED, MapCache.MAP_CACHE_WC})
_ECHO = int(CtrlFlag.FLAG_FENCE) | int(CtrlFlag.FLAG_INFO_RING_IDX)
_FENCE = int(CtrlFlag.FLAG_FENCE)
_RING_IDX = int(CtrlFlag.FLAG_INFO_RING_IDX)

_HDR = flatten(s.ctrl_hdr).st
_DISPLAY_INFO = flatten(s.resp_display_info).st
_EDID = flatten(s.resp_edid).st
_CAPSET_INFO = flatten(s.resp_capset_info).st
_UUID = flatten(s.resp_resource_uuid).st
_MAP_INFO = flatten(s.resp_map_info).st
_OK_NODATA = int(CtrlType.RESP_OK_NODATA)


def _hdr_values(req: CtrlHdr | None, resp_type: int) -> tuple[int, int, int, int, int]:
    if req is None:
        # The request was too short to have a header: nothing to echo.
        return resp_type, 0, 0, 0, 0
    flags = req.flags & _ECHO
    return (resp_type, flags, req.fence_id if flags & _FENCE else 0, req.ctx_id,
            req.ring_idx if flags & _RING_IDX else 0)


def parse_display_info(data: bytes, count: int) -> list[DisplayOne]:
    """The first ``count`` pmodes of a RESP_OK_DISPLAY_INFO (what a vhost-user-gpu front end answers with)."""
    v = _DISPLAY_INFO.unpack_from(data)
    return [DisplayOne(Rect(*v[i:i + 4]), bool(v[i + 4]), v[i + 5]) for i in range(5, 5 + 6 * count, 6)]


def parse_edid(data: bytes) -> bytes | None:
    """The EDID blob of a RESP_OK_EDID, or None when its size is not a whole number of 128-byte blocks."""
    v = _EDID.unpack_from(data)
    size, blob = v[5], v[6]
    if not 128 <= size <= len(blob) or size % 128:
        return None
    return bytes(blob[:size])


# OK_NODATA to a request that echoes nothing (no fence, no ring index, context 0): most of what a guest sends.
_PLAIN_OK_NODATA = _HDR.pack(*_hdr_values(None, _OK_NODATA))


def ok_nodata(hdr: CtrlHdr) -> bytes:
    if not (hdr.flags & _ECHO or hdr.ctx_id):
        return _PLAIN_OK_NODATA
    return _HDR.pack(*_hdr_values(hdr, _OK_NODATA))


def error(hdr: CtrlHdr | None, resp_type: CtrlType) -> bytes:
    """``hdr`` may be None for requests too short to carry one."""
    if not resp_type.is_error:
        raise ValueError(f"{resp_type!r} is not a RESP_ERR_* code")
    return _HDR.pack(*_hdr_values(hdr, int(resp_type)))


def display_info(hdr: CtrlHdr, modes: Sequence[DisplayOne]) -> bytes:
    """Always the full 408-byte struct: entries beyond ``modes`` (scanouts that do not exist) are zero."""
    if len(modes) > VIRTIO_GPU_MAX_SCANOUTS:
        raise ValueError(f"at most {VIRTIO_GPU_MAX_SCANOUTS} scanouts, got {len(modes)}")
    pmodes: list[int] = []
    for m in modes:
        pmodes += (m.r.x, m.r.y, m.r.width, m.r.height, int(m.enabled), m.flags)
    pmodes += [0] * (6 * (VIRTIO_GPU_MAX_SCANOUTS - len(modes)))
    return _DISPLAY_INFO.pack(*_hdr_values(hdr, CtrlType.RESP_OK_DISPLAY_INFO), *pmodes)


def edid(hdr: CtrlHdr, data: bytes) -> bytes:
    if len(data) > EDID_MAX_SIZE:
        raise ValueError(f"EDID blob of {len(data)} bytes exceeds {EDID_MAX_SIZE}")
    return _EDID.pack(*_hdr_values(hdr, CtrlType.RESP_OK_EDID), len(data), bytes(data))


def capset_info(hdr: CtrlHdr, capset_id: int, capset_max_version: int, capset_max_size: int) -> bytes:
    return _CAPSET_INFO.pack(*_hdr_values(hdr, CtrlType.RESP_OK_CAPSET_INFO), capset_id, capset_max_version,
                             capset_max_size)


def capset(hdr: CtrlHdr, data: bytes) -> bytes:
    # resp_capset is a bare header; capset_data[] follows it.
    return _HDR.pack(*_hdr_values(hdr, CtrlType.RESP_OK_CAPSET)) + bytes(data)


def resource_uuid(hdr: CtrlHdr, uuid: bytes | uuid_mod.UUID) -> bytes:
    raw = uuid.bytes if isinstance(uuid, uuid_mod.UUID) else bytes(uuid)
    if len(raw) != UUID_SIZE:
        raise ValueError(f"a UUID is {UUID_SIZE} bytes, got {len(raw)}")
    return _UUID.pack(*_hdr_values(hdr, CtrlType.RESP_OK_RESOURCE_UUID), raw)


def map_info(hdr: CtrlHdr, map_info: int) -> bytes:
    """Only CACHED, UNCACHED or WC may be sent: the Linux guest compares for equality and maps anything else
    as cached, which is exactly the silent mismatch this project exists to prevent."""
    if map_info not in _VALID_MAP_INFO:
        raise ValueError(f"map_info must be CACHED, UNCACHED or WC, got {map_info:#x}")
    return _MAP_INFO.pack(*_hdr_values(hdr, CtrlType.RESP_OK_MAP_INFO), int(map_info))
