"""vhost-user and vhost-user-gpu wire formats: the single source of truth for every layout.

vhost-user is host-native endian (the front end and back end share a machine); the split-virtqueue layouts are
little-endian because a VIRTIO 1.0 device is always little-endian.  Nothing here does I/O or keeps state: the
connection and queue code above turn these layouts into behaviour.
"""

from __future__ import annotations

import enum
import sys
from typing import Any, Final

from construct import (
    Array,
    Bytes,
    Int8un,
    Int16ul,
    Int16un,
    Int32sn,
    Int32ul,
    Int32un,
    Int64ul,
    Int64un,
    Padding,
    Struct,
    this,
)

from .layout import struct_of

if sys.byteorder != "little":  # pragma: no cover - we only claim little-endian hosts
    raise ImportError("vgpu's vhost-user layer assumes a little-endian host (the virtqueue code maps LE rings)")

# --- message framing ------------------------------------------------------------------------------------------

VHOST_USER_VERSION: Final = 0x1
VERSION_MASK: Final = 0x3
FLAG_REPLY: Final = 0x4
FLAG_NEED_REPLY: Final = 0x8
HEADER_SIZE: Final = 12
# Largest payload we accept from a peer.  The biggest legitimate payload in either direction is the 2056-byte
# shared-memory config or a 16404-byte cursor image on the GPU socket; anything far beyond is a broken peer and we
# refuse to allocate for it.
MAX_PAYLOAD: Final = 0x10000
MAX_FDS: Final = 8
# Regions in one SET_MEM_TABLE (QEMU's VHOST_MEMORY_BASELINE_NREGIONS).
MAX_MEM_TABLE_REGIONS: Final = 8
# Slots we announce for ADD_MEM_REG.  QEMU caps its own use at 512; 509 is what libvhost-user announces, which keeps
# us comfortably below the per-process mapping limits while allowing every mapped blob its own slot.
MAX_MEM_SLOTS: Final = 509
MAX_CONFIG_SIZE: Final = 256
# Largest virtqueue we accept (the virtio spec's split-ring maximum).
MAX_QUEUE_SIZE: Final = 32768

Header = Struct("request" / Int32un, "flags" / Int32un, "size" / Int32un)

U64 = Struct("value" / Int64un)


class FrontendRequest(enum.IntEnum):
    """Requests the front end (VMM) sends on the main socket."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44


class BackendRequest(enum.IntEnum):
    """Requests the back end sends on the back-end channel (the SET_BACKEND_REQ_FD socket)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


class CrosvmBackendRequest(enum.IntEnum):
    """crosvm's own back-end requests beside the standard ones (its third_party/vmm_vhost/src/message.rs): a
    crosvm front end always answers them with a u64 status, REPLY_ACK or not."""

    GPU_MAP = 1006
    EXTERNAL_MAP = 1007


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of the vhost-user protocol features."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19
    GET_VRING_BASE_INFLIGHT = 20
    GPA_ADDRESSES = 21
    # Bit 22 in QEMU 11.1 (588acb45c29f); drafts used 20 and rust-vmm vhost 0.16 used 21.
    SHMEM = 22


# Where rust-vmm vhost 0.16 and crosvm from 2026-03-09 to 2026-08-03 put SHMEM; the spec's GPA_ADDRESSES
# (spec/shmem-bit-21.md says when a back end may offer it and why only when asked).
LEGACY_SHMEM_BIT: Final = ProtocolFeature.GPA_ADDRESSES


def bit(n: int) -> int:
    return 1 << n


# Virtio feature bits that matter to the transport.
VIRTIO_RING_F_INDIRECT_DESC: Final = 28
VIRTIO_RING_F_EVENT_IDX: Final = 29
VHOST_USER_F_PROTOCOL_FEATURES: Final = 30
VIRTIO_F_VERSION_1: Final = 32

# --- front end → back end payloads -----------------------------------------------------------------------------

VringState = Struct("index" / Int32un, "num" / Int32un)
VringStateC = VringState.compile()

VringAddr = Struct(
    "index" / Int32un,
    "flags" / Int32un,
    "desc_user_addr" / Int64un,
    "used_user_addr" / Int64un,
    "avail_user_addr" / Int64un,
    "log_guest_addr" / Int64un,
)
VHOST_VRING_F_LOG: Final = 0x1

MemoryRegion = Struct(
    "guest_phys_addr" / Int64un,
    "memory_size" / Int64un,
    "userspace_addr" / Int64un,
    "mmap_offset" / Int64un,
)
# The XEN_MMAP variant appends the mapping flags and domain id.
XenMemoryRegion = Struct(
    "guest_phys_addr" / Int64un,
    "memory_size" / Int64un,
    "userspace_addr" / Int64un,
    "mmap_offset" / Int64un,
    "xen_mmap_flags" / Int32un,
    "domid" / Int32un,
)
XEN_MMAP_FLAG_FOREIGN: Final = 0x1
XEN_MMAP_FLAG_GRANT: Final = 0x2
XEN_MMAP_FLAG_MAP_ON_DEMAND: Final = 0x100

# SET_MEM_TABLE: the front end sends only num_regions entries (size = 8 + n * 32), one fd per region.
MemoryTable = Struct(
    "num_regions" / Int32un,
    Padding(4),
    "regions" / Array(this.num_regions, MemoryRegion),
)
MEMORY_TABLE_FIXED: Final = 8
# The same with XEN_MMAP negotiated: 40-byte regions.
XenMemoryTable = Struct(
    "num_regions" / Int32un,
    Padding(4),
    "regions" / Array(this.num_regions, XenMemoryRegion),
)

# ADD_MEM_REG / REM_MEM_REG.
SingleMemoryRegion = Struct(Padding(8), "region" / MemoryRegion)
XenSingleMemoryRegion = Struct(Padding(8), "region" / XenMemoryRegion)

Log = Struct("mmap_size" / Int64un, "mmap_offset" / Int64un)

IotlbMsg = Struct(
    "iova" / Int64un,
    "size" / Int64un,
    "uaddr" / Int64un,
    "perm" / Int8un,
    "type" / Int8un,
    Padding(6),
)

ConfigHeader = Struct("offset" / Int32un, "size" / Int32un, "flags" / Int32un)
CONFIG_HEADER_SIZE: Final = 12
CONFIG_FLAG_WRITABLE: Final = 0
CONFIG_FLAG_MIGRATION: Final = 1

VringArea = Struct("u64" / Int64un, "size" / Int64un, "offset" / Int64un)

# The C struct is not packed: 2 + 2 bytes of queue fields leave 4 bytes of tail padding (sizeof 24).
Inflight = Struct(
    "mmap_size" / Int64un,
    "mmap_offset" / Int64un,
    "num_queues" / Int16un,
    "queue_size" / Int16un,
    Padding(4),
)

Shared = Struct("uuid" / Bytes(16))

DeviceStateTransfer = Struct("direction" / Int32un, "phase" / Int32un)

# --- back end → front end payloads -----------------------------------------------------------------------------

MMapRequest = Struct(
    "shmid" / Int8un,
    Padding(7),
    "fd_offset" / Int64un,
    "shm_offset" / Int64un,
    "len" / Int64un,
    "flags" / Int64un,
)
MMAP_FLAG_READ_ONLY: Final = 0
MMAP_FLAG_READ_WRITE: Final = 1

# crosvm's GPU_MAP (1006): Vulkan memory for the front end to import (the fd is an opaque memory handle).
GpuMapRequest = Struct(
    "shmid" / Int8un,
    Padding(7),
    "shm_offset" / Int64un,
    "len" / Int64un,
    "memory_idx" / Int32un,
    "handle_type" / Int32un,
    "device_uuid" / Bytes(16),
    "driver_uuid" / Bytes(16),
)
# crosvm's EXTERNAL_MAP (1007): a pointer in the front end's own address space (in-process back ends only).
ExternalMapRequest = Struct("shmid" / Int8un, Padding(7), "shm_offset" / Int64un, "len" / Int64un, "ptr" / Int64un)

SHMEM_MAX_REGIONS: Final = 256
ShmemConfig = Struct(
    "nregions" / Int32un,
    Padding(4),
    "memory_sizes" / Array(SHMEM_MAX_REGIONS, Int64un),
)

# --- SET_VRING_KICK / CALL / ERR -----------------------------------------------------------------------------

VRING_IDX_MASK: Final = 0xFF
VRING_NOFD_MASK: Final = 0x100

# --- split virtqueue layouts (virtio 1.x, little-endian) -------------------------------------------------------

VringDesc = Struct("addr" / Int64ul, "len" / Int32ul, "flags" / Int16ul, "next" / Int16ul)
VRING_DESC_SIZE: Final = 16
VRING_DESC_F_NEXT: Final = 1
VRING_DESC_F_WRITE: Final = 2
VRING_DESC_F_INDIRECT: Final = 4

VringAvailHeader = Struct("flags" / Int16ul, "idx" / Int16ul)
VRING_AVAIL_F_NO_INTERRUPT: Final = 1

VringUsedHeader = Struct("flags" / Int16ul, "idx" / Int16ul)
VringUsedElem = Struct("id" / Int32ul, "len" / Int32ul)
VRING_USED_F_NO_NOTIFY: Final = 1

# --- vhost-user-gpu display protocol (docs/interop/vhost-user-gpu.rst) ------------------------------------------


class GpuRequest(enum.IntEnum):
    """Messages the GPU back end sends on the display socket handed over with GPU_SET_SOCKET."""

    GET_PROTOCOL_FEATURES = 1
    SET_PROTOCOL_FEATURES = 2
    GET_DISPLAY_INFO = 3
    CURSOR_POS = 4
    CURSOR_POS_HIDE = 5
    CURSOR_UPDATE = 6
    SCANOUT = 7
    UPDATE = 8
    DMABUF_SCANOUT = 9
    DMABUF_UPDATE = 10
    GET_EDID = 11
    DMABUF_SCANOUT2 = 12


class GpuProtocolFeature(enum.IntEnum):
    EDID = 0
    DMABUF2 = 1


GPU_CURSOR_SIZE: Final = 64

GpuCursorPos = Struct("scanout_id" / Int32un, "x" / Int32un, "y" / Int32un)
GpuCursorUpdate = Struct(
    "pos" / GpuCursorPos,
    "hot_x" / Int32un,
    "hot_y" / Int32un,
    "data" / Bytes(GPU_CURSOR_SIZE * GPU_CURSOR_SIZE * 4),
)
GpuScanout = Struct("scanout_id" / Int32un, "width" / Int32un, "height" / Int32un)
# Followed by width * height * 4 bytes of x8r8g8b8 pixels for UPDATE; alone for DMABUF_UPDATE.
GpuUpdate = Struct(
    "scanout_id" / Int32un, "x" / Int32un, "y" / Int32un, "width" / Int32un, "height" / Int32un
)
GPU_UPDATE_SIZE: Final = 20
GpuDmabufScanout = Struct(
    "scanout_id" / Int32un,
    "x" / Int32un,
    "y" / Int32un,
    "width" / Int32un,
    "height" / Int32un,
    "fd_width" / Int32un,
    "fd_height" / Int32un,
    "fd_stride" / Int32un,
    "fd_flags" / Int32un,
    "fd_drm_fourcc" / Int32sn,
)
GpuDmabufScanout2 = Struct("dmabuf_scanout" / GpuDmabufScanout, "modifier" / Int64un)
GpuEdidRequest = Struct("scanout_id" / Int32un)


# ``struct`` forms of the layouts every message or every mapping uses, derived from the definitions above.
HEADER_ST: Final = struct_of(Header)
_U64_ST: Final = struct_of(U64)
_MMAP_REQUEST_ST: Final = struct_of(MMapRequest)
# The display messages a frame or a cursor move sends (RESOURCE_FLUSH, MOVE_CURSOR): one per command.
GPU_UPDATE_ST: Final = struct_of(GpuUpdate)
GPU_CURSOR_POS_ST: Final = struct_of(GpuCursorPos)


def parse_u64(payload: bytes) -> int:
    value: int = _U64_ST.unpack_from(payload)[0]
    return value


def build_u64(value: int) -> bytes:
    return _U64_ST.pack(value)


def build_header(request: int, flags: int, size: int) -> bytes:
    return HEADER_ST.pack(request, flags, size)


def build_mmap_request(shmid: int, fd_offset: int, shm_offset: int, length: int, flags: int) -> bytes:
    """SHMEM_MAP / SHMEM_UNMAP payload (one per host-blob mapping)."""
    return _MMAP_REQUEST_ST.pack(shmid, fd_offset, shm_offset, length, flags)


MMAP_REQUEST_SIZE: Final = _MMAP_REQUEST_ST.size


def parse_mmap_request(payload: bytes) -> tuple[int, int, int, int, int]:
    """(shmid, fd_offset, shm_offset, len, flags) of a SHMEM_MAP / SHMEM_UNMAP payload of exactly
    MMAP_REQUEST_SIZE bytes (a front end handles one per mapping: construct's parse costs 20-40 us of it)."""
    shmid, fd_offset, shm_offset, length, flags = _MMAP_REQUEST_ST.unpack(payload)
    return shmid, fd_offset, shm_offset, length, flags


def build(struct: Any, **fields: Any) -> bytes:
    """Build a payload from keyword fields; typed wrapper so callers stay mypy-clean."""
    data: bytes = struct.build(fields)
    return data
