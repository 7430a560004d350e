"""construct definitions of every virtio-gpu wire struct: the single source of truth for their layouts.

Names follow the C structs without the ``virtio_gpu_`` prefix (``ctrl_hdr`` is ``struct virtio_gpu_ctrl_hdr``)
so ``tools/layoutcheck.py`` can pair each definition with the kernel's own layout. Reserved fields are
``Padding``: the device writes zeros and never interprets what a guest put there. All values are little-endian
(virtio ``le32``/``le64``). Variable-length tails (mem_entry arrays, SUBMIT_3D streams, capset data) are not
part of these fixed structs; ``derive`` decodes them with explicit bounds checks. The hot path packs and unpacks
with ``struct`` formats derived from these definitions (``codec``), never with construct itself.
"""

from __future__ import annotations

from construct import Array, Bytes, Int8ul, Int32ul, Int64ul, Padding, Struct

from .constants import VIRTIO_GPU_MAX_SCANOUTS

ctrl_hdr = Struct(
    "type" / Int32ul,
    "flags" / Int32ul,
    "fence_id" / Int64ul,
    "ctx_id" / Int32ul,
    "ring_idx" / Int8ul,
    "padding" / Padding(3),
)

# Device configuration space as the Linux/QEMU headers define it (16 bytes) ...
config = Struct(
    "events_read" / Int32ul,
    "events_clear" / Int32ul,
    "num_scanouts" / Int32ul,
    "num_capsets" / Int32ul,
)
# ... and the virtio v1.4 form with blob_alignment (valid only with VIRTIO_GPU_F_BLOB_ALIGNMENT).
config_v1_4 = Struct(
    "events_read" / Int32ul,
    "events_clear" / Int32ul,
    "num_scanouts" / Int32ul,
    "num_capsets" / Int32ul,
    "blob_alignment" / Int32ul,
)

rect = Struct(
    "x" / Int32ul,
    "y" / Int32ul,
    "width" / Int32ul,
    "height" / Int32ul,
)

box = Struct(
    "x" / Int32ul,
    "y" / Int32ul,
    "z" / Int32ul,
    "w" / Int32ul,
    "h" / Int32ul,
    "d" / Int32ul,
)

mem_entry = Struct(
    "addr" / Int64ul,
    "length" / Int32ul,
    "padding" / Padding(4),
)

cursor_pos = Struct(
    "scanout_id" / Int32ul,
    "x" / Int32ul,
    "y" / Int32ul,
    "padding" / Padding(4),
)

display_one = Struct(
    "r" / rect,
    "enabled" / Int32ul,
    "flags" / Int32ul,
)


def _hdr_only() -> Struct:
    return Struct("hdr" / ctrl_hdr)


def _hdr_resource_id() -> Struct:
    """Many commands are just a header plus a resource id padded to 8 bytes."""
    return Struct("hdr" / ctrl_hdr, "resource_id" / Int32ul, "padding" / Padding(4))


# --- 2d requests ------------------------------------------------------------------------------------------

get_display_info = _hdr_only()

resource_create_2d = Struct(
    "hdr" / ctrl_hdr,
    "resource_id" / Int32ul,
    "format" / Int32ul,
    "width" / Int32ul,
    "height" / Int32ul,
)

resource_unref = _hdr_resource_id()

set_scanout = Struct(
    "hdr" / ctrl_hdr,
    "r" / rect,
    "scanout_id" / Int32ul,
    "resource_id" / Int32ul,
)

resource_flush = Struct(
    "hdr" / ctrl_hdr,
    "r" / rect,
    "resource_id" / Int32ul,
    "padding" / Padding(4),
)

transfer_to_host_2d = Struct(
    "hdr" / ctrl_hdr,
    "r" / rect,
    "offset" / Int64ul,
    "resource_id" / Int32ul,
    "padding" / Padding(4),
)

resource_attach_backing = Struct(
    "hdr" / ctrl_hdr,
    "resource_id" / Int32ul,
    "nr_entries" / Int32ul,
)

resource_detach_backing = _hdr_resource_id()

get_capset_info = Struct(
    "hdr" / ctrl_hdr,
    "capset_index" / Int32ul,
    "padding" / Padding(4),
)

get_capset = Struct(
    "hdr" / ctrl_hdr,
    "capset_id" / Int32ul,
    "capset_version" / Int32ul,
)

# The spec calls it virtio_gpu_get_edid; Linux/QEMU call it virtio_gpu_cmd_get_edid.
get_edid = Struct(
    "hdr" / ctrl_hdr,
    "scanout" / Int32ul,
    "padding" / Padding(4),
)

resource_assign_uuid = _hdr_resource_id()

resource_create_blob = Struct(
    "hdr" / ctrl_hdr,
    "resource_id" / Int32ul,
    "blob_mem" / Int32ul,
    "blob_flags" / Int32ul,
    "nr_entries" / Int32ul,
    "blob_id" / Int64ul,
    "size" / Int64ul,
)

set_scanout_blob = Struct(
    "hdr" / ctrl_hdr,
    "r" / rect,
    "scanout_id" / Int32ul,
    "resource_id" / Int32ul,
    "width" / Int32ul,
    "height" / Int32ul,
    "format" / Int32ul,
    "padding" / Padding(4),
    "strides" / Array(4, Int32ul),
    "offsets" / Array(4, Int32ul),
)

# --- 3d requests ------------------------------------------------------------------------------------------

ctx_create = Struct(
    "hdr" / ctrl_hdr,
    "nlen" / Int32ul,
    "context_init" / Int32ul,
    "debug_name" / Bytes(64),
)

ctx_destroy = _hdr_only()

# CTX_ATTACH_RESOURCE and CTX_DETACH_RESOURCE share this layout.
ctx_resource = _hdr_resource_id()

resource_create_3d = Struct(
    "hdr" / ctrl_hdr,
    "resource_id" / Int32ul,
    "target" / Int32ul,
    "format" / Int32ul,
    "bind" / Int32ul,
    "width" / Int32ul,
    "height" / Int32ul,
    "depth" / Int32ul,
    "array_size" / Int32ul,
    "last_level" / Int32ul,
    "nr_samples" / Int32ul,
    "flags" / Int32ul,
    "padding" / Padding(4),
)

# TRANSFER_TO_HOST_3D and TRANSFER_FROM_HOST_3D share this layout.
transfer_host_3d = Struct(
    "hdr" / ctrl_hdr,
    "box" / box,
    "offset" / Int64ul,
    "resource_id" / Int32ul,
    "level" / Int32ul,
    "stride" / Int32ul,
    "layer_stride" / Int32ul,
)

cmd_submit = Struct(
    "hdr" / ctrl_hdr,
    "size" / Int32ul,
    "padding" / Padding(4),
)

resource_map_blob = Struct(
    "hdr" / ctrl_hdr,
    "resource_id" / Int32ul,
    "padding" / Padding(4),
    "offset" / Int64ul,
)

resource_unmap_blob = _hdr_resource_id()

# --- cursor queue -----------------------------------------------------------------------------------------

# UPDATE_CURSOR and MOVE_CURSOR share this layout.
update_cursor = Struct(
    "hdr" / ctrl_hdr,
    "pos" / cursor_pos,
    "resource_id" / Int32ul,
    "hot_x" / Int32ul,
    "hot_y" / Int32ul,
    "padding" / Padding(4),
)

# --- responses --------------------------------------------------------------------------------------------

resp_display_info = Struct(
    "hdr" / ctrl_hdr,
    "pmodes" / Array(VIRTIO_GPU_MAX_SCANOUTS, display_one),
)

resp_capset_info = Struct(
    "hdr" / ctrl_hdr,
    "capset_id" / Int32ul,
    "capset_max_version" / Int32ul,
    "capset_max_size" / Int32ul,
    "padding" / Padding(4),
)

# Fixed part only: capset_data[] (capset_max_size bytes) follows the header.
resp_capset = _hdr_only()

resp_edid = Struct(
    "hdr" / ctrl_hdr,
    "size" / Int32ul,
    "padding" / Padding(4),
    "edid" / Bytes(1024),
)

resp_resource_uuid = Struct(
    "hdr" / ctrl_hdr,
    "uuid" / Bytes(16),
)

resp_map_info = Struct(
    "hdr" / ctrl_hdr,
    "map_info" / Int32ul,
    "padding" / Padding(4),
)


# Every struct in this module keyed by its C struct name, for iteration in tools and tests. Two keys have no
# C struct behind them: virtio_gpu_get_display_info (a bare header) and virtio_gpu_config_v1_4 (spec v1.4 only).
ALL: dict[str, Struct] = {
    "virtio_gpu_ctrl_hdr": ctrl_hdr,
    "virtio_gpu_config": config,
    "virtio_gpu_config_v1_4": config_v1_4,
    "virtio_gpu_rect": rect,
    "virtio_gpu_box": box,
    "virtio_gpu_mem_entry": mem_entry,
    "virtio_gpu_cursor_pos": cursor_pos,
    "virtio_gpu_display_one": display_one,
    "virtio_gpu_get_display_info": get_display_info,
    "virtio_gpu_resource_create_2d": resource_create_2d,
    "virtio_gpu_resource_unref": resource_unref,
    "virtio_gpu_set_scanout": set_scanout,
    "virtio_gpu_resource_flush": resource_flush,
    "virtio_gpu_transfer_to_host_2d": transfer_to_host_2d,
    "virtio_gpu_resource_attach_backing": resource_attach_backing,
    "virtio_gpu_resource_detach_backing": resource_detach_backing,
    "virtio_gpu_get_capset_info": get_capset_info,
    "virtio_gpu_get_capset": get_capset,
    "virtio_gpu_cmd_get_edid": get_edid,
    "virtio_gpu_resource_assign_uuid": resource_assign_uuid,
    "virtio_gpu_resource_create_blob": resource_create_blob,
    "virtio_gpu_set_scanout_blob": set_scanout_blob,
    "virtio_gpu_ctx_create": ctx_create,
    "virtio_gpu_ctx_destroy": ctx_destroy,
    "virtio_gpu_ctx_resource": ctx_resource,
    "virtio_gpu_resource_create_3d": resource_create_3d,
    "virtio_gpu_transfer_host_3d": transfer_host_3d,
    "virtio_gpu_cmd_submit": cmd_submit,
    "virtio_gpu_resource_map_blob": resource_map_blob,
    "virtio_gpu_resource_unmap_blob": resource_unmap_blob,
    "virtio_gpu_update_cursor": update_cursor,
    "virtio_gpu_resp_display_info": resp_display_info,
    "virtio_gpu_resp_capset_info": resp_capset_info,
    "virtio_gpu_resp_capset": resp_capset,
    "virtio_gpu_resp_edid": resp_edid,
    "virtio_gpu_resp_resource_uuid": resp_resource_uuid,
    "virtio_gpu_resp_map_info": resp_map_info,
}
