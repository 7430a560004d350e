"""dma-bufs over the guest's own memory: a guest blob handed to the VMM's display without a copy.

A guest blob's pixels live in guest RAM, which the VMM shares with us as memfds.  Where the kernel has udmabuf,
UDMABUF_CREATE_LIST turns the blob's pages into one dma-buf the display can import.  udmabuf insists on a memfd
sealed against shrinking (QEMU's memfd backend seals by default) and on page-aligned ranges; when any of that does
not hold we say why and the caller falls back to copying pixels.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Sequence

from . import uapi
from .allocators import UDMABUF_DEVICE, AllocationError, UdmabufAllocator, page_round
from .types import CacheAttr, HostBuffer

PAGE = 4096
ALLOCATOR = "guest-memory"
REASON = "udmabuf over guest RAM: the memfd's shmem pages, faulted in with the default pgprot (write-back)"


def coalesce(ranges: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Merge (memfd, offset, size) ranges that continue one another: fewer items for the kernel's list limit."""
    out: list[tuple[int, int, int]] = []
    for fd, off, size in ranges:
        if out and out[-1][0] == fd and out[-1][1] + out[-1][2] == off:
            out[-1] = (fd, out[-1][1], out[-1][2] + size)
        else:
            out.append((fd, off, size))
    return out


def guest_dmabuf(ranges: Sequence[tuple[int, int, int]]) -> HostBuffer:
    """One udmabuf over `ranges` of guest memory; AllocationError says why it cannot be made."""
    state = UdmabufAllocator.available()
    if not state:
        raise AllocationError(state.reason)
    items = coalesce(ranges)
    if not items:
        raise AllocationError("no guest memory to export")
    if len(items) > uapi.UDMABUF_LIST_LIMIT:
        raise AllocationError(f"{len(items)} ranges exceed udmabuf's list limit of {uapi.UDMABUF_LIST_LIMIT}")
    if any(off % PAGE or size % PAGE for _, off, size in items):
        raise AllocationError("guest ranges are not page aligned")
    arg = bytearray(uapi.udmabuf_create_list.build({"flags": uapi.UDMABUF_FLAGS_CLOEXEC, "count": len(items)}))
    for fd, off, size in items:
        arg += uapi.udmabuf_create_item.build({"memfd": fd, "offset": off, "size": size})
    device = os.open(UDMABUF_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fd = fcntl.ioctl(device, uapi.UDMABUF_CREATE_LIST, arg, True)
    except OSError as e:
        # EINVAL most often means a memfd without F_SEAL_SHRINK (or with F_SEAL_WRITE).
        raise AllocationError(f"UDMABUF_CREATE_LIST of {len(items)} ranges: {e.strerror}") from e
    finally:
        os.close(device)
    size = sum(s for _, _, s in items)
    return HostBuffer(fd, page_round(size), ALLOCATOR, exporter="udmabuf", allocator_attr=CacheAttr.CACHED,
                      allocator_reason=REASON)
