"""Numeric constants of the virtio-gpu device (virtio spec, device-types/gpu; Linux ``virtio_gpu.h``).

Members keep the spec's names minus the ``VIRTIO_GPU_`` prefix so that a grep for a spec name finds the
member; constants that live outside an enum keep their full spec name for the same reason.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

VIRTIO_ID_GPU = 16
VIRTIO_GPU_MAX_SCANOUTS = 16
VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK = 0x000000FF
VIRTIO_GPU_MAP_CACHE_MASK = 0x0F
VIRTIO_GPU_RESOURCE_FLAG_Y_0_TOP = 1 << 0
# ring_idx is a u8 on the wire but the spec only defines timelines 0..63.
VIRTIO_GPU_MAX_RING_IDX = 63

CONTROLQ = 0
CURSORQ = 1


class CtrlType(IntEnum):
    """``enum virtio_gpu_ctrl_type``: commands and responses share one number space on the wire."""

    UNDEFINED = 0

    # 2d commands
    CMD_GET_DISPLAY_INFO = 0x0100
    CMD_RESOURCE_CREATE_2D = 0x0101
    CMD_RESOURCE_UNREF = 0x0102
    CMD_SET_SCANOUT = 0x0103
    CMD_RESOURCE_FLUSH = 0x0104
    CMD_TRANSFER_TO_HOST_2D = 0x0105
    CMD_RESOURCE_ATTACH_BACKING = 0x0106
    CMD_RESOURCE_DETACH_BACKING = 0x0107
    CMD_GET_CAPSET_INFO = 0x0108
    CMD_GET_CAPSET = 0x0109
    CMD_GET_EDID = 0x010A
    CMD_RESOURCE_ASSIGN_UUID = 0x010B
    CMD_RESOURCE_CREATE_BLOB = 0x010C
    CMD_SET_SCANOUT_BLOB = 0x010D

    # 3d commands
    CMD_CTX_CREATE = 0x0200
    CMD_CTX_DESTROY = 0x0201
    CMD_CTX_ATTACH_RESOURCE = 0x0202
    CMD_CTX_DETACH_RESOURCE = 0x0203
    CMD_RESOURCE_CREATE_3D = 0x0204
    CMD_TRANSFER_TO_HOST_3D = 0x0205
    CMD_TRANSFER_FROM_HOST_3D = 0x0206
    CMD_SUBMIT_3D = 0x0207
    CMD_RESOURCE_MAP_BLOB = 0x0208
    CMD_RESOURCE_UNMAP_BLOB = 0x0209

    # cursor commands
    CMD_UPDATE_CURSOR = 0x0300
    CMD_MOVE_CURSOR = 0x0301

    # success responses
    RESP_OK_NODATA = 0x1100
    RESP_OK_DISPLAY_INFO = 0x1101
    RESP_OK_CAPSET_INFO = 0x1102
    RESP_OK_CAPSET = 0x1103
    RESP_OK_EDID = 0x1104
    RESP_OK_RESOURCE_UUID = 0x1105
    RESP_OK_MAP_INFO = 0x1106

    # error responses
    RESP_ERR_UNSPEC = 0x1200
    RESP_ERR_OUT_OF_MEMORY = 0x1201
    RESP_ERR_INVALID_SCANOUT_ID = 0x1202
    RESP_ERR_INVALID_RESOURCE_ID = 0x1203
    RESP_ERR_INVALID_CONTEXT_ID = 0x1204
    RESP_ERR_INVALID_PARAMETER = 0x1205

    @property
    def is_error(self) -> bool:
        return 0x1200 <= self.value < 0x1300

    @property
    def is_response(self) -> bool:
        return self.value >= 0x1100


class GpuFeature(IntEnum):
    """Feature bit *numbers* (not masks): the vhost-user feature word is built with ``1 << bit``."""

    F_VIRGL = 0
    F_EDID = 1
    F_RESOURCE_UUID = 2
    F_RESOURCE_BLOB = 3
    F_CONTEXT_INIT = 4
    F_BLOB_ALIGNMENT = 5  # virtio spec v1.4 only; absent from the Linux header

    @property
    def mask(self) -> int:
        return 1 << self.value


class CtrlFlag(IntFlag):
    """``virtio_gpu_ctrl_hdr.flags``."""

    FLAG_FENCE = 1 << 0
    FLAG_INFO_RING_IDX = 1 << 1


class Format(IntEnum):
    """``enum virtio_gpu_formats``."""

    FORMAT_B8G8R8A8_UNORM = 1
    FORMAT_B8G8R8X8_UNORM = 2
    FORMAT_A8R8G8B8_UNORM = 3
    FORMAT_X8R8G8B8_UNORM = 4
    FORMAT_R8G8B8A8_UNORM = 67
    FORMAT_X8B8G8R8_UNORM = 68
    FORMAT_A8B8G8R8_UNORM = 121
    FORMAT_R8G8B8X8_UNORM = 134


class BlobMem(IntEnum):
    """``resource_create_blob.blob_mem``; zero is not a member because the spec calls it invalid."""

    BLOB_MEM_GUEST = 0x0001
    BLOB_MEM_HOST3D = 0x0002
    BLOB_MEM_HOST3D_GUEST = 0x0003


class BlobFlag(IntFlag):
    """``resource_create_blob.blob_flags``."""

    BLOB_FLAG_USE_MAPPABLE = 0x0001
    BLOB_FLAG_USE_SHAREABLE = 0x0002
    BLOB_FLAG_USE_CROSS_DEVICE = 0x0004


class MapCache(IntEnum):
    """``resp_map_info.map_info`` cache attribute (low nibble, ``VIRTIO_GPU_MAP_CACHE_MASK``).

    The Linux guest compares the value for equality, so a response must carry exactly one of
    CACHED / UNCACHED / WC; NONE exists on the wire but is never a valid answer to MAP_BLOB.
    """

    MAP_CACHE_NONE = 0x00
    MAP_CACHE_CACHED = 0x01
    MAP_CACHE_UNCACHED = 0x02
    MAP_CACHE_WC = 0x03


class Capset(IntEnum):
    """Registered capability-set ids (virtio spec list; Linux/QEMU headers may list fewer)."""

    CAPSET_VIRGL = 1
    CAPSET_VIRGL2 = 2
    CAPSET_GFXSTREAM = 3
    CAPSET_VENUS = 4
    CAPSET_CROSS_DOMAIN = 5


class ShmId(IntEnum):
    """``enum virtio_gpu_shm_id``: the only shared-memory region ids a GPU device may expose."""

    SHM_ID_UNDEFINED = 0
    SHM_ID_HOST_VISIBLE = 1


class Event(IntFlag):
    """``virtio_gpu_config.events_read`` / ``events_clear`` bits."""

    EVENT_DISPLAY = 1 << 0


ERROR_RESPONSES: frozenset[CtrlType] = frozenset(t for t in CtrlType if t.is_error)
