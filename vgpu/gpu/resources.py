"""Resources the guest names by id: 2D images held on the host, and guest blobs that live in guest memory.

Every limit is checked before anything is allocated, so a guest past its quota gets ERR_OUT_OF_MEMORY and the host
keeps nothing of the attempt.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..blob.types import HostBuffer
from ..protocol import CommandError, CtrlType
from .backing import Backing
from .formats import BPP

if TYPE_CHECKING:
    import numpy.typing as npt


@dataclass(frozen=True)
class Limits:
    max_resources: int = 16384
    max_host_bytes: int = 1 << 30
    max_backing_entries: int = 16384
    max_contexts: int = 64


@dataclass(eq=False)
class Resource:
    id: int
    # For a 2D resource: its image.  For a guest blob: None (the pixels are in guest memory).
    width: int = 0
    height: int = 0
    format: int = 0
    pixels: npt.NDArray[np.uint8] | None = None
    blob_size: int = 0
    blob_mem: int = 0
    blob_flags: int = 0
    backing: Backing | None = None
    # A host blob's buffer (HOST3D): owned by the resource from RESOURCE_CREATE_BLOB until UNREF.
    host_buffer: HostBuffer | None = None
    # A guest blob exported as a dma-buf over its own guest pages, made when a display can take it (owned here).
    guest_dmabuf: HostBuffer | None = None
    uuid: uuid.UUID | None = None
    host_bytes: int = 0
    scanouts: set[int] = field(default_factory=set)

    @property
    def is_blob(self) -> bool:
        return self.blob_mem != 0

    def drop_guest_dmabuf(self) -> None:
        if self.guest_dmabuf is not None:
            self.guest_dmabuf.close()
            self.guest_dmabuf = None

    @property
    def stride(self) -> int:
        return self.width * BPP


class ResourceTable:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._by_id: dict[int, Resource] = {}
        self.host_bytes = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Resource]:
        return iter(list(self._by_id.values()))

    def get(self, rid: int) -> Resource:
        res = self._by_id.get(rid)
        if res is None:
            raise CommandError(CtrlType.RESP_ERR_INVALID_RESOURCE_ID, f"no resource {rid}")
        return res

    def check_new_id(self, rid: int) -> None:
        if rid == 0:
            raise CommandError(CtrlType.RESP_ERR_INVALID_RESOURCE_ID, "resource id 0 is reserved")
        if rid in self._by_id:
            raise CommandError(CtrlType.RESP_ERR_INVALID_RESOURCE_ID, f"resource {rid} already exists")
        if len(self._by_id) >= self.limits.max_resources:
            raise CommandError(CtrlType.RESP_ERR_OUT_OF_MEMORY,
                               f"resource limit {self.limits.max_resources} reached")

    def reserve(self, nbytes: int) -> None:
        """Count `nbytes` of host memory against the guest's quota, or refuse before anything is allocated."""
        if self.host_bytes + nbytes > self.limits.max_host_bytes:
            raise CommandError(CtrlType.RESP_ERR_OUT_OF_MEMORY,
                               f"{nbytes} more host bytes would pass the quota of {self.limits.max_host_bytes}")
        self.host_bytes += nbytes

    def unreserve(self, nbytes: int) -> None:
        self.host_bytes -= nbytes

    def create_2d(self, rid: int, fmt: int, width: int, height: int) -> Resource:
        self.check_new_id(rid)
        if width == 0 or height == 0:
            raise CommandError(CtrlType.RESP_ERR_INVALID_PARAMETER, f"{width}x{height} resource")
        nbytes = width * height * BPP
        self.reserve(nbytes)
        try:
            pixels = np.zeros((height, width * BPP), dtype=np.uint8)
        except MemoryError:
            self.unreserve(nbytes)
            raise CommandError(CtrlType.RESP_ERR_OUT_OF_MEMORY, f"cannot allocate {nbytes} bytes") from None
        res = Resource(rid, width, height, fmt, pixels, host_bytes=nbytes)
        self._by_id[rid] = res
        return res

    def add_host_blob(self, rid: int, blob_mem: int, flags: int, buffer: HostBuffer) -> Resource:
        """A host blob whose buffer was already counted against the quota when its context allocated it."""
        res = Resource(rid, blob_size=buffer.size, blob_mem=blob_mem, blob_flags=flags, host_buffer=buffer,
                       host_bytes=buffer.size)
        self._by_id[rid] = res
        return res

    def create_guest_blob(self, rid: int, blob_mem: int, flags: int, size: int, backing: Backing | None) -> Resource:
        self.check_new_id(rid)
        res = Resource(rid, blob_size=size, blob_mem=blob_mem, blob_flags=flags, backing=backing)
        self._by_id[rid] = res
        return res

    def remove(self, res: Resource) -> None:
        del self._by_id[res.id]
        self.unreserve(res.host_bytes)
        res.pixels = None
        if res.backing is not None:
            res.backing.close()
        res.backing = None
        res.drop_guest_dmabuf()
        if res.host_buffer is not None:
            res.host_buffer.close()
            res.host_buffer = None

    def clear(self) -> None:
        for res in list(self._by_id.values()):
            self.remove(res)
