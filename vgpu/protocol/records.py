"""Plain value types shared by decoded commands and encoded responses.

The ones built for every command (``CtrlHdr``, ``Rect``, ``Box``, ``CursorPos``) are plain slotted dataclasses,
not frozen ones, for the same measured reason as the commands (``commands`` says it), hashable by value. They
carry ints rather than enums where the guest may send values outside the enum (formats, blob_mem), because
rejecting those is the device's decision, not the decoder's.
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import CtrlFlag, CtrlType

# Plain ints: IntFlag arithmetic costs an enum construction per test on the per-command path.
_FENCE = int(CtrlFlag.FLAG_FENCE)
_RING_IDX = int(CtrlFlag.FLAG_INFO_RING_IDX)


@dataclass(slots=True, unsafe_hash=True)
class CtrlHdr:
    type: int
    flags: int = 0
    fence_id: int = 0
    ctx_id: int = 0
    ring_idx: int = 0

    @property
    def fenced(self) -> bool:
        return bool(self.flags & _FENCE)

    @property
    def has_ring_idx(self) -> bool:
        return bool(self.flags & _RING_IDX)

    @property
    def ctrl_type(self) -> CtrlType | None:
        """The type as an enum, or None when the guest sent a number the spec does not define."""
        try:
            return CtrlType(self.type)
        except ValueError:
            return None


@dataclass(slots=True, unsafe_hash=True)
class Rect:
    x: int
    y: int
    width: int
    height: int


@dataclass(slots=True, unsafe_hash=True)
class Box:
    x: int
    y: int
    z: int
    w: int
    h: int
    d: int


@dataclass(slots=True, unsafe_hash=True)
class CursorPos:
    scanout_id: int
    x: int
    y: int


@dataclass(frozen=True, slots=True)
class MemEntry:
    addr: int
    length: int


@dataclass(frozen=True, slots=True)
class DisplayOne:
    """One ``pmodes[]`` entry of RESP_OK_DISPLAY_INFO; ``enabled`` means "connector connected"."""

    r: Rect
    enabled: bool
    flags: int = 0


def request_hdr(
    ctrl_type: CtrlType, *, fence_id: int | None = None, ctx_id: int = 0, ring_idx: int | None = None
) -> CtrlHdr:
    """Header for a request built by a driver-side tool: the flags follow from which options are given,
    so a caller cannot set a fence id without FLAG_FENCE (or the reverse)."""
    flags = 0
    if fence_id is not None:
        flags |= CtrlFlag.FLAG_FENCE
    if ring_idx is not None:
        flags |= CtrlFlag.FLAG_INFO_RING_IDX
    return CtrlHdr(int(ctrl_type), int(flags), fence_id or 0, ctx_id, ring_idx or 0)
