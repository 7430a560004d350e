"""Reading and writing a host buffer's bytes from the back end itself (scanout copies, blob transfers).

Through a mapping, because a dma-buf has no read()/write(); a dma-buf's CPU access is bracketed with
DMA_BUF_IOCTL_SYNC so the exporter can flush or invalidate caches around it.
"""

from __future__ import annotations

import contextlib
import mmap

from .dmabuf import cpu_access
from .types import HostBuffer


def write_host(buffer: HostBuffer, start: int, data: bytes | memoryview) -> None:
    """Write into a host buffer through a mapping (bracketed CPU access for a dma-buf)."""
    if start < 0 or start + len(data) > buffer.size:
        raise ValueError(f"range [{start}, +{len(data)}) is past the {buffer.size}-byte buffer")
    with contextlib.ExitStack() as stack:
        if buffer.is_dmabuf:
            stack.enter_context(cpu_access(buffer.fd, read=False, write=True))
        mm = stack.enter_context(mmap.mmap(buffer.fd, buffer.size, mmap.MAP_SHARED))
        mm[start:start + len(data)] = data


def read_host(buffer: HostBuffer, start: int, n: int) -> bytes:
    """Bytes of a host buffer, read through a mapping (a dma-buf has no read(); its CPU access is bracketed)."""
    if start < 0 or start + n > buffer.size:
        raise ValueError(f"range [{start}, +{n}) is past the {buffer.size}-byte buffer")
    with contextlib.ExitStack() as stack:
        if buffer.is_dmabuf:
            stack.enter_context(cpu_access(buffer.fd, read=True))
        mm = stack.enter_context(mmap.mmap(buffer.fd, buffer.size, mmap.MAP_SHARED, mmap.PROT_READ))
        return mm[start:start + n]
