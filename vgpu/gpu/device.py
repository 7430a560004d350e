"""The virtio-gpu device on the vhost-user transport.

Each chain on the control or cursor queue is one command: decoded by the protocol layer, dispatched by type,
executed here. `_execute` is the one error boundary: handlers raise `CommandError` with a kind and a message (or
return a response, or None for OK_NODATA), and only the boundary, which holds the request header, turns either
into bytes — so every failure echoes the request's fence, context and ring like a success. Commands run to
completion before they are answered, so a fenced command's response always means "done".
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import numpy as np

from ..blob.allocators import AllocationError
from ..blob.guestmem import guest_dmabuf
from ..blob.types import Allocator, CacheResolver, HostBuffer
from ..display.sink import Sink
from ..protocol import (
    CURSORQ,
    BlobFlag,
    BlobMem,
    Command,
    CommandError,
    CtrlType,
    CtxAttachResource,
    CtxCreate,
    CtxDestroy,
    CtxDetachResource,
    Event,
    Format,
    GetCapset,
    GetCapsetInfo,
    GetDisplayInfo,
    GetEdid,
    GpuFeature,
    MemEntries,
    MoveCursor,
    Rect,
    ResourceAssignUuid,
    ResourceAttachBacking,
    ResourceCreate2D,
    ResourceCreate3D,
    ResourceCreateBlob,
    ResourceDetachBacking,
    ResourceFlush,
    ResourceMapBlob,
    ResourceUnmapBlob,
    ResourceUnref,
    SetScanout,
    SetScanoutBlob,
    ShmId,
    SubmitCmd,
    TransferFromHost3D,
    TransferToHost2D,
    TransferToHost3D,
    UpdateCursor,
    build_edid,
    decode,
    decode_hdr,
    responses,
    structs,
)
from ..vhost_user.device import BackendChannelError, Device, DeviceRefused
from ..vhost_user.virtqueue import Virtqueue, VirtqueueError, ring_sizes
from ..vhost_user.wire import GPU_CURSOR_SIZE, BackendRequest, ProtocolFeature, bit
from .backing import Backing, BackingError, Forbidden
from .blobs import BlobEngine
from .config import GpuConfig
from .formats import BPP, supported, to_bgra
from .memwatch import MemoryWatch
from .output import Output, describe_layout
from .resources import Resource, ResourceTable
from .scanout import NO_RECT, BlobLayout, Scanout, intersect
from .status import device_status

if TYPE_CHECKING:
    import numpy.typing as npt

log = logging.getLogger("vgpu.gpu")

EVENTS_CLEAR_OFFSET: Final = 4
_INVALID = CtrlType.RESP_ERR_INVALID_PARAMETER
_UNSPEC = CtrlType.RESP_ERR_UNSPEC
# A blob cursor has no format of its own; the Linux driver fills it as DRM_FORMAT_ARGB8888 (bytes B, G, R, A).
_CURSOR_BLOB_FORMAT: Final = Format.FORMAT_B8G8R8A8_UNORM
_CONFIG = structs.config


def _inside(r: Rect, width: int, height: int) -> bool:
    # Python ints do not wrap, so x + width cannot overflow into a small number as u32 arithmetic would.
    return r.x + r.width <= width and r.y + r.height <= height


class GpuDevice(Device):
    num_queues = 2

    def __init__(self, config: GpuConfig, allocator: Allocator | None = None,
                 resolver: CacheResolver | None = None, sinks: Sequence[Sink] = ()) -> None:
        self.cfg = config
        self.shmem_feature_bit = config.shmem_feature_bit
        self.events_read = 0
        self.acked = 0
        # (memory generation and ring addresses, the rings' guest-physical ranges): see _ring_ranges.
        self._rings: tuple[tuple[object, ...], Forbidden] | None = None
        self.resources = ResourceTable(config.limits)
        self.blobs = BlobEngine(self.resources, config.context_types, config.host_visible_size, allocator, resolver,
                                config.limits.max_contexts, config.map_timeout, lambda: self.transport)
        self.scanouts = [Scanout(i) for i in range(config.num_scanouts)]
        self.output = Output(config, lambda: self.transport, sinks)
        # What the driver was last told by GET_DISPLAY_INFO: a different layout later is a display change.
        self._reported = self.output.default_modes()
        self.memwatch = MemoryWatch()

    # --- transport interface ----------------------------------------------------------------------------------

    def device_features(self) -> int:
        f = 0
        if self.cfg.edid:
            f |= GpuFeature.F_EDID.mask
        if self.cfg.resource_uuid:
            f |= GpuFeature.F_RESOURCE_UUID.mask
        if self.cfg.blob:
            f |= GpuFeature.F_RESOURCE_BLOB.mask
        if self.cfg.context_types:
            f |= GpuFeature.F_VIRGL.mask | GpuFeature.F_CONTEXT_INIT.mask
        return f

    def protocol_features(self) -> int:
        f = bit(ProtocolFeature.CONFIG)
        if self.cfg.blob and self.cfg.host_visible_size:
            f |= bit(ProtocolFeature.SHMEM)
        return f

    def shmem_regions(self) -> dict[int, int]:
        if not (self.cfg.blob and self.cfg.host_visible_size):
            return {}
        return {ShmId.SHM_ID_HOST_VISIBLE: self.cfg.host_visible_size}

    def set_features(self, features: int) -> None:
        self.acked = features

    def memory_changed(self) -> None:
        self.memwatch.changed(self.transport.memory, self.resources)

    def has(self, feature: GpuFeature) -> bool:
        return bool(self.acked & feature.mask)

    def config(self) -> bytes:
        # A guest reading the config space may be about to ask GET_DISPLAY_INFO after a display change that only
        # the VMM knows of (output.py explains): the next query asks the display again.
        self.output.forget_layout()
        return bytes(_CONFIG.build(dict(events_read=self.events_read, events_clear=0,
                                        num_scanouts=self.cfg.num_scanouts,
                                        num_capsets=len(self.cfg.context_types))))

    def write_config(self, offset: int, data: bytes) -> None:
        # Only events_clear is writable: a 1 clears that event in events_read.  QEMU's vhost-user-gpu writes its
        # whole copy of the config space (offset 0, 16 bytes) whenever the guest writes events_clear: take the
        # events_clear bytes from such a write and ignore the read-only fields around them.
        start = EVENTS_CLEAR_OFFSET - offset
        if start < 0 or start + 4 > len(data) or offset + len(data) > _CONFIG.sizeof():
            raise DeviceRefused(f"config write at {offset} of {len(data)} bytes (only events_clear is writable)")
        self.output.forget_layout()
        self.events_read &= ~int.from_bytes(data[start:start + 4], "little")

    def set_gpu_socket(self, sock: socket.socket) -> None:
        if not self.output.attach_display(sock, on_ready=self._check_layout):
            return
        # A new display knows nothing yet: show it what each scanout shows.
        for s in self.scanouts:
            if s.enabled:
                self.output.show(s)
        # Whether its layout differs from what the driver was told is known only once it answers (on_ready):
        # asking now would block the front end that is handing us the socket.

    def _check_layout(self) -> None:
        if self.output.live is not None and self.output.modes() != self._reported:
            self.display_changed()

    def display_changed(self) -> None:
        """The display layout changed: raise EVENT_DISPLAY and a config interrupt so the driver asks again."""
        self.events_read |= int(Event.EVENT_DISPLAY)
        try:
            self.transport.backend_request(BackendRequest.CONFIG_CHANGE_MSG, b"")
        except BackendChannelError as e:
            log.info("config change not signalled: %s", e)

    def disconnected(self) -> None:
        # One line that says what the VMM left behind, so an operator can tell a clean shutdown from a crash
        # that held blobs (all of it is freed by reset, whatever the front end did).
        log.info("front end gone: dropped %d resources, %d mapped blobs, %d contexts (%d bytes of host memory)",
                 len(self.resources), len(self.blobs.region), len(self.blobs.contexts), self.resources.host_bytes)
        self.reset()

    def reset(self) -> None:
        self.output.reset()
        self.blobs.reset()
        self.resources.clear()
        self.scanouts = [Scanout(i) for i in range(self.cfg.num_scanouts)]
        self.events_read = 0
        self._rings = None
        self._reported = self.output.default_modes()

    def status(self) -> dict[str, object]:
        return device_status(acked=self.acked, limits=self.cfg.limits, table=self.resources, blobs=self.blobs,
                             scanouts=self.scanouts)

    def process_queue(self, queue: Virtqueue) -> None:
        """Every available chain, then one notification (the transport suppresses it as the driver asks)."""
        t = self.transport
        cursor = queue.index == CURSORQ
        for item in queue.chains(t.memory):
            if isinstance(item, VirtqueueError):
                log.warning("queue %d: %s", queue.index, item)
                continue
            written = item.write(self._execute(item.read_all(), cursor))
            t.complete(queue, item, written)
        t.flush(queue)

    # --- the command boundary ---------------------------------------------------------------------------------

    def _execute(self, request: bytes | memoryview, cursor: bool) -> bytes:
        try:
            cmd = decode(request)
        except CommandError as e:
            try:
                hdr = decode_hdr(request)
            except CommandError:
                hdr = None  # too short to have a header: nothing to echo
            log.info("%s -> %s", e.message, e.response_type.name)
            return responses.error(hdr, e.response_type)
        try:
            if cursor != isinstance(cmd, (UpdateCursor, MoveCursor)):
                raise CommandError(_UNSPEC, f"{type(cmd).__name__} on the wrong queue")
            reply = self._run(cmd)
        except CommandError as e:
            log.info("%s: %s -> %s", type(cmd).__name__, e.message, e.response_type.name)
            return responses.error(cmd.hdr, e.response_type)
        except BackingError as e:
            log.info("%s: %s -> RESP_ERR_INVALID_PARAMETER", type(cmd).__name__, e)
            return responses.error(cmd.hdr, _INVALID)
        return responses.ok_nodata(cmd.hdr) if reply is None else reply

    def _run(self, cmd: Command) -> bytes | None:
        """Dispatch on the command's type (mypy narrows each arm); the commands a frame or a cursor move sends
        come first, since arms are tried in order."""
        b = self.blobs
        match cmd:
            case TransferToHost2D():
                self._transfer_to_host_2d(cmd)
            case ResourceFlush():
                self._flush(cmd)
            case MoveCursor():
                self._move_cursor(cmd)
            case UpdateCursor():
                self._update_cursor(cmd)
            case ResourceCreate2D():
                self._create_2d(cmd)
            case ResourceUnref():
                self._unref(cmd)
            case ResourceAttachBacking():
                self._attach_backing(cmd)
            case ResourceDetachBacking():
                self._detach_backing(cmd)
            case SetScanout():
                self._set_scanout(cmd)
            case SetScanoutBlob():
                self._set_scanout_blob(cmd)
            case ResourceCreateBlob():
                self._create_blob(cmd)
            case GetDisplayInfo():
                modes = self.output.modes()
                if modes != self._reported:
                    log.info("GET_DISPLAY_INFO: the guest is told %s", describe_layout(modes))
                self._reported = modes
                return responses.display_info(cmd.hdr, modes)
            case GetEdid():
                return self._get_edid(cmd)
            case ResourceAssignUuid():
                return self._assign_uuid(cmd)
            case GetCapsetInfo():
                return b.capset_info(cmd)
            case GetCapset():
                return b.capset(cmd)
            case ResourceMapBlob():
                self._need(GpuFeature.F_RESOURCE_BLOB)
                return b.map_blob(cmd)
            case ResourceUnmapBlob():
                self._need(GpuFeature.F_RESOURCE_BLOB)
                b.unmap_blob(cmd)
            case CtxCreate():
                self._need(GpuFeature.F_VIRGL)
                b.ctx_create(cmd)
            case CtxDestroy():
                self._need(GpuFeature.F_VIRGL)
                b.ctx_destroy(cmd)
            case CtxAttachResource():
                self._need(GpuFeature.F_VIRGL)
                b.ctx_attach(cmd)
            case CtxDetachResource():
                self._need(GpuFeature.F_VIRGL)
                b.ctx_detach(cmd)
            case SubmitCmd():
                self._need(GpuFeature.F_VIRGL)
                b.submit(cmd)
            case TransferToHost3D() | TransferFromHost3D():
                self._need(GpuFeature.F_VIRGL)
                b.transfer_3d(cmd)
            case ResourceCreate3D():
                raise CommandError(_UNSPEC, "ResourceCreate3D is not supported")
        return None

    def _need(self, feature: GpuFeature) -> None:
        if not self.has(feature):
            raise CommandError(_UNSPEC, f"{feature.name} was not negotiated")

    def _scanout(self, scanout_id: int) -> Scanout:
        if scanout_id >= len(self.scanouts):
            raise CommandError(CtrlType.RESP_ERR_INVALID_SCANOUT_ID, f"no scanout {scanout_id}")
        return self.scanouts[scanout_id]

    # --- display ----------------------------------------------------------------------------------------------

    def _get_edid(self, cmd: GetEdid) -> bytes:
        self._need(GpuFeature.F_EDID)
        if cmd.scanout >= self.cfg.num_scanouts:
            raise CommandError(CtrlType.RESP_ERR_INVALID_SCANOUT_ID, f"no scanout {cmd.scanout}")
        theirs = self.output.edid(cmd.scanout)
        if theirs is not None:
            return responses.edid(cmd.hdr, theirs)
        mode = self.output.modes()[cmd.scanout]
        w, h = (mode.r.width, mode.r.height) if mode.r.width and mode.r.height else (self.cfg.width,
                                                                                        self.cfg.height)
        return responses.edid(cmd.hdr, build_edid(w, h, serial=cmd.scanout))

    def _detach_scanouts(self, res: Resource) -> None:
        if not res.scanouts:
            return
        for sid in sorted(res.scanouts):
            s = self.scanouts[sid]
            s.resource, s.blob, s.rect, s.dmabuf = None, None, NO_RECT, None
            self.output.show(s)
        res.scanouts.clear()

    # --- resources --------------------------------------------------------------------------------------------

    def _create_2d(self, cmd: ResourceCreate2D) -> None:
        if not supported(cmd.format):
            raise CommandError(_INVALID, f"unknown format {cmd.format}")
        self.resources.create_2d(cmd.resource_id, cmd.format, cmd.width, cmd.height)

    def _unref(self, cmd: ResourceUnref) -> None:
        res = self.resources.get(cmd.resource_id)
        self._detach_scanouts(res)
        self.blobs.release(res)
        self.resources.remove(res)

    def _ring_ranges(self) -> Forbidden:
        """Guest-physical ranges of every ring: backing there would let the host scribble over them.  Worked out
        again only when the memory table or a ring moves (every attach asks)."""
        mem = self.transport.memory
        queues = self.transport.queues
        key = (id(mem), mem.generation,
               *((q.desc_addr, q.avail_addr, q.used_addr, q.size) for q in queues if q.has_addr and q.size))
        if self._rings is not None and self._rings[0] == key:
            return self._rings[1]
        out = []
        for q in self.transport.queues:
            if not (q.has_addr and q.size):
                continue
            for addr, size in zip((q.desc_addr, q.avail_addr, q.used_addr), ring_sizes(q.size), strict=True):
                try:
                    gpa = mem.uva_to_gpa(addr, size)
                except Exception:
                    continue
                out.append((gpa, gpa + size))
        forbidden = Forbidden(out)
        self._rings = (key, forbidden)
        return forbidden

    def _new_backing(self, entries: MemEntries) -> Backing:
        if len(entries) > self.cfg.limits.max_backing_entries:
            raise CommandError(_INVALID, f"{len(entries)} backing entries exceed {self.cfg.limits.max_backing_entries}")
        backing = Backing.from_entries(entries)
        try:
            backing.validate(self.transport.memory, self._ring_ranges())
        except BackingError as e:
            raise CommandError(_INVALID, str(e)) from e
        return backing

    def _attach_backing(self, cmd: ResourceAttachBacking) -> None:
        res = self.resources.get(cmd.resource_id)
        if res.backing is not None:
            raise CommandError(_INVALID, f"resource {res.id} already has backing")
        if not len(cmd.entries):
            raise CommandError(_INVALID, "ATTACH_BACKING with no entries")
        res.backing = self._new_backing(cmd.entries)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("resource %d backing: %s", res.id, res.backing.describe())

    def _detach_backing(self, cmd: ResourceDetachBacking) -> None:
        res = self.resources.get(cmd.resource_id)
        if res.backing is None:
            raise CommandError(_INVALID, f"resource {res.id} has no backing")
        if res.is_blob and res.scanouts:
            # A guest blob's pixels are its backing: what the scanout shows goes with it.
            self._detach_scanouts(res)
        res.drop_guest_dmabuf()
        res.backing.close()
        res.backing = None

    def _transfer_to_host_2d(self, cmd: TransferToHost2D) -> None:
        res = self.resources.get(cmd.resource_id)
        if res.is_blob:
            # A guest blob has no host copy to update: its pixels are read from guest memory when shown.
            return
        r = cmd.r
        if not _inside(r, res.width, res.height):
            raise CommandError(_INVALID, f"rect {r} outside a {res.width}x{res.height} resource")
        if res.backing is None:
            raise CommandError(_UNSPEC, f"resource {res.id} has no backing")
        if r.width == 0 or r.height == 0:
            return
        assert res.pixels is not None
        stride = res.stride
        row = r.width * BPP
        span = (r.height - 1) * stride + row
        if cmd.offset + span > res.backing.size:
            raise CommandError(_INVALID, f"transfer of {span} bytes at offset {cmd.offset} passes the "
                                  f"{res.backing.size}-byte backing")
        # Straight into the image's rectangle, no staging (full-width rectangles are one contiguous gather).
        res.backing.gather_rows(self.transport.memory, cmd.offset, stride, row,
                                res.pixels[r.y:r.y + r.height, r.x * BPP:r.x * BPP + row])

    def _assign_uuid(self, cmd: ResourceAssignUuid) -> bytes:
        self._need(GpuFeature.F_RESOURCE_UUID)
        res = self.resources.get(cmd.resource_id)
        if res.uuid is None:
            res.uuid = uuid.uuid4()
        return responses.resource_uuid(cmd.hdr, res.uuid)

    def _create_blob(self, cmd: ResourceCreateBlob) -> None:
        self._need(GpuFeature.F_RESOURCE_BLOB)
        if cmd.blob_mem not in (BlobMem.BLOB_MEM_GUEST, BlobMem.BLOB_MEM_HOST3D, BlobMem.BLOB_MEM_HOST3D_GUEST):
            raise CommandError(_INVALID, f"blob_mem {cmd.blob_mem}")
        if cmd.blob_mem != BlobMem.BLOB_MEM_GUEST:
            # Host blobs come from a context's blob_id, and contexts need VIRGL (offered with a context type);
            # without it the blob_mem itself is invalid (virtio spec: HOST3D* only when VIRGL is supported).
            if not self.has(GpuFeature.F_VIRGL):
                raise CommandError(_INVALID, f"blob_mem {cmd.blob_mem} needs VIRTIO_GPU_F_VIRGL")
            return self.blobs.create_host_blob(cmd, self._new_backing)
        known = BlobFlag.BLOB_FLAG_USE_MAPPABLE | BlobFlag.BLOB_FLAG_USE_SHAREABLE | \
            BlobFlag.BLOB_FLAG_USE_CROSS_DEVICE
        if cmd.blob_flags & ~int(known):
            raise CommandError(_INVALID, f"unknown blob flags {cmd.blob_flags:#x}")
        if cmd.blob_id != 0:
            raise CommandError(_INVALID, "a guest blob has no blob_id")
        if cmd.size == 0:
            raise CommandError(_INVALID, "zero-sized blob")
        backing = None
        if len(cmd.entries):
            backing = self._new_backing(cmd.entries)
            if backing.size < cmd.size:
                raise CommandError(_INVALID, f"entries cover {backing.size} bytes of a {cmd.size}-byte blob")
        self.resources.create_guest_blob(cmd.resource_id, cmd.blob_mem, cmd.blob_flags, cmd.size, backing)
        if backing is not None and log.isEnabledFor(logging.DEBUG):
            log.debug("resource %d backing: %s", cmd.resource_id, backing.describe())

    # --- scanouts ---------------------------------------------------------------------------------------------

    def _set_scanout(self, cmd: SetScanout) -> None:
        s = self._scanout(cmd.scanout_id)
        if cmd.resource_id == 0:
            self._disable(s)
            return
        res = self.resources.get(cmd.resource_id)
        if res.is_blob:
            raise CommandError(_INVALID, f"resource {res.id} is a blob: use SET_SCANOUT_BLOB")
        if cmd.r.width == 0 or cmd.r.height == 0 or not _inside(cmd.r, res.width, res.height):
            raise CommandError(_INVALID, f"scanout rect {cmd.r} not inside the {res.width}x{res.height} resource")
        self._attach(s, res, cmd.r, None)

    def _set_scanout_blob(self, cmd: SetScanoutBlob) -> None:
        self._need(GpuFeature.F_RESOURCE_BLOB)
        s = self._scanout(cmd.scanout_id)
        if cmd.resource_id == 0:
            self._disable(s)
            return
        res = self.resources.get(cmd.resource_id)
        if not res.is_blob:
            raise CommandError(_INVALID, f"resource {res.id} is not a blob")
        if not supported(cmd.format):
            raise CommandError(_INVALID, f"unknown format {cmd.format}")
        stride, offset = cmd.strides[0], cmd.offsets[0]
        if cmd.width == 0 or cmd.height == 0 or stride < cmd.width * BPP:
            raise CommandError(_INVALID, f"{cmd.width}x{cmd.height} image with stride {stride}")
        if offset + (cmd.height - 1) * stride + cmd.width * BPP > res.blob_size:
            raise CommandError(_INVALID, f"image passes the end of the {res.blob_size}-byte blob")
        if cmd.r.width == 0 or cmd.r.height == 0 or not _inside(cmd.r, cmd.width, cmd.height):
            raise CommandError(_INVALID, f"scanout rect {cmd.r} not inside the {cmd.width}x{cmd.height} image")
        if res.backing is None and res.host_buffer is None:
            raise CommandError(_INVALID, f"blob {res.id} has no memory to show")
        layout = BlobLayout(cmd.width, cmd.height, cmd.format, stride, offset)
        self._attach(s, res, cmd.r, layout, self._scanout_dmabuf(res, layout))

    def _scanout_dmabuf(self, res: Resource, layout: BlobLayout) -> HostBuffer | None:
        """A dma-buf the display can show this blob from without copies, when there is a display, the blob's
        image starts at offset 0 (DMABUF_SCANOUT has no offset) and a dma-buf exists or can be made over the
        guest's pages; None means the copy path."""
        if not self.output.takes_dmabuf or layout.offset:
            return None
        if res.host_buffer is not None:
            return res.host_buffer if res.host_buffer.is_dmabuf else None
        if res.guest_dmabuf is None and res.backing is not None:
            try:
                ranges = res.backing.file_ranges(self.transport.memory, res.blob_size)
                res.guest_dmabuf = guest_dmabuf(ranges)
                log.info("blob %d shown as a udmabuf over %d guest ranges", res.id, len(ranges))
            except (AllocationError, BackingError) as e:
                log.info("blob %d shown by copying: no dma-buf over guest memory (%s)", res.id, e)
        return res.guest_dmabuf

    def _attach(self, s: Scanout, res: Resource, r: Rect, blob: BlobLayout | None,
                dmabuf: HostBuffer | None = None) -> None:
        if s.resource is not None and s.resource is not res:
            s.resource.scanouts.discard(s.id)
        changed = (s.resource is not res) or s.rect != r or s.blob != blob or s.dmabuf is not dmabuf
        s.resource, s.rect, s.blob, s.dmabuf = res, r, blob, dmabuf
        res.scanouts.add(s.id)
        if changed:
            self.output.show(s)

    def _disable(self, s: Scanout) -> None:
        if s.resource is not None:
            s.resource.scanouts.discard(s.id)
        s.resource, s.blob, s.rect, s.dmabuf = None, None, NO_RECT, None
        self.output.show(s)

    def _flush(self, cmd: ResourceFlush) -> None:
        res = self.resources.get(cmd.resource_id)
        limit = (res.width, res.height) if not res.is_blob else None
        if limit is not None and not _inside(cmd.r, *limit):
            raise CommandError(_INVALID, f"flush rect {cmd.r} outside the {limit[0]}x{limit[1]} resource")
        for sid in sorted(res.scanouts):
            s = self.scanouts[sid]
            clip = intersect(cmd.r, s.rect)
            if clip is not None:
                self.output.update(s, clip, lambda sc: sc in self.scanouts)

    # --- cursor -----------------------------------------------------------------------------------------------

    def _update_cursor(self, cmd: UpdateCursor) -> None:
        self._scanout(cmd.pos.scanout_id)
        pos = cmd.pos
        if cmd.resource_id == 0:
            self.output.cursor(pos.scanout_id, None, 0, 0, pos.x, pos.y)
            return
        res = self.resources.get(cmd.resource_id)
        argb = to_bgra(self._cursor_pixels(res), res.format or _CURSOR_BLOB_FORMAT, opaque=False)
        self.output.cursor(pos.scanout_id, argb, cmd.hot_x, cmd.hot_y, pos.x, pos.y)

    def _cursor_pixels(self, res: Resource) -> npt.NDArray[np.uint8]:
        """The 64x64 image of a cursor resource: a 2D image of that size, or a guest blob holding at least one
        (with RESOURCE_BLOB the Linux guest makes its cursor a blob with no format: ARGB8888, as QEMU reads it)."""
        n = GPU_CURSOR_SIZE * GPU_CURSOR_SIZE * BPP
        if res.pixels is not None and (res.width, res.height) == (GPU_CURSOR_SIZE, GPU_CURSOR_SIZE):
            return res.pixels.reshape(GPU_CURSOR_SIZE, GPU_CURSOR_SIZE, BPP)
        if res.is_blob and res.backing is not None and res.blob_size >= n:
            out = res.backing.read(self.transport.memory, 0, n)  # read-only; to_bgra copies
            return out.reshape(GPU_CURSOR_SIZE, GPU_CURSOR_SIZE, BPP)
        raise CommandError(_INVALID, f"cursor resource {res.id} is not a 64x64 image")

    def _move_cursor(self, cmd: MoveCursor) -> None:
        pos = cmd.pos
        self._scanout(pos.scanout_id)
        self.output.move_cursor(pos.scanout_id, pos.x, pos.y)
