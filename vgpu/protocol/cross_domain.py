"""Cross-domain (capset 5) wire structs and constants, as sent by sommelier and minigbm and answered by
rutabaga_gfx. These travel inside SUBMIT_3D streams and guest ring buffers, not as virtio-gpu commands, and
have no kernel UAPI counterpart; their sizes are pinned by tests instead of by the DWARF layout check.
"""

from __future__ import annotations

from enum import IntEnum

from construct import Array, Bytes, Int8ul, Int16ul, Int32sl, Int32ul, Int64ul, Padding, Struct


class CrossDomainCmd(IntEnum):
    CROSS_DOMAIN_CMD_INIT = 1
    CROSS_DOMAIN_CMD_GET_IMAGE_REQUIREMENTS = 2
    CROSS_DOMAIN_CMD_POLL = 3
    CROSS_DOMAIN_CMD_ASSIGN_SOCKET_UUID = 13


class CrossDomainChannel(IntEnum):
    """``channel_type`` values; 0 means "no channel" (minigbm's INIT leaves it 0)."""

    CROSS_DOMAIN_CHANNEL_TYPE_WAYLAND = 1
    CROSS_DOMAIN_CHANNEL_TYPE_CAMERA = 2
    CROSS_DOMAIN_CHANNEL_TYPE_PIPEWIRE = 0x10
    CROSS_DOMAIN_CHANNEL_TYPE_X11 = 0x11
    CROSS_DOMAIN_CHANNEL_TYPE_DBUS_SESSION = 0x12
    CROSS_DOMAIN_CHANNEL_TYPE_DBUS_SYSTEM = 0x13


CROSS_DOMAIN_QUERY_RING = 0
CROSS_DOMAIN_CHANNEL_RING = 1

# The second byte is "fence_ctx_idx" in sommelier; the host never reads it.
CrossDomainHeader = Struct(
    "cmd" / Int8ul,
    "ring_idx" / Int8ul,
    "cmd_size" / Int16ul,
    "pad" / Padding(4),
)

# INIT comes in three sizes; hosts since rutabaga_gfx 0.1.80 tell them apart by cmd_size exactly.
CrossDomainInit = Struct(
    "hdr" / CrossDomainHeader,
    "query_ring_id" / Int32ul,
    "channel_ring_id" / Int32ul,
    "channel_type" / Int32ul,
    "internal_socket_uuid" / Bytes(16),
)

CrossDomainInitV1 = Struct(
    "hdr" / CrossDomainHeader,
    "query_ring_id" / Int32ul,
    "channel_ring_id" / Int32ul,
    "channel_type" / Int32ul,
)

CrossDomainInitLegacy = Struct(
    "hdr" / CrossDomainHeader,
    "query_ring_id" / Int32ul,
    "channel_type" / Int32ul,
)

CrossDomainGetImageRequirements = Struct(
    "hdr" / CrossDomainHeader,
    "width" / Int32ul,
    "height" / Int32ul,
    "drm_format" / Int32ul,
    "flags" / Int32ul,
)

# Written at offset 0 of the query ring; minigbm reads it as u32 words (modifier at word 8, blob_id at 12).
CrossDomainImageRequirements = Struct(
    "strides" / Array(4, Int32ul),
    "offsets" / Array(4, Int32ul),
    "modifier" / Int64ul,
    "size" / Int64ul,
    "blob_id" / Int32ul,
    "map_info" / Int32ul,
    "memory_idx" / Int32sl,
    "physical_device_idx" / Int32sl,
)

CrossDomainCapabilities = Struct(
    "version" / Int32ul,
    "supported_channels" / Int32ul,
    "supports_dmabuf" / Int32ul,
    "supports_external_gpu_memory" / Int32ul,
)

CROSS_DOMAIN_INIT_SIZES: frozenset[int] = frozenset(
    {CrossDomainInit.sizeof(), CrossDomainInitV1.sizeof(), CrossDomainInitLegacy.sizeof()}
)
