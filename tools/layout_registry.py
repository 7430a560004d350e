"""Which construct struct must match which kernel UAPI struct.

Each layer adds its own entries here. ``ours`` is either the construct object itself or a lazy
``"module:attribute"`` reference; the lazy form keeps one renamed attribute from breaking the whole check (it
shows up as a MISSING row instead). ``field_map`` renames our flattened field names (or single dotted
components) to the C names where the two differ on purpose.

Structs without a C counterpart are deliberately absent: the 20-byte v1.4 ``virtio_gpu_config`` (the Linux
header stops at num_capsets), the cross-domain structs (rutabaga_gfx protocol, not UAPI) and the
vhost-user-only messages. Their sizes are pinned in the unit tests instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from construct import Construct

from vgpu.protocol import structs as gpu


@dataclass(frozen=True)
class LayoutEntry:
    header: str
    c_name: str
    ours: Construct[Any, Any] | str
    field_map: Mapping[str, str] = field(default_factory=dict)

    @property
    def ours_label(self) -> str:
        if isinstance(self.ours, str):
            return self.ours
        return "<construct>"


VIRTIO_GPU_H = "linux/virtio_gpu.h"
VHOST_TYPES_H = "linux/vhost_types.h"
VIRTIO_RING_H = "linux/virtio_ring.h"

_GPU_PAIRS: list[tuple[str, Construct[Any, Any]]] = [
    ("virtio_gpu_ctrl_hdr", gpu.ctrl_hdr),
    ("virtio_gpu_config", gpu.config),
    ("virtio_gpu_rect", gpu.rect),
    ("virtio_gpu_box", gpu.box),
    ("virtio_gpu_mem_entry", gpu.mem_entry),
    ("virtio_gpu_cursor_pos", gpu.cursor_pos),
    ("virtio_gpu_display_one", gpu.display_one),
    ("virtio_gpu_update_cursor", gpu.update_cursor),
    ("virtio_gpu_resource_unref", gpu.resource_unref),
    ("virtio_gpu_resource_create_2d", gpu.resource_create_2d),
    ("virtio_gpu_set_scanout", gpu.set_scanout),
    ("virtio_gpu_resource_flush", gpu.resource_flush),
    ("virtio_gpu_transfer_to_host_2d", gpu.transfer_to_host_2d),
    ("virtio_gpu_resource_attach_backing", gpu.resource_attach_backing),
    ("virtio_gpu_resource_detach_backing", gpu.resource_detach_backing),
    ("virtio_gpu_resp_display_info", gpu.resp_display_info),
    ("virtio_gpu_transfer_host_3d", gpu.transfer_host_3d),
    ("virtio_gpu_resource_create_3d", gpu.resource_create_3d),
    ("virtio_gpu_ctx_create", gpu.ctx_create),
    ("virtio_gpu_ctx_destroy", gpu.ctx_destroy),
    ("virtio_gpu_ctx_resource", gpu.ctx_resource),
    ("virtio_gpu_cmd_submit", gpu.cmd_submit),
    ("virtio_gpu_get_capset_info", gpu.get_capset_info),
    ("virtio_gpu_resp_capset_info", gpu.resp_capset_info),
    ("virtio_gpu_get_capset", gpu.get_capset),
    ("virtio_gpu_resp_capset", gpu.resp_capset),
    ("virtio_gpu_cmd_get_edid", gpu.get_edid),
    ("virtio_gpu_resp_edid", gpu.resp_edid),
    ("virtio_gpu_resource_assign_uuid", gpu.resource_assign_uuid),
    ("virtio_gpu_resp_resource_uuid", gpu.resp_resource_uuid),
    ("virtio_gpu_resource_create_blob", gpu.resource_create_blob),
    ("virtio_gpu_set_scanout_blob", gpu.set_scanout_blob),
    ("virtio_gpu_resource_map_blob", gpu.resource_map_blob),
    ("virtio_gpu_resp_map_info", gpu.resp_map_info),
    ("virtio_gpu_resource_unmap_blob", gpu.resource_unmap_blob),
]

_WIRE = "vgpu.vhost_user.wire"

REGISTRY: list[LayoutEntry] = [LayoutEntry(VIRTIO_GPU_H, c_name, con) for c_name, con in _GPU_PAIRS] + [
    LayoutEntry(VHOST_TYPES_H, "vhost_vring_state", f"{_WIRE}:VringState"),
    LayoutEntry(VHOST_TYPES_H, "vhost_vring_addr", f"{_WIRE}:VringAddr"),
    # The vhost-user region reuses the kernel's 32-byte shape; its 4th word is the mmap offset of the fd.
    LayoutEntry(VHOST_TYPES_H, "vhost_memory_region", f"{_WIRE}:MemoryRegion", {"mmap_offset": "flags_padding"}),
    LayoutEntry(VHOST_TYPES_H, "vhost_iotlb_msg", f"{_WIRE}:IotlbMsg"),
    LayoutEntry(VIRTIO_RING_H, "vring_desc", f"{_WIRE}:VringDesc"),
    # vring_avail / vring_used end in flexible ring[] arrays; only the fixed part has a construct.
    LayoutEntry(VIRTIO_RING_H, "vring_avail", f"{_WIRE}:VringAvailHeader"),
    LayoutEntry(VIRTIO_RING_H, "vring_used", f"{_WIRE}:VringUsedHeader"),
    LayoutEntry(VIRTIO_RING_H, "vring_used_elem", f"{_WIRE}:VringUsedElem"),
]

# C structs of a header that are knowingly not registered, with the reason (checked by the coverage test).
UNREGISTERED_OK: dict[str, str] = {}

# --------------------------------------------------------------------------------------------------------------
# blob layer: the ioctl argument structs of vgpu/blob (dma-buf, udmabuf, dma-heap, DRM)

_REPO = Path(__file__).resolve().parent.parent
_BLOB = "vgpu.blob.uapi"
#: The proposed DMA_BUF_IOCTL_INFO UAPI: never merged, so no installed header has it; ours is in spec/.
DMA_BUF_INFO_H = str(_REPO / "spec" / "dma-buf-info.h")
#: Debian's linux-libc-dev leaves include/uapi/drm out (libdrm-dev ships it). When a system drm.h exists the DRM
#: structs are checked against it; otherwise against the lab's own copy of the DRM ABI, whose static asserts pin
#: the sizes. drm_prime_handle is absent from that copy: without a system drm.h its layout is proven by the real
#: vgem PRIME export in vgpu_lab.exporters_guest (the exported fd is read back from offset 8).
SYSTEM_DRM_H = next((h for h in ("/usr/include/drm/drm.h", "/usr/include/libdrm/drm.h") if Path(h).is_file()), None)
LAB_DRM_UAPI_H = str(_REPO / "tools" / "vgpu_lab" / "guest" / "drm_uapi.h")
DRM_H = SYSTEM_DRM_H or LAB_DRM_UAPI_H

REGISTRY += [
    LayoutEntry("linux/dma-buf.h", "dma_buf_sync", f"{_BLOB}:dma_buf_sync"),
    LayoutEntry(DMA_BUF_INFO_H, "dma_buf_info", f"{_BLOB}:dma_buf_info"),
    LayoutEntry("linux/udmabuf.h", "udmabuf_create", f"{_BLOB}:udmabuf_create"),
    LayoutEntry("linux/udmabuf.h", "udmabuf_create_item", f"{_BLOB}:udmabuf_create_item"),
    LayoutEntry("linux/udmabuf.h", "udmabuf_create_list", f"{_BLOB}:udmabuf_create_list"),
    LayoutEntry("linux/dma-heap.h", "dma_heap_allocation_data", f"{_BLOB}:dma_heap_allocation_data"),
    LayoutEntry(DRM_H, "drm_version", f"{_BLOB}:drm_version"),
    LayoutEntry(DRM_H, "drm_mode_create_dumb", f"{_BLOB}:drm_mode_create_dumb"),
    LayoutEntry(DRM_H, "drm_mode_destroy_dumb", f"{_BLOB}:drm_mode_destroy_dumb"),
]
if SYSTEM_DRM_H is not None:
    REGISTRY.append(LayoutEntry(SYSTEM_DRM_H, "drm_prime_handle", f"{_BLOB}:drm_prime_handle"))

# --------------------------------------------------------------------------------------------------------------
# Xen: the vhost-user Xen region (our C rendering of the spec) and the Xen driver UAPI of vgpu/vhost_user/xen_uapi

VHOST_USER_XEN_H = str(_REPO / "spec" / "vhost-user-xen-region.h")
_REGION = ("guest_phys_addr", "memory_size", "userspace_addr")
REGISTRY.append(LayoutEntry(
    VHOST_USER_XEN_H, "vhost_user_memory_region_xen", f"{_WIRE}:XenMemoryRegion",
    {**{f: f"region.{f}" for f in _REGION}, "mmap_offset": "region.flags_padding"},
))

_XEN = "vgpu.vhost_user.xen_uapi"
#: Checked against the DWARF of the lab's Xen dom0 kernel: ``header`` names the object file (of
#: ``vgpu_lab.kernel_build.XEN_DOM0.dwarf_objects``) whose compilation unit has the struct, as that kernel built it.
#: Debian's linux-libc-dev cannot be compiled for these: its xen/privcmd.h includes xen/interface/xen.h, which
#: it does not ship, and the grant-table hypercall structs are no UAPI at all.
XEN_REGISTRY: list[LayoutEntry] = [
    LayoutEntry("privcmd.o", "privcmd_hypercall", f"{_XEN}:privcmd_hypercall"),
    LayoutEntry("privcmd.o", "privcmd_mmapbatch_v2", f"{_XEN}:privcmd_mmapbatch_v2"),
    LayoutEntry("gntdev.o", "ioctl_gntdev_grant_ref", f"{_XEN}:ioctl_gntdev_grant_ref"),
    LayoutEntry("gntdev.o", "ioctl_gntdev_map_grant_ref", f"{_XEN}:ioctl_gntdev_map_grant_ref"),
    LayoutEntry("gntdev.o", "ioctl_gntdev_unmap_grant_ref", f"{_XEN}:ioctl_gntdev_unmap_grant_ref"),
    LayoutEntry("gntalloc.o", "ioctl_gntalloc_alloc_gref", f"{_XEN}:ioctl_gntalloc_alloc_gref"),
    LayoutEntry("gntalloc.o", "ioctl_gntalloc_dealloc_gref", f"{_XEN}:ioctl_gntalloc_dealloc_gref"),
    LayoutEntry("grant-table.o", "gnttab_setup_table", f"{_XEN}:gnttab_setup_table"),
    LayoutEntry("grant-table.o", "gnttab_query_size", f"{_XEN}:gnttab_query_size"),
    LayoutEntry("grant-table.o", "grant_entry_v1", f"{_XEN}:grant_entry_v1"),
]
