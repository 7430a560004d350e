"""The cross-domain context (capset 5): how ChromeOS-style guests (minigbm, sommelier) get host buffers.

The subset real guests use to allocate: INIT names a query ring (a guest blob attached to the context);
GET_IMAGE_REQUIREMENTS allocates a host buffer for an image and writes its layout, size, blob_id and map_info
into that ring; RESOURCE_CREATE_BLOB(HOST3D, blob_id) then turns the buffer into a resource.  Channels (Wayland,
camera, ...) need a host compositor socket and are refused clearly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..blob.types import HostBuffer
from ..protocol import Capset, CommandError, CtrlType
from ..protocol.cross_domain import (
    CrossDomainCapabilities,
    CrossDomainChannel,
    CrossDomainCmd,
    CrossDomainGetImageRequirements,
    CrossDomainHeader,
    CrossDomainImageRequirements,
    CrossDomainInit,
    CrossDomainInitLegacy,
    CrossDomainInitV1,
)
from ..vhost_user.layout import flatten
from .contexts import Context, ContextServices

log = logging.getLogger("vgpu.gpu.cross_domain")

_INVALID = CtrlType.RESP_ERR_INVALID_PARAMETER
HEADER_SIZE: Final = CrossDomainHeader.sizeof()
# struct forms of the layouts every blob allocation reads and writes, derived from their construct definitions.
_HEADER: Final = flatten(CrossDomainHeader).st
_GET_IMAGE_REQUIREMENTS: Final = flatten(CrossDomainGetImageRequirements).st
_IMAGE_REQUIREMENTS: Final = flatten(CrossDomainImageRequirements).st
# INIT's three forms by size (construct's sizeof walks the layout each time it is asked).
_INIT_FORMS: Final = {form.sizeof(): form for form in (CrossDomainInit, CrossDomainInitV1, CrossDomainInitLegacy)}
PAGE: Final = 4096
STRIDE_ALIGN: Final = 64  # what dma-buf importers (scanout, media) commonly need; guests use the stride we return
MAX_DIMENSION: Final = 16384
CAPSET_MAX_VERSION: Final = 0
CAPSET_VERSION: Final = 1


# How the device turns a buffer into the map_info a guest client is told up front (0 when it cannot say).
MapInfoOf = Callable[[HostBuffer], int]


def _fourcc(code: str) -> int:
    return int.from_bytes(code.encode(), "little")


# Bytes per pixel of single-plane formats we can lay out.
_BPP: Final[dict[int, int]] = {
    **{_fourcc(c): 4 for c in ("AR24", "XR24", "AB24", "XB24", "RA24", "RX24", "BA24", "BX24", "AR30", "XR30",
                               "AB30", "XB30")},
    **{_fourcc(c): 2 for c in ("RG16", "BG16", "GR88")},
    _fourcc("R8  "): 1,
}
NV12: Final = _fourcc("NV12")


def capabilities(supports_dmabuf: bool) -> bytes:
    """The capset: version 1, no channel types (we forward none), dma-buf support from the allocator."""
    return bytes(CrossDomainCapabilities.build(dict(version=CAPSET_VERSION, supported_channels=0,
                                                    supports_dmabuf=int(supports_dmabuf),
                                                    supports_external_gpu_memory=0)))


@dataclass(frozen=True)
class Layout:
    strides: tuple[int, int, int, int]
    offsets: tuple[int, int, int, int]
    size: int


def image_layout(width: int, height: int, fourcc: int) -> Layout:
    if not (0 < width <= MAX_DIMENSION and 0 < height <= MAX_DIMENSION):
        raise CommandError(_INVALID, f"image {width}x{height} outside 1..{MAX_DIMENSION}")
    align = STRIDE_ALIGN
    if fourcc == NV12:
        stride = (width + align - 1) // align * align
        luma = stride * height
        size = luma + stride * ((height + 1) // 2)
        return Layout((stride, stride, 0, 0), (0, luma, 0, 0), (size + PAGE - 1) // PAGE * PAGE)
    bpp = _BPP.get(fourcc)
    if bpp is None:
        raise CommandError(_INVALID, f"DRM format {fourcc.to_bytes(4, 'little')!r} is not supported")
    stride = (width * bpp + align - 1) // align * align
    return Layout((stride, 0, 0, 0), (0, 0, 0, 0), (stride * height + PAGE - 1) // PAGE * PAGE)


@dataclass
class PendingBlob:
    buffer: HostBuffer
    layout: Layout


class CrossDomainContext(Context):
    capset_id = Capset.CAPSET_CROSS_DOMAIN

    def __init__(self, ctx_id: int, services: ContextServices, map_info_of: MapInfoOf) -> None:
        super().__init__(ctx_id, services)
        self.map_info_of = map_info_of
        self.query_ring: int | None = None
        self._next_blob = 0
        self._pending: dict[int, PendingBlob] = {}

    def submit(self, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            if len(data) - pos < HEADER_SIZE:
                raise CommandError(_INVALID, f"{len(data) - pos} trailing bytes are not a command")
            cmd, _, size = _HEADER.unpack_from(data, pos)
            # A zero or overlong size would loop or read past the stream: refuse it.
            if size < HEADER_SIZE or pos + size > len(data):
                raise CommandError(_INVALID, f"cross-domain command {cmd} with cmd_size {size}")
            body = data[pos:pos + size]
            if cmd == CrossDomainCmd.CROSS_DOMAIN_CMD_INIT:
                self._init(body)
            elif cmd == CrossDomainCmd.CROSS_DOMAIN_CMD_GET_IMAGE_REQUIREMENTS:
                self._image_requirements(body)
            else:
                raise CommandError(_INVALID, f"cross-domain command {cmd} is not supported")
            pos += size

    def _init(self, body: bytes) -> None:
        form = _INIT_FORMS.get(len(body))
        if form is None:
            raise CommandError(_INVALID, f"INIT of {len(body)} bytes (16, 20 or 36 expected)")
        msg = form.parse(body)
        if msg.channel_type != 0:
            try:
                kind = CrossDomainChannel(msg.channel_type).name
            except ValueError:
                kind = f"{msg.channel_type} (unknown)"
            raise CommandError(_INVALID, f"channel type {kind}: vgpu forwards no channels")
        if msg.query_ring_id not in self.attached:
            raise CommandError(CtrlType.RESP_ERR_INVALID_RESOURCE_ID,
                               f"query ring {msg.query_ring_id} is not attached to context {self.id}")
        self.query_ring = msg.query_ring_id

    def _image_requirements(self, body: bytes) -> None:
        if len(body) != _GET_IMAGE_REQUIREMENTS.size:
            raise CommandError(_INVALID, f"GET_IMAGE_REQUIREMENTS of {len(body)} bytes")
        if self.query_ring is None:
            raise CommandError(_INVALID, "GET_IMAGE_REQUIREMENTS before INIT")
        if self.query_ring not in self.attached:
            raise CommandError(CtrlType.RESP_ERR_INVALID_RESOURCE_ID, "the query ring was detached")
        width, height, drm_format, _flags = _GET_IMAGE_REQUIREMENTS.unpack(body)[3:]
        layout = image_layout(width, height, drm_format)
        buffer = self.services.allocate(layout.size)
        self._next_blob += 1
        blob_id = self._next_blob
        answer = _IMAGE_REQUIREMENTS.pack(*layout.strides, *layout.offsets, 0, layout.size, blob_id,
                                          self.map_info_of(buffer), -1, -1)
        try:
            self.services.write_resource(self.query_ring, 0, answer)
        except BaseException:
            self.services.release(buffer)
            raise
        self._pending[blob_id] = PendingBlob(buffer, layout)
        if log.isEnabledFor(logging.INFO):
            log.info("context %d: blob %d %dx%d %s, %d bytes from %s", self.id, blob_id, width, height,
                     drm_format.to_bytes(4, "little").decode(errors="replace"), layout.size, buffer.allocator)

    def take_blob(self, blob_id: int, size: int) -> HostBuffer:
        pending = self._pending.get(blob_id)
        if pending is None:
            raise CommandError(_INVALID, f"context {self.id} never produced blob {blob_id}")
        if size != pending.layout.size:
            raise CommandError(_INVALID, f"blob {blob_id} is {pending.layout.size} bytes, not {size}")
        del self._pending[blob_id]
        return pending.buffer

    def pending(self) -> list[HostBuffer]:
        return [p.buffer for p in self._pending.values()]

    def close(self) -> None:
        for pending in self._pending.values():
            self.services.release(pending.buffer)
        self._pending.clear()

