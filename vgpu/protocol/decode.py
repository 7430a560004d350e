"""Bytes → typed command: the single entry point for everything a guest puts on the control or cursor queue.

Error policy (the spec fixes no codes for malformed requests; this follows QEMU/Linux convention):

* unknown or non-command ``type`` → RESP_ERR_UNSPEC;
* request shorter than its command struct, an ``nr_entries`` or SUBMIT_3D ``size`` that needs more bytes than
  the request holds, more than ``MAX_MEM_ENTRIES`` entries, or FLAG_INFO_RING_IDX with ring_idx > 63
  → RESP_ERR_INVALID_PARAMETER.

Nothing is allocated in proportion to a guest-supplied count before that count has been checked against the
bytes actually present. The per-command decoders are generated (``derive``); this module only checks what
every command shares.
"""

from __future__ import annotations

import struct

from . import commands as c
from .constants import VIRTIO_GPU_MAX_RING_IDX, CtrlFlag, CtrlType
from .derive import BY_TYPE, MAX_MEM_ENTRIES
from .errors import CommandError
from .records import CtrlHdr

__all__ = ["CTRL_HDR_SIZE", "MAX_MEM_ENTRIES", "command_size", "decode", "decode_hdr"]

_HDR = BY_TYPE[CtrlType.CMD_GET_DISPLAY_INFO].flat.st  # a bare header: the shared head of every request
CTRL_HDR_SIZE: int = _HDR.size
_RING_IDX_FLAG = int(CtrlFlag.FLAG_INFO_RING_IDX)
_TYPE_FLAGS = struct.Struct("<II")
# Per type: the fixed part's codec, the generated decoder, and whether a variable tail follows (only then is a view
# of the rest made). Plain tuples: this is looked up for every command.
_FAST = {t: (d.flat.st, d.decode, any(f in d.flat.fields for f in ("nr_entries", "size"))) for t, d in BY_TYPE.items()}
_NO_TAIL = memoryview(b"")


def command_size(ctrl_type: int) -> int | None:
    """Fixed request size of a command type (without variable tail), or None for unknown types."""
    d = BY_TYPE.get(ctrl_type)
    return d.flat.size if d is not None else None


def decode_hdr(buf: bytes | bytearray | memoryview) -> CtrlHdr:
    """Decode only the header, e.g. to answer a request whose body the device will not look at."""
    if len(buf) < CTRL_HDR_SIZE:
        raise CommandError(CtrlType.RESP_ERR_INVALID_PARAMETER,
                           f"request of {len(buf)} bytes is shorter than ctrl_hdr ({CTRL_HDR_SIZE})")
    return CtrlHdr(*_HDR.unpack_from(buf))


def decode(buf: bytes | bytearray | memoryview) -> c.Command:
    """Decode one request (the concatenated device-readable part of a descriptor chain).

    Raises only ``CommandError`` (without a header: the caller, which has the bytes, attaches it). Bytes beyond
    the command struct and its declared tail are ignored, as drivers may hand over larger buffers than needed.
    """
    n = len(buf)
    if n < CTRL_HDR_SIZE:
        raise CommandError(CtrlType.RESP_ERR_INVALID_PARAMETER,
                           f"request of {n} bytes is shorter than ctrl_hdr ({CTRL_HDR_SIZE})")
    ctrl_type, flags = _TYPE_FLAGS.unpack_from(buf)
    fast = _FAST.get(ctrl_type)
    if fast is None:
        raise CommandError(CtrlType.RESP_ERR_UNSPEC, f"unknown command type {ctrl_type:#06x}")
    if flags & _RING_IDX_FLAG and buf[20] > VIRTIO_GPU_MAX_RING_IDX:
        raise CommandError(CtrlType.RESP_ERR_INVALID_PARAMETER,
                           f"ring_idx {buf[20]} is outside 0..{VIRTIO_GPU_MAX_RING_IDX}")
    st, build, tail = fast
    if n < st.size:
        raise CommandError(CtrlType.RESP_ERR_INVALID_PARAMETER,
                           f"{CtrlType(ctrl_type).name} needs {st.size} bytes, request has {n}")
    if not tail:
        return build(st.unpack_from(buf), _NO_TAIL)
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    return build(st.unpack_from(buf), view[st.size:])
