"""construct layouts and ioctl numbers of every kernel struct the blob layer hands to ``ioctl(2)``.

Why one module: an ioctl's command number encodes the size of its argument, so a wrong layout does not merely
misread a field — it asks the kernel a different question (usually answered ENOTTY). Keeping the layouts in one
place lets ``tools/layoutcheck.py`` compare each of them with the kernel's C struct through DWARF, and the ioctl
numbers below are *computed* from these same layouts with the kernel's ``_IOC`` encoding, so they cannot drift
apart. Names follow the C structs; constants are named exactly as the UAPI headers name them.

Sources: ``linux/dma-buf.h`` (dma_buf_sync), ``spec/dma-buf-info.h`` (the proposed dma_buf_info),
``linux/udmabuf.h``, ``linux/dma-heap.h``, and ``drm/drm.h`` / ``drm/drm_mode.h`` for the DRM structs (absent
from this host's linux-libc-dev; checked against ``tools/vgpu_lab/guest/drm_uapi.h`` and, for drm_prime_handle, by the
real vgem export in the guest test). All layouts are x86-64 native (little-endian, 8-byte pointers).
"""

from __future__ import annotations

import os
from typing import Any

from construct import Construct, Default, Int32sl, Int32ul, Int64ul, Padding, Struct

# ---------------------------------------------------------------------------------------------------------------
# _IOC encoding (include/uapi/asm-generic/ioctl.h; x86 uses the generic one)

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit _IOC_SIZEBITS")
    return (
        (direction << _IOC_DIRSHIFT) | (ord(kind) << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)
    )


def _IOW(kind: str, nr: int, struct: Construct[Any, Any]) -> int:  # the kernel's macro name
    return _ioc(_IOC_WRITE, kind, nr, struct.sizeof())


def _IOWR(kind: str, nr: int, struct: Construct[Any, Any]) -> int:  # the kernel's macro name
    return _ioc(_IOC_READ | _IOC_WRITE, kind, nr, struct.sizeof())


# ---------------------------------------------------------------------------------------------------------------
# dma-buf (linux/dma-buf.h) and the proposed DMA_BUF_IOCTL_INFO (spec/dma-buf-info.h)

DMA_BUF_BASE = "b"

dma_buf_sync = Struct("flags" / Int64ul)

DMA_BUF_SYNC_READ = 1 << 0
DMA_BUF_SYNC_WRITE = 2 << 0
DMA_BUF_SYNC_RW = DMA_BUF_SYNC_READ | DMA_BUF_SYNC_WRITE
DMA_BUF_SYNC_START = 0 << 2
DMA_BUF_SYNC_END = 1 << 2

#: The proposal's struct, unchanged through every revision: 16 bytes, ``pad`` must be zero, ``value`` written by the
#: kernel.
dma_buf_info = Struct(
    "param" / Int32ul,
    "pad" / Default(Int32ul, 0),
    "value" / Int64ul,
)

# Revisions of the question (spec/dma-buf-info.h says why they must never be confused). v1 (2022-07-29) and v2
# (2022-08-15) both asked with param 1 and numbered the answer differently: v1 WC 0, CACHED 1; v2 INCOHERENT 0,
# COHERENT_WC 1, COHERENT_CACHED 2. vgpu never asks param 1: a value answered to it cannot be told apart.
DMA_BUF_INFO_VM_PROT = 1
# Revision 3 (ours): param 2, the answer tagged with the revision in bits 63:56, the attribute in bits 7:0 (numbered
# as virtio-gpu's map_info), flags in bits 15:8.
DMA_BUF_INFO_MAP_ATTR = 2
DMA_BUF_MAP_REVISION = 3
DMA_BUF_MAP_REVISION_SHIFT = 56
DMA_BUF_MAP_ATTR_MASK = 0xFF
DMA_BUF_MAP_CACHED = 1
DMA_BUF_MAP_UNCACHED = 2
DMA_BUF_MAP_WC = 3
DMA_BUF_MAP_FIXED = 1 << 8
DMA_BUF_MAP_NEEDS_SYNC = 1 << 9
DMA_BUF_MAP_FLAGS = DMA_BUF_MAP_FIXED | DMA_BUF_MAP_NEEDS_SYNC

DMA_BUF_IOCTL_SYNC = _IOW(DMA_BUF_BASE, 0, dma_buf_sync)
#: 0xc0106202; mainline's EXPORT_SYNC_FILE shares nr 2 with an 8-byte struct (0xc0086202), so no clash.
DMA_BUF_IOCTL_INFO = _IOWR(DMA_BUF_BASE, 2, dma_buf_info)

# ---------------------------------------------------------------------------------------------------------------
# udmabuf (linux/udmabuf.h)

udmabuf_create = Struct(
    "memfd" / Int32ul,
    "flags" / Int32ul,
    "offset" / Int64ul,
    "size" / Int64ul,
)

UDMABUF_FLAGS_CLOEXEC = 0x01
UDMABUF_CREATE = _IOW("u", 0x42, udmabuf_create)

udmabuf_create_item = Struct(
    "memfd" / Int32ul,
    "pad" / Padding(4),
    "offset" / Int64ul,
    "size" / Int64ul,
)
# The fixed head; `count` items follow (a flexible array member, so the ioctl number encodes only the head).
udmabuf_create_list = Struct("flags" / Int32ul, "count" / Int32ul)
UDMABUF_CREATE_LIST = _IOW("u", 0x43, udmabuf_create_list)
# The kernel's list_limit module parameter default: more items than this get EINVAL.
UDMABUF_LIST_LIMIT = 1024

# ---------------------------------------------------------------------------------------------------------------
# dma-heap (linux/dma-heap.h)

dma_heap_allocation_data = Struct(
    "len" / Int64ul,
    "fd" / Int32ul,
    "fd_flags" / Int32ul,
    "heap_flags" / Int64ul,
)

#: The heap accepts only these fd flags (DMA_HEAP_VALID_FD_FLAGS = O_CLOEXEC | O_ACCMODE).
DMA_HEAP_VALID_FD_FLAGS = os.O_CLOEXEC | os.O_ACCMODE
DMA_HEAP_IOCTL_ALLOC = _IOWR("H", 0x0, dma_heap_allocation_data)

# ---------------------------------------------------------------------------------------------------------------
# DRM (drm/drm.h, drm/drm_mode.h)

DRM_IOCTL_BASE = "d"

#: The three ``char *`` are user pointers the kernel copies the strings to (at most ``*_len`` bytes each).
drm_version = Struct(
    "version_major" / Int32sl,
    "version_minor" / Int32sl,
    "version_patchlevel" / Int32sl,
    Padding(4),
    "name_len" / Int64ul,
    "name" / Int64ul,
    "date_len" / Int64ul,
    "date" / Int64ul,
    "desc_len" / Int64ul,
    "desc" / Int64ul,
)

drm_mode_create_dumb = Struct(
    "height" / Int32ul,
    "width" / Int32ul,
    "bpp" / Int32ul,
    "flags" / Int32ul,
    "handle" / Int32ul,
    "pitch" / Int32ul,
    "size" / Int64ul,
)

drm_mode_destroy_dumb = Struct("handle" / Int32ul)

drm_prime_handle = Struct(
    "handle" / Int32ul,
    "flags" / Int32ul,
    "fd" / Int32sl,
)

DRM_CLOEXEC = os.O_CLOEXEC
DRM_RDWR = os.O_RDWR

DRM_IOCTL_VERSION = _IOWR(DRM_IOCTL_BASE, 0x00, drm_version)
DRM_IOCTL_PRIME_HANDLE_TO_FD = _IOWR(DRM_IOCTL_BASE, 0x2D, drm_prime_handle)
DRM_IOCTL_MODE_CREATE_DUMB = _IOWR(DRM_IOCTL_BASE, 0xB2, drm_mode_create_dumb)
DRM_IOCTL_MODE_DESTROY_DUMB = _IOWR(DRM_IOCTL_BASE, 0xB4, drm_mode_destroy_dumb)

#: Every ioctl number this layer issues, by its UAPI name (the tests compare them with the C macros).
IOCTLS: dict[str, int] = {
    "DMA_BUF_IOCTL_SYNC": DMA_BUF_IOCTL_SYNC,
    "DMA_BUF_IOCTL_INFO": DMA_BUF_IOCTL_INFO,
    "UDMABUF_CREATE": UDMABUF_CREATE,
    "DMA_HEAP_IOCTL_ALLOC": DMA_HEAP_IOCTL_ALLOC,
    "DRM_IOCTL_VERSION": DRM_IOCTL_VERSION,
    "DRM_IOCTL_PRIME_HANDLE_TO_FD": DRM_IOCTL_PRIME_HANDLE_TO_FD,
    "DRM_IOCTL_MODE_CREATE_DUMB": DRM_IOCTL_MODE_CREATE_DUMB,
    "DRM_IOCTL_MODE_DESTROY_DUMB": DRM_IOCTL_MODE_DESTROY_DUMB,
}
