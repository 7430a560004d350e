"""Contexts, host blobs and the host-visible window of one connection: the commands that make blobs.

The sequence a guest follows: CTX_CREATE with a context type; SUBMIT_3D to get a `blob_id`;
RESOURCE_CREATE_BLOB(HOST3D, blob_id); RESOURCE_MAP_BLOB(offset) — resolved cache attribute, SHMEM_MAP of the
buffer's fd into region 1 at `offset`, RESP_OK_MAP_INFO; UNMAP/UNREF/disconnect undo exactly that.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from ..blob.allocators import AllocationError
from ..blob.bufferio import read_host, write_host
from ..blob.types import Allocator, CacheResolver, HostBuffer, Resolution, Unresolved
from ..protocol import (
    VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK,
    BlobFlag,
    BlobMem,
    CommandError,
    CtrlType,
    CtxAttachResource,
    CtxCreate,
    CtxDestroy,
    CtxDetachResource,
    GetCapset,
    GetCapsetInfo,
    MemEntries,
    ResourceCreateBlob,
    ResourceMapBlob,
    ResourceUnmapBlob,
    ShmId,
    SubmitCmd,
    TransferFromHost3D,
    TransferToHost3D,
    responses,
)
from ..vhost_user.device import BackendChannelError, Transport
from ..vhost_user.wire import MMAP_FLAG_READ_WRITE, BackendRequest, ProtocolFeature, bit, build_mmap_request
from .backing import Backing, BackingError
from .contexts import Context, ContextServices
from .cross_domain import CAPSET_MAX_VERSION, CrossDomainContext, capabilities
from .hostmem import HostVisibleRegion, RegionError
from .resources import Resource, ResourceTable

log = logging.getLogger("vgpu.gpu.blobs")

_INVALID = CtrlType.RESP_ERR_INVALID_PARAMETER
_BAD_CTX = CtrlType.RESP_ERR_INVALID_CONTEXT_ID
SHMID_HOST_VISIBLE: Final = int(ShmId.SHM_ID_HOST_VISIBLE)
KNOWN_FLAGS: Final = int(BlobFlag.BLOB_FLAG_USE_MAPPABLE | BlobFlag.BLOB_FLAG_USE_SHAREABLE
                         | BlobFlag.BLOB_FLAG_USE_CROSS_DEVICE)
CONTEXT_TYPES: Final = {"cross-domain": CrossDomainContext.capset_id}


class BlobEngine:
    def __init__(self, resources: ResourceTable, context_types: tuple[int, ...], region_size: int,
                 allocator: Allocator | None, resolver: CacheResolver | None, max_contexts: int,
                 map_timeout: float, transport: Callable[[], Transport]) -> None:
        self.resources = resources
        self.context_types = context_types
        self.region = HostVisibleRegion(region_size)
        self.allocator = allocator
        self.resolver = resolver
        self.max_contexts = max_contexts
        self.map_timeout = map_timeout
        self._transport = transport
        self.contexts: dict[int, Context] = {}

    @property
    def host_visible(self) -> bool:
        """Region 1 exists only when the front end negotiated SHMEM (and we asked for a non-empty region)."""
        return self.region.size > 0 and bool(self._transport().protocol_features & bit(ProtocolFeature.SHMEM))

    # --- capsets ----------------------------------------------------------------------------------------------

    def capset_info(self, cmd: GetCapsetInfo) -> bytes:
        if cmd.capset_index >= len(self.context_types):
            raise CommandError(_INVALID, f"capset index {cmd.capset_index} >= {len(self.context_types)}")
        capset_id = self.context_types[cmd.capset_index]
        return responses.capset_info(cmd.hdr, capset_id, CAPSET_MAX_VERSION, len(self._capset_data()))

    def capset(self, cmd: GetCapset) -> bytes:
        if cmd.capset_id not in self.context_types or cmd.capset_version > CAPSET_MAX_VERSION:
            raise CommandError(_INVALID, f"no capset {cmd.capset_id} version {cmd.capset_version}")
        return responses.capset(cmd.hdr, self._capset_data())

    def _capset_data(self) -> bytes:
        return capabilities(supports_dmabuf=self.allocator is not None and self.allocator.name != "memfd")

    # --- contexts ---------------------------------------------------------------------------------------------

    def _context(self, ctx_id: int) -> Context:
        ctx = self.contexts.get(ctx_id)
        if ctx is None:
            raise CommandError(_BAD_CTX, f"no context {ctx_id}")
        return ctx

    def ctx_create(self, cmd: CtxCreate) -> None:
        ctx_id = cmd.hdr.ctx_id
        if ctx_id == 0 or ctx_id in self.contexts:
            raise CommandError(_BAD_CTX, f"context id {ctx_id} is reserved or in use")
        capset = cmd.context_init & VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK
        if capset == 0 and len(self.context_types) == 1:
            capset = self.context_types[0]  # "the device picks": we have exactly one kind
        if capset not in self.context_types:
            raise CommandError(_INVALID, f"context type {capset} is not offered")
        if len(self.contexts) >= self.max_contexts:
            raise CommandError(CtrlType.RESP_ERR_OUT_OF_MEMORY, f"context limit {self.max_contexts} reached")
        services = ContextServices(self._allocate, self._release, self._write_resource)
        self.contexts[ctx_id] = CrossDomainContext(ctx_id, services, self._map_info_of)

    def ctx_destroy(self, cmd: CtxDestroy) -> None:
        ctx = self._context(cmd.hdr.ctx_id)
        ctx.close()
        del self.contexts[ctx.id]

    def ctx_attach(self, cmd: CtxAttachResource) -> None:
        ctx = self._context(cmd.hdr.ctx_id)
        self.resources.get(cmd.resource_id)
        ctx.attached.add(cmd.resource_id)

    def ctx_detach(self, cmd: CtxDetachResource) -> None:
        ctx = self._context(cmd.hdr.ctx_id)
        self.resources.get(cmd.resource_id)
        ctx.attached.discard(cmd.resource_id)

    def submit(self, cmd: SubmitCmd) -> None:
        self._context(cmd.hdr.ctx_id).submit(bytes(cmd.data))

    def forget_resource(self, rid: int) -> None:
        for ctx in self.contexts.values():
            ctx.attached.discard(rid)

    # --- services for contexts --------------------------------------------------------------------------------

    def _allocate(self, size: int) -> HostBuffer:
        if self.allocator is None:
            raise CommandError(CtrlType.RESP_ERR_UNSPEC, "no host buffer allocator is configured")
        self.resources.reserve(size)
        try:
            buffer = self.allocator.allocate(size)
        except (OSError, AllocationError) as e:
            self.resources.unreserve(size)
            raise CommandError(CtrlType.RESP_ERR_OUT_OF_MEMORY, f"{self.allocator.name}: {e}") from e
        return buffer

    def _release(self, buffer: HostBuffer) -> None:
        self.resources.unreserve(buffer.size)
        buffer.close()

    def _write_resource(self, rid: int, offset: int, data: bytes) -> None:
        res = self.resources.get(rid)
        if res.backing is None:
            raise CommandError(_INVALID, f"resource {rid} has no guest memory to write to")
        try:
            res.backing.scatter(self._transport().memory, offset, data)
        except BackingError as e:
            raise CommandError(_INVALID, f"resource {rid}: {e}") from e

    def _resolve(self, buffer: HostBuffer) -> Resolution:
        """Ask afresh every time, never reusing ``buffer.resolution``: an exporter may have moved the buffer since
        (the image requirements' map_info, an earlier MAP_BLOB), and only the answer of now may be mapped."""
        if self.resolver is None:
            raise Unresolved("no cache-attribute resolver is configured")
        buffer.resolution = self.resolver.resolve(buffer)
        return buffer.resolution

    def _map_info_of(self, buffer: HostBuffer) -> int:
        try:
            return int(self._resolve(buffer).attr)
        except Unresolved as e:
            log.warning("buffer fd %d (%s): cache attribute unknown, map_info 0: %s", buffer.fd,
                        buffer.exporter or buffer.allocator, e)
            return 0

    # --- host blobs -------------------------------------------------------------------------------------------

    def create_host_blob(self, cmd: ResourceCreateBlob, new_backing: Callable[[MemEntries], Backing]
                         ) -> None:
        """RESOURCE_CREATE_BLOB for HOST3D, and HOST3D_GUEST: the same host buffer with the guest's entries as a
        shadow copy that TRANSFER_TO/FROM_HOST_3D keep in step."""
        if cmd.blob_flags & ~KNOWN_FLAGS:
            raise CommandError(_INVALID, f"unknown blob flags {cmd.blob_flags:#x}")
        shadow = None
        if cmd.blob_mem == BlobMem.BLOB_MEM_HOST3D_GUEST:
            if len(cmd.entries):
                shadow = new_backing(cmd.entries)
                if shadow.size < cmd.size:
                    raise CommandError(_INVALID, f"entries cover {shadow.size} of {cmd.size} bytes")
        elif len(cmd.entries):
            raise CommandError(_INVALID, "a HOST3D blob takes no guest entries")
        ctx = self._context(cmd.hdr.ctx_id)
        self.resources.check_new_id(cmd.resource_id)
        buffer = ctx.take_blob(cmd.blob_id, cmd.size)
        res = self.resources.add_host_blob(cmd.resource_id, cmd.blob_mem, cmd.blob_flags, buffer)
        res.backing = shadow

    def transfer_3d(self, cmd: TransferToHost3D | TransferFromHost3D) -> None:
        """Copy bytes between a HOST3D_GUEST blob's guest shadow (at `offset`) and its host buffer (at box.x):
        a blob is a buffer, so the box is one row of box.w bytes."""
        res = self.resources.get(cmd.resource_id)
        buffer = res.host_buffer
        if buffer is None or res.backing is None:
            raise CommandError(_INVALID, f"resource {res.id} is not a host blob with guest backing")
        b = cmd.box
        if (b.y, b.z, b.h, b.d) != (0, 0, 1, 1) or cmd.level:
            raise CommandError(_INVALID, f"a blob transfer is one row of bytes, not {b}")
        if b.x + b.w > res.blob_size or cmd.offset + b.w > res.backing.size:
            raise CommandError(_INVALID, f"transfer of {b.w} bytes at {b.x} (shadow offset {cmd.offset}) passes "
                                         f"the {res.blob_size}-byte blob or its backing")
        if b.w == 0:
            return None
        memory = self._transport().memory
        try:
            if isinstance(cmd, TransferToHost3D):
                write_host(buffer, b.x, res.backing.read(memory, cmd.offset, b.w).data)
            else:
                res.backing.scatter(memory, cmd.offset, read_host(buffer, b.x, b.w))
        except (BackingError, ValueError, OSError) as e:
            raise CommandError(_INVALID, f"transfer on blob {res.id}: {e}") from e

    def map_blob(self, cmd: ResourceMapBlob) -> bytes:
        if not self.host_visible:
            raise CommandError(CtrlType.RESP_ERR_UNSPEC, "there is no host-visible memory region")
        res = self.resources.get(cmd.resource_id)
        buffer = res.host_buffer
        if buffer is None:
            raise CommandError(_INVALID, f"resource {res.id} has no host memory to map")
        if not res.blob_flags & BlobFlag.BLOB_FLAG_USE_MAPPABLE:
            raise CommandError(_INVALID, f"blob {res.id} was not created MAPPABLE")
        try:
            m = self.region.check(res.id, cmd.offset, buffer.size)
        except RegionError as e:
            raise CommandError(_INVALID, f"MAP_BLOB {res.id}: {e}") from e
        try:
            resolution = self._resolve(buffer)
        except Unresolved as e:
            log.error("MAP_BLOB %d refused: %s buffer (fd %d, %d bytes) has no trustworthy cache attribute: %s",
                      res.id, buffer.exporter or buffer.allocator, buffer.fd, buffer.size, e)
            raise CommandError(CtrlType.RESP_ERR_UNSPEC, f"blob {res.id}: cache attribute unknown") from e
        req = build_mmap_request(SHMID_HOST_VISIBLE, 0, m.offset, m.length, MMAP_FLAG_READ_WRITE)
        try:
            self._transport().backend_request(BackendRequest.SHMEM_MAP, req, [buffer.fd], self.map_timeout)
        except BackendChannelError as e:
            raise CommandError(CtrlType.RESP_ERR_UNSPEC, f"SHMEM_MAP of blob {res.id} failed: {e}") from e
        self.region.add(m)
        log.info("map blob %d at %#x +%#x: map_info %s (%s: %s)", res.id, m.offset, m.length,
                 resolution.attr.name, resolution.provenance.value, resolution.detail)
        return responses.map_info(cmd.hdr, int(resolution.attr))

    def unmap_blob(self, cmd: ResourceUnmapBlob) -> None:
        res = self.resources.get(cmd.resource_id)
        if self.region.get(res.id) is None:
            raise CommandError(_INVALID, f"blob {res.id} is not mapped")
        self._unmap(res.id)

    def _unmap(self, rid: int) -> None:
        m = self.region.remove(rid)
        req = build_mmap_request(SHMID_HOST_VISIBLE, 0, m.offset, m.length, MMAP_FLAG_READ_WRITE)
        try:
            self._transport().backend_request(BackendRequest.SHMEM_UNMAP, req, None, self.map_timeout)
        except BackendChannelError as e:
            # The front end keeps a stale mapping of a buffer we are about to free; the fd it holds keeps the
            # memory alive, so nothing is corrupted, but say so.
            log.error("SHMEM_UNMAP of blob %d at %#x failed: %s", rid, m.offset, e)
        log.info("unmapped blob %d at %#x +%#x", rid, m.offset, m.length)

    def release(self, res: Resource) -> None:
        """A blob resource goes away (UNREF): unmap it first, then free its buffer."""
        if self.region.get(res.id) is not None:
            self._unmap(res.id)
        self.forget_resource(res.id)

    def reset(self) -> None:
        """Disconnect or device reset: the front end drops every mapping itself; free everything of ours."""
        for ctx in self.contexts.values():
            ctx.close()
        self.contexts.clear()
        self.region.clear()
