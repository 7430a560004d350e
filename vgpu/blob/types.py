"""The vocabulary shared by allocators, the dma-buf layer, the cache-attribute resolver and the device.

A host buffer is a file descriptor the VMM can mmap into the guest's host-visible window.  What the guest must be
told (`map_info`) is how the *host's* mapping of that fd is cached; every answer carries where it came from.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self


class CacheAttr(enum.IntEnum):
    """The cache attribute of a mapping, numbered as virtio-gpu's map_info (VIRTIO_GPU_MAP_CACHE_*)."""

    CACHED = 1
    UNCACHED = 2
    WC = 3


class Provenance(enum.Enum):
    """Why a buffer was given the attribute it has. The resolver consults the kernel, then an operator override,
    then the allocator, then operator rules, then (opted in) the heuristic: see :mod:`vgpu.blob.resolve`."""

    KERNEL = "kernel"  # the exporter answered DMA_BUF_IOCTL_INFO
    ALLOCATOR = "allocator"  # the allocator knows how its buffers are mapped (with the kernel fact behind it)
    OPERATOR = "operator rule"  # an override of an allocator, or a rule for an exporter or DRM driver name
    HEURISTIC = "legacy heuristic"  # virglrenderer's driver-name guess, only when explicitly enabled


@dataclass(frozen=True)
class Resolution:
    attr: CacheAttr
    provenance: Provenance
    detail: str  # e.g. "DMA_BUF_IOCTL_INFO: WC+fixed (for the buffer's life)" or "rule drm=wc in /etc/vgpu/cache.toml"

    def __str__(self) -> str:
        return f"{self.attr.name} ({self.provenance.value}: {self.detail})"


class Unresolved(Exception):
    """No source the resolver trusts could say how the buffer is cached: the buffer must not be mapped."""


@dataclass(eq=False)
class HostBuffer:
    """A host buffer and the one fd that owns it.  `exporter` is the dma-buf exp_name (None for a memfd)."""

    fd: int
    size: int
    allocator: str
    exporter: str | None = None
    # What the allocator knows about how mappings of its buffers are cached, if anything (with the reason).
    allocator_attr: CacheAttr | None = None
    allocator_reason: str = ""
    resolution: Resolution | None = field(default=None)
    # The DRM driver (DRM_IOCTL_VERSION name) behind a PRIME export, recorded by the allocator that exported it:
    # every PRIME export's exp_name is "drm", so this is the only way an operator rule can tell vgem from i915.
    drm_driver: str | None = None

    @property
    def is_dmabuf(self) -> bool:
        return self.exporter is not None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FdOwner:
    """Owns at most one fd (``_owned``, -1 when none): closed exactly once, by ``close()`` or at the end of a
    ``with`` block. Shared by dma-buf handles and allocators so each closes its fd the same way."""

    _owned: int = -1

    def close(self) -> None:
        if self._owned >= 0:
            fd, self._owned = self._owned, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Allocator(Protocol):
    """Makes host buffers of at least `size` bytes (page-rounded)."""

    name: str

    def allocate(self, size: int) -> HostBuffer: ...

    def close(self) -> None: ...


class CacheResolver(Protocol):
    """Decides the cache attribute of a buffer, or raises Unresolved."""

    def resolve(self, buffer: HostBuffer) -> Resolution: ...
