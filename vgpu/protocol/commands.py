"""Typed virtio-gpu requests, one frozen class per command type.

Each carries the decoded request header because the response must echo its fence, context and ring; the
payload fields keep the spec's names. Reserved/padding fields are not represented: the device must not
depend on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from .constants import VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK, CtrlType
from .mem_entries import MemEntries
from .records import Box, CtrlHdr, CursorPos, Rect


@dataclass(frozen=True, slots=True)
class GetDisplayInfo:
    TYPE: ClassVar[CtrlType] = CtrlType.CMD_GET_DISPLAY_INFO
    hdr: CtrlHdr


@dataclass(frozen=True, slots=True)
class ResourceCreate2D:
    TYPE: ClassVar[CtrlType] = CtrlType.CMD_RESOURCE_CREATE_2D
    hdr: CtrlHdr
    resource_id: int
    format: int
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class ResourceUnref:
    TYPE: ClassVar[CtrlType] = CtrlType.CMD_RESOURCE_UNREF
    hdr: CtrlHdr
    resource_id: int


@dataclass(frozen=True, slots=True)
class SetScanout:
    TYPE: ClassVar[CtrlType] = CtrlType.CMD_SET_SCANOUT
    hdr: CtrlHdr
    r: Rect
    scanout_id: int
    resource_id: int


@dataclass(frozen=True, slots=True)
class ResourceFlush:
    TYPE: ClassVar[CtrlType] = CtrlType.CMD_RESOURCE_FLUSH
    hdr: CtrlHdr
    r: Rect
    resource_id: int


@dataclass(frozen=True, slots=True)
class TransferToHost2D:
    TYPE: ClassVar[CtrlType] = CtrlType.CMD_TRANSFER_TO_HOST_2D
    hdr: CtrlHdr
    r: Rect
    offset: int
    resource_id: int


@dataclass(frozen=True, slots=True)
class ResourceAttachBacking:
    TYPE: ClassVar[CtrlType] = CtrlType.CMD_RESOURCE_ATTACH_BACKING
    hdr: CtrlHdr
    resource_id: int
    entries: MemEntries


@dataclass(frozen=True, slots=True)
class ResourceDetachBacking:
    TYPE: ClassVar[CtrlType] = CtrlType.CMD_RESOURCE_DETACH_BACKING
    hdr: CtrlHdr
    resource_id: int


@dataclass(frozen=True, slots=True)
class GetCapsetInfo:
    TYPE: ClassVar[CtrlType] = CtrlType.CMD_GET_CAPSET_INFO
    hdr: CtrlHdr
    capset_index: int


@dataclass(frozen=True, slots=True)
class GetCapset:
    TYPE: ClassVar[CtrlType] = CtrlType.CMD_GET_CAPSET
    hdr: CtrlHdr
    capset_id: int
    capset_version: int


@dataclass(frozen=True, slots=True)
class GetEdid:
    TYPE: ClassVar[CtrlType] = CtrlType.CMD_GET_EDID
    hdr: CtrlHdr
    scanout: int


@dataclass(frozen=True, slots=True)
class ResourceAssignUuid:
    TYPE: ClassVar[CtrlType] = CtrlType.CMD_RESOURCE_ASSIGN_UUID
    hdr: CtrlHdr
    resource_id: int


@dataclass(frozen=True, slots=True)
class ResourceCreateBlob:
    TYPE: ClassVar[CtrlType] = CtrlType.CMD_RESOURCE_CREATE_BLOB
    hdr: CtrlHdr
    resource_id: int
    blob_mem: int
    blob_flags: int
    blob_id: int
    size: int
    entries: MemEntries


@dataclass(frozen=True, slots=True)
class SetScanoutBlob:
    TYPE: ClassVar[CtrlType] = CtrlType.CMD_SET_SCANOUT_BLOB
    hdr: CtrlHdr
    r: Rect
    scanout_id: int
    resource_id: int
    width: int
    height: int
    format: int
    strides: tuple[int, int, int, int]
    offsets: tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class CtxCreate:
    """``debug_name`` holds the first ``min(nlen, 64)`` bytes; ``nlen`` is kept as sent for logging."""

    TYPE: ClassVar[CtrlType] = CtrlType.CMD_CTX_CREATE
    hdr: CtrlHdr
    nlen: int
    context_init: int
    debug_name: bytes

    @property
    def capset_id(self) -> int:
        """Context type requested with CONTEXT_INIT; 0 lets the device choose."""
        return self.context_init & VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK


@dataclass(frozen=True, slots=True)
class CtxDestroy:
    TYPE: ClassVar[CtrlType] = CtrlType.CMD_CTX_DESTROY
    hdr: CtrlHdr


@dataclass(frozen=True, slots=True)
class CtxAttachResource:
    TYPE: ClassVar[CtrlType] = CtrlType.CMD_CTX_ATTACH_RESOURCE
    hdr: CtrlHdr
    resource_id: int


@dataclass(frozen=True, slots=True)
class CtxDetachResource:
    TYPE: ClassVar[CtrlType] = CtrlType.CMD_CTX_DETACH_RESOURCE
    hdr: CtrlHdr
    resource_id: int


@dataclass(frozen=True, slots=True)
class ResourceCreate3D:
    TYPE: ClassVar[CtrlType] = CtrlType.CMD_RESOURCE_CREATE_3D
    hdr: CtrlHdr
    resource_id: int
    target: int
    format: int
    bind: int
    width: int
    height: int
    depth: int
    array_size: int
    last_level: int
    nr_samples: int
    flags: int


@dataclass(frozen=True, slots=True)
class TransferToHost3D:
    TYPE: ClassVar[CtrlType] = CtrlType.CMD_TRANSFER_TO_HOST_3D
    hdr: CtrlHdr
    box: Box
    offset: int
    resource_id: int
    level: int
    stride: int
    layer_stride: int


@dataclass(frozen=True, slots=True)
class TransferFromHost3D:
    TYPE: ClassVar[CtrlType] = CtrlType.CMD_TRANSFER_FROM_HOST_3D
    hdr: CtrlHdr
    box: Box
    offset: int
    resource_id: int
    level: int
    stride: int
    layer_stride: int


@dataclass(frozen=True, slots=True)
class SubmitCmd:
    """SUBMIT_3D; the wire ``size`` is ``len(data)`` by construction, so the two cannot disagree."""

    TYPE: ClassVar[CtrlType] = CtrlType.CMD_SUBMIT_3D
    hdr: CtrlHdr
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class ResourceMapBlob:
    TYPE: ClassVar[CtrlType] = CtrlType.CMD_RESOURCE_MAP_BLOB
    hdr: CtrlHdr
    resource_id: int
    offset: int


@dataclass(frozen=True, slots=True)
class ResourceUnmapBlob:
    TYPE: ClassVar[CtrlType] = CtrlType.CMD_RESOURCE_UNMAP_BLOB
    hdr: CtrlHdr
    resource_id: int


@dataclass(frozen=True, slots=True)
class UpdateCursor:
    TYPE: ClassVar[CtrlType] = CtrlType.CMD_UPDATE_CURSOR
    hdr: CtrlHdr
    pos: CursorPos
    resource_id: int
    hot_x: int
    hot_y: int


@dataclass(frozen=True, slots=True)
class MoveCursor:
    """Only ``pos`` is meaningful for MOVE_CURSOR (the spec tells the device to ignore the rest)."""

    TYPE: ClassVar[CtrlType] = CtrlType.CMD_MOVE_CURSOR
    hdr: CtrlHdr
    pos: CursorPos


Command: TypeAlias = (
    GetDisplayInfo
    | ResourceCreate2D
    | ResourceUnref
    | SetScanout
    | ResourceFlush
    | TransferToHost2D
    | ResourceAttachBacking
    | ResourceDetachBacking
    | GetCapsetInfo
    | GetCapset
    | GetEdid
    | ResourceAssignUuid
    | ResourceCreateBlob
    | SetScanoutBlob
    | CtxCreate
    | CtxDestroy
    | CtxAttachResource
    | CtxDetachResource
    | ResourceCreate3D
    | TransferToHost3D
    | TransferFromHost3D
    | SubmitCmd
    | ResourceMapBlob
    | ResourceUnmapBlob
    | UpdateCursor
    | MoveCursor
)

COMMAND_CLASSES: tuple[type[Command], ...] = (
    GetDisplayInfo,
    ResourceCreate2D,
    ResourceUnref,
    SetScanout,
    ResourceFlush,
    TransferToHost2D,
    ResourceAttachBacking,
    ResourceDetachBacking,
    GetCapsetInfo,
    GetCapset,
    GetEdid,
    ResourceAssignUuid,
    ResourceCreateBlob,
    SetScanoutBlob,
    CtxCreate,
    CtxDestroy,
    CtxAttachResource,
    CtxDetachResource,
    ResourceCreate3D,
    TransferToHost3D,
    TransferFromHost3D,
    SubmitCmd,
    ResourceMapBlob,
    ResourceUnmapBlob,
    UpdateCursor,
    MoveCursor,
)
