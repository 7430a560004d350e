"""The virtio-gpu device on the vhost-user transport.

Each chain on the control or cursor queue is one command: decoded by the protocol layer, executed here, answered
with the encoder for its response.  `CommandError` is the only way a command fails, and `_execute` is the one place
it becomes a RESP_ERR_* response, so every failure echoes the request's fence, context and ring like a success.
Commands run to completion before they are answered, so a fenced command's response always means "done".
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Callable
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ..blob.allocators import AllocationError
from ..blob.guestmem import guest_dmabuf
from ..blob.types import Allocator, CacheResolver, HostBuffer
from ..protocol import (
    CURSORQ,
    BlobFlag,
    BlobMem,
    Command,
    CommandError,
    CtrlHdr,
    CtrlType,
    CtxAttachResource,
    CtxCreate,
    CtxDestroy,
    CtxDetachResource,
    DisplayOne,
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
    responses,
    structs,
)
from ..vhost_user.device import BackendChannelError, Device, DeviceRefused
from ..vhost_user.gpu_display import DisplayClient, DisplayError
from ..vhost_user.virtqueue import Virtqueue, VirtqueueError, ring_sizes
from ..vhost_user.wire import GPU_CURSOR_SIZE, BackendRequest, GpuProtocolFeature, ProtocolFeature, bit
from .backing import Backing, BackingError
from .blobs import BlobEngine
from .config import GpuConfig
from .formats import BPP, DRM_FOURCC, supported, to_bgra
from .resources import Resource, ResourceTable
from .scanout import NO_RECT, BlobLayout, PictureWriter, Scanout, bgrx, intersect

log = logging.getLogger("vgpu.gpu")

EVENTS_CLEAR_OFFSET: Final = 4
_INVALID = CtrlType.RESP_ERR_INVALID_PARAMETER
_BAD_ID = CtrlType.RESP_ERR_INVALID_RESOURCE_ID
_CURSOR_COMMANDS: Final = (UpdateCursor, MoveCursor)
# A blob cursor has no format of its own; the Linux driver fills it as DRM_FORMAT_ARGB8888 (bytes B, G, R, A).
_CURSOR_BLOB_FORMAT: Final = Format.FORMAT_B8G8R8A8_UNORM

Handler = Callable[[Command], bytes]


def _fail(kind: CtrlType, msg: str, hdr: CtrlHdr) -> CommandError:
    return CommandError(kind, msg, hdr)


def _inside(r: Rect, width: int, height: int) -> bool:
    # Python ints do not wrap, so x + width cannot overflow into a small number as u32 arithmetic would.
    return r.x + r.width <= width and r.y + r.height <= height


class GpuDevice(Device):
    num_queues = 2
    max_queue_size = 1024

    def __init__(self, config: GpuConfig, allocator: Allocator | None = None,
                 resolver: CacheResolver | None = None) -> None:
        self.cfg = config
        self.events_read = 0
        self.acked = 0
        self.display: DisplayClient | None = None
        self.resources = ResourceTable(config.limits)
        self.blobs = BlobEngine(self.resources, config.context_types, config.host_visible_size, allocator, resolver,
                                config.limits.max_contexts, config.map_timeout, lambda: self.transport)
        self.scanouts = [Scanout(i) for i in range(config.num_scanouts)]
        self.pictures = PictureWriter(config.png_dir, config.png_rate, config.png_history) if config.png_dir \
            else None
        # What the driver was last told by GET_DISPLAY_INFO: a different layout later is a display change.
        self._reported = self._default_modes()
        self._handlers: dict[type, Handler] = {
            GetDisplayInfo: self._get_display_info,
            GetEdid: self._get_edid,
            GetCapsetInfo: self._gated(self.blobs.capset_info, None),
            GetCapset: self._gated(self.blobs.capset, None),
            CtxCreate: self._gated(self.blobs.ctx_create, GpuFeature.F_VIRGL),
            CtxDestroy: self._gated(self.blobs.ctx_destroy, GpuFeature.F_VIRGL),
            CtxAttachResource: self._gated(self.blobs.ctx_attach, GpuFeature.F_VIRGL),
            CtxDetachResource: self._gated(self.blobs.ctx_detach, GpuFeature.F_VIRGL),
            SubmitCmd: self._gated(self.blobs.submit, GpuFeature.F_VIRGL),
            TransferToHost3D: self._gated(self.blobs.transfer_3d, GpuFeature.F_VIRGL),
            TransferFromHost3D: self._gated(self.blobs.transfer_3d, GpuFeature.F_VIRGL),
            ResourceMapBlob: self._gated(self.blobs.map_blob, GpuFeature.F_RESOURCE_BLOB),
            ResourceUnmapBlob: self._gated(self.blobs.unmap_blob, GpuFeature.F_RESOURCE_BLOB),
            ResourceCreate2D: self._create_2d,
            ResourceUnref: self._unref,
            ResourceAttachBacking: self._attach_backing,
            ResourceDetachBacking: self._detach_backing,
            TransferToHost2D: self._transfer_to_host_2d,
            SetScanout: self._set_scanout,
            SetScanoutBlob: self._set_scanout_blob,
            ResourceFlush: self._flush,
            ResourceAssignUuid: self._assign_uuid,
            ResourceCreateBlob: self._create_blob,
            UpdateCursor: self._update_cursor,
            MoveCursor: self._move_cursor,
        }

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

    def _gated(self, handler: Callable[[Any], bytes], feature: GpuFeature | None) -> Handler:
        """A handler that first checks its feature was negotiated (3D commands need VIRGL)."""

        def run(cmd: Command) -> bytes:
            if feature is not None:
                self._need(feature, cmd.hdr)
            return handler(cmd)

        return run

    def set_features(self, features: int) -> None:
        self.acked = features

    def has(self, feature: GpuFeature) -> bool:
        return bool(self.acked & feature.mask)

    def config(self) -> bytes:
        return bytes(structs.config.build(dict(events_read=self.events_read, events_clear=0,
                                               num_scanouts=self.cfg.num_scanouts,
                                               num_capsets=len(self.cfg.context_types))))

    def write_config(self, offset: int, data: bytes) -> None:
        # Only events_clear is writable: a 1 clears that event in events_read.
        if offset != EVENTS_CLEAR_OFFSET or len(data) != 4:
            raise DeviceRefused(f"config write at {offset} of {len(data)} bytes (only events_clear is writable)")
        self.events_read &= ~int.from_bytes(data, "little")

    def set_gpu_socket(self, sock: socket.socket) -> None:
        if self.display is not None:
            self.display.close()
        self.display = DisplayClient(self.transport, sock, on_ready=self._check_layout)
        try:
            self.display.start_negotiation()
        except DisplayError as e:
            log.warning("display socket unusable: %s", e)
            self.display.close()
            self.display = None
            return
        # A new display knows nothing yet: show it what each scanout shows.
        for s in self.scanouts:
            if s.enabled:
                self._show(s)
        # Whether its layout differs from what the driver was told is known only once it answers (on_ready):
        # asking now would block the front end that is handing us the socket.

    def _check_layout(self) -> None:
        if self.display is not None and self.display.alive and self._modes() != self._reported:
            self.display_changed()

    def reset(self) -> None:
        if self.display is not None:
            self.display.close()
            self.display = None
        self.blobs.reset()
        self.resources.clear()
        self.scanouts = [Scanout(i) for i in range(self.cfg.num_scanouts)]
        self.events_read = 0
        self._reported = self._default_modes()

    def process_queue(self, queue: Virtqueue) -> None:
        t = self.transport
        for item in queue.chains(t.memory):
            if isinstance(item, VirtqueueError):
                log.warning("queue %d: %s", queue.index, item)
                continue
            written = item.write(self._execute(item.read_all(), queue.index))
            t.complete(queue, item, written)
        t.flush(queue)

    # --- the command boundary ---------------------------------------------------------------------------------

    def _execute(self, request: bytes | memoryview, queue_index: int) -> bytes:
        hdr: CtrlHdr | None = None
        try:
            cmd = decode(request)
            hdr = cmd.hdr
            if (queue_index == CURSORQ) != isinstance(cmd, _CURSOR_COMMANDS):
                raise _fail(CtrlType.RESP_ERR_UNSPEC, f"{type(cmd).__name__} on the wrong queue", hdr)
            handler = self._handlers.get(type(cmd))
            if handler is None:
                raise _fail(CtrlType.RESP_ERR_UNSPEC, f"{type(cmd).__name__} is not supported", hdr)
            return handler(cmd)
        except CommandError as e:
            log.info("queue %d: %s -> %s", queue_index, e.message, e.response_type.name)
            return responses.error(e.hdr or hdr, e.response_type)
        except BackingError as e:
            log.info("queue %d: %s -> RESP_ERR_INVALID_PARAMETER", queue_index, e)
            return responses.error(hdr, _INVALID)

    def _need(self, feature: GpuFeature, hdr: CtrlHdr) -> None:
        if not self.has(feature):
            raise _fail(CtrlType.RESP_ERR_UNSPEC, f"{feature.name} was not negotiated", hdr)

    def _scanout(self, scanout_id: int, hdr: CtrlHdr) -> Scanout:
        if scanout_id >= len(self.scanouts):
            raise _fail(CtrlType.RESP_ERR_INVALID_SCANOUT_ID, f"no scanout {scanout_id}", hdr)
        return self.scanouts[scanout_id]

    # --- display ----------------------------------------------------------------------------------------------

    def _default_modes(self) -> list[DisplayOne]:
        return [DisplayOne(Rect(0, 0, self.cfg.width, self.cfg.height), True)
                ] + [DisplayOne(Rect(0, 0, 0, 0), False)] * (self.cfg.num_scanouts - 1)

    def _modes(self) -> list[DisplayOne]:
        """The front end's display layout when it has one, limited to our scanouts; else the configured one."""
        if self.display is not None and self.display.alive:
            try:
                info = structs.resp_display_info_c.parse(self.display.display_info())
                modes = [DisplayOne(Rect(m.r.x, m.r.y, m.r.width, m.r.height), bool(m.enabled))
                         for m in info.pmodes[: self.cfg.num_scanouts]]
                if any(m.enabled and m.r.width and m.r.height for m in modes):
                    return modes
            except Exception as e:  # a broken front-end answer must not break the guest's display
                log.warning("front end display info unusable (%s); using the configured display", e)
        return self._default_modes()

    def _get_display_info(self, cmd: Command) -> bytes:
        assert isinstance(cmd, GetDisplayInfo)
        self._reported = self._modes()
        return responses.display_info(cmd.hdr, self._reported)

    def _get_edid(self, cmd: Command) -> bytes:
        assert isinstance(cmd, GetEdid)
        self._need(GpuFeature.F_EDID, cmd.hdr)
        if cmd.scanout >= self.cfg.num_scanouts:
            raise _fail(CtrlType.RESP_ERR_INVALID_SCANOUT_ID, f"no scanout {cmd.scanout}", cmd.hdr)
        theirs = self._front_end_edid(cmd.scanout)
        if theirs is not None:
            return responses.edid(cmd.hdr, theirs)
        mode = self._modes()[cmd.scanout]
        w, h = (mode.r.width, mode.r.height) if mode.r.width and mode.r.height else (self.cfg.width,
                                                                                        self.cfg.height)
        return responses.edid(cmd.hdr, build_edid(w, h, serial=cmd.scanout))

    def _front_end_edid(self, scanout: int) -> bytes | None:
        """The VMM's EDID for the scanout when its display offers one (it knows the real monitor)."""
        if self.display is None or not self.display.alive or not self.display.has(GpuProtocolFeature.EDID):
            return None
        try:
            resp = structs.resp_edid_c.parse(self.display.edid(scanout))
        except Exception as e:  # a broken answer falls back to ours
            log.warning("front end EDID unusable (%s); using our own", e)
            return None
        size = int(resp.size)
        if not 128 <= size <= len(resp.edid) or size % 128:
            return None
        return bytes(resp.edid[:size])

    def display_changed(self) -> None:
        """The display layout changed: raise EVENT_DISPLAY and a config interrupt so the driver asks again."""
        self.events_read |= int(Event.EVENT_DISPLAY)
        try:
            self.transport.backend_request(BackendRequest.CONFIG_CHANGE_MSG, b"")
        except BackendChannelError as e:
            log.info("config change not signalled: %s", e)

    def _to_display(self, send: Callable[[DisplayClient], None]) -> None:
        """Display output is best effort: a VMM without a display, or one that went away, costs the guest
        nothing."""
        if self.display is None or not self.display.alive:
            return
        try:
            send(self.display)
        except DisplayError as e:
            log.warning("display: %s", e)

    def _show(self, s: Scanout) -> None:
        """Tell the display what scanout `s` now shows: its dma-buf when it has one, else its size (0x0: off)."""
        if s.enabled and s.dmabuf is not None and s.blob is not None:
            buf, b, r = s.dmabuf, s.blob, s.rect
            self._to_display(lambda d: d.dmabuf_scanout(s.id, (r.x, r.y, r.width, r.height), buf.fd, b.width,
                                                         b.height, b.stride, 0, DRM_FOURCC[b.format], 0))
            return
        w, h = (s.rect.width, s.rect.height) if s.enabled else (0, 0)
        self._to_display(lambda d: d.scanout(s.id, w, h))

    def _output(self, s: Scanout, r: Rect) -> None:
        """Send the pixels of resource rectangle `r` (already clipped to the scanout) and maybe a picture."""
        x, y = r.x - s.rect.x, r.y - s.rect.y
        if s.dmabuf is not None:
            # The display reads the buffer itself; DMABUF_UPDATE returns once it has.
            self._to_display(lambda d: d.dmabuf_update(s.id, x, y, r.width, r.height))
        elif self.display is not None and self.display.alive:
            pixels = bgrx(s, self.transport.memory, r)
            self._to_display(lambda d: d.update(s.id, x, y, r.width, r.height, pixels))
        pics = self.pictures
        if pics is not None and not s.png_owed and not pics.maybe_write(s, self.transport.memory):
            # Skipped by the rate limit: write the then-current picture once the interval has passed, so the
            # last frame the guest shows is always on disk.
            self.transport.call_later(pics.due_in(s), lambda: self._owed_picture(s))

    def _owed_picture(self, s: Scanout) -> None:
        if self.pictures is not None and s.png_owed and s.enabled and s in self.scanouts:
            self.pictures.maybe_write(s, self.transport.memory, force=True)

    def _detach_scanouts(self, res: Resource) -> None:
        for sid in sorted(res.scanouts):
            s = self.scanouts[sid]
            s.resource, s.blob, s.rect, s.dmabuf = None, None, NO_RECT, None
            self._show(s)
        res.scanouts.clear()

    # --- resources --------------------------------------------------------------------------------------------

    def _create_2d(self, cmd: Command) -> bytes:
        assert isinstance(cmd, ResourceCreate2D)
        if not supported(cmd.format):
            raise _fail(_INVALID, f"unknown format {cmd.format}", cmd.hdr)
        self.resources.create_2d(cmd.resource_id, cmd.format, cmd.width, cmd.height, cmd.hdr)
        return responses.ok_nodata(cmd.hdr)

    def _unref(self, cmd: Command) -> bytes:
        assert isinstance(cmd, ResourceUnref)
        res = self.resources.get(cmd.resource_id, cmd.hdr)
        self._detach_scanouts(res)
        self.blobs.release(res)
        self.resources.remove(res)
        return responses.ok_nodata(cmd.hdr)

    def _ring_ranges(self) -> list[tuple[int, int]]:
        """Guest-physical ranges of every ring: backing there would let the host scribble over them."""
        out = []
        mem = self.transport.memory
        for q in self.transport.queues:
            if not (q.has_addr and q.size):
                continue
            for addr, size in zip((q.desc_addr, q.avail_addr, q.used_addr), ring_sizes(q.size), strict=True):
                try:
                    gpa = mem.uva_to_gpa(addr, size)
                except Exception:
                    continue
                out.append((gpa, gpa + size))
        return out

    def _new_backing(self, entries: MemEntries, hdr: CtrlHdr) -> Backing:
        if len(entries) > self.cfg.limits.max_backing_entries:
            raise _fail(_INVALID, f"{len(entries)} backing entries exceed {self.cfg.limits.max_backing_entries}",
                        hdr)
        backing = Backing.from_entries(entries)
        try:
            backing.validate(self.transport.memory, self._ring_ranges())
        except BackingError as e:
            raise _fail(_INVALID, str(e), hdr) from e
        return backing

    def _attach_backing(self, cmd: Command) -> bytes:
        assert isinstance(cmd, ResourceAttachBacking)
        res = self.resources.get(cmd.resource_id, cmd.hdr)
        if res.backing is not None:
            raise _fail(_INVALID, f"resource {res.id} already has backing", cmd.hdr)
        if not len(cmd.entries):
            raise _fail(_INVALID, "ATTACH_BACKING with no entries", cmd.hdr)
        res.backing = self._new_backing(cmd.entries, cmd.hdr)
        return responses.ok_nodata(cmd.hdr)

    def _detach_backing(self, cmd: Command) -> bytes:
        assert isinstance(cmd, ResourceDetachBacking)
        res = self.resources.get(cmd.resource_id, cmd.hdr)
        if res.backing is None:
            raise _fail(_INVALID, f"resource {res.id} has no backing", cmd.hdr)
        if res.is_blob and res.scanouts:
            # A guest blob's pixels are its backing: what the scanout shows goes with it.
            self._detach_scanouts(res)
        res.drop_guest_dmabuf()
        res.backing = None
        return responses.ok_nodata(cmd.hdr)

    def _transfer_to_host_2d(self, cmd: Command) -> bytes:
        assert isinstance(cmd, TransferToHost2D)
        res = self.resources.get(cmd.resource_id, cmd.hdr)
        if res.is_blob:
            # A guest blob has no host copy to update: its pixels are read from guest memory when shown.
            return responses.ok_nodata(cmd.hdr)
        r = cmd.r
        if not _inside(r, res.width, res.height):
            raise _fail(_INVALID, f"rect {r} outside a {res.width}x{res.height} resource", cmd.hdr)
        if res.backing is None:
            raise _fail(CtrlType.RESP_ERR_UNSPEC, f"resource {res.id} has no backing", cmd.hdr)
        if r.width == 0 or r.height == 0:
            return responses.ok_nodata(cmd.hdr)
        assert res.pixels is not None
        stride = res.stride
        row = r.width * BPP
        span = (r.height - 1) * stride + row
        if cmd.offset + span > res.backing.size:
            raise _fail(_INVALID, f"transfer of {span} bytes at offset {cmd.offset} passes the "
                                  f"{res.backing.size}-byte backing", cmd.hdr)
        flat = res.pixels.reshape(-1)
        dst0 = r.y * stride + r.x * BPP
        if row == stride:
            # Whole rows: one contiguous gather straight into the image.
            res.backing.gather(self.transport.memory, cmd.offset, flat[dst0:dst0 + span])
        else:
            staging = np.empty(r.height * stride, dtype=np.uint8)
            res.backing.gather(self.transport.memory, cmd.offset, staging[:span])
            res.pixels[r.y:r.y + r.height, r.x * BPP:r.x * BPP + row] = staging.reshape(r.height, stride)[:, :row]
        return responses.ok_nodata(cmd.hdr)

    def _assign_uuid(self, cmd: Command) -> bytes:
        assert isinstance(cmd, ResourceAssignUuid)
        self._need(GpuFeature.F_RESOURCE_UUID, cmd.hdr)
        res = self.resources.get(cmd.resource_id, cmd.hdr)
        if res.uuid is None:
            res.uuid = uuid.uuid4()
        return responses.resource_uuid(cmd.hdr, res.uuid)

    def _create_blob(self, cmd: Command) -> bytes:
        assert isinstance(cmd, ResourceCreateBlob)
        self._need(GpuFeature.F_RESOURCE_BLOB, cmd.hdr)
        if cmd.blob_mem not in (BlobMem.BLOB_MEM_GUEST, BlobMem.BLOB_MEM_HOST3D, BlobMem.BLOB_MEM_HOST3D_GUEST):
            raise _fail(_INVALID, f"blob_mem {cmd.blob_mem}", cmd.hdr)
        if cmd.blob_mem != BlobMem.BLOB_MEM_GUEST:
            # Host blobs come from a context's blob_id, and contexts need VIRGL (offered with a context type);
            # without it the blob_mem itself is invalid (virtio spec: HOST3D* only when VIRGL is supported).
            if not self.has(GpuFeature.F_VIRGL):
                raise _fail(_INVALID, f"blob_mem {cmd.blob_mem} needs VIRTIO_GPU_F_VIRGL", cmd.hdr)
            return self.blobs.create_host_blob(cmd, self._new_backing)
        known = BlobFlag.BLOB_FLAG_USE_MAPPABLE | BlobFlag.BLOB_FLAG_USE_SHAREABLE | \
            BlobFlag.BLOB_FLAG_USE_CROSS_DEVICE
        if cmd.blob_flags & ~int(known):
            raise _fail(_INVALID, f"unknown blob flags {cmd.blob_flags:#x}", cmd.hdr)
        if cmd.blob_id != 0:
            raise _fail(_INVALID, "a guest blob has no blob_id", cmd.hdr)
        if cmd.size == 0:
            raise _fail(_INVALID, "zero-sized blob", cmd.hdr)
        backing = None
        if len(cmd.entries):
            backing = self._new_backing(cmd.entries, cmd.hdr)
            if backing.size < cmd.size:
                raise _fail(_INVALID, f"entries cover {backing.size} bytes of a {cmd.size}-byte blob", cmd.hdr)
        self.resources.create_guest_blob(cmd.resource_id, cmd.blob_mem, cmd.blob_flags, cmd.size, backing,
                                         cmd.hdr)
        return responses.ok_nodata(cmd.hdr)

    # --- scanouts ---------------------------------------------------------------------------------------------

    def _set_scanout(self, cmd: Command) -> bytes:
        assert isinstance(cmd, SetScanout)
        s = self._scanout(cmd.scanout_id, cmd.hdr)
        if cmd.resource_id == 0:
            self._disable(s)
            return responses.ok_nodata(cmd.hdr)
        res = self.resources.get(cmd.resource_id, cmd.hdr)
        if res.is_blob:
            raise _fail(_INVALID, f"resource {res.id} is a blob: use SET_SCANOUT_BLOB", cmd.hdr)
        if cmd.r.width == 0 or cmd.r.height == 0 or not _inside(cmd.r, res.width, res.height):
            raise _fail(_INVALID, f"scanout rect {cmd.r} not inside the {res.width}x{res.height} resource",
                        cmd.hdr)
        self._attach(s, res, cmd.r, None)
        return responses.ok_nodata(cmd.hdr)

    def _set_scanout_blob(self, cmd: Command) -> bytes:
        assert isinstance(cmd, SetScanoutBlob)
        self._need(GpuFeature.F_RESOURCE_BLOB, cmd.hdr)
        s = self._scanout(cmd.scanout_id, cmd.hdr)
        if cmd.resource_id == 0:
            self._disable(s)
            return responses.ok_nodata(cmd.hdr)
        res = self.resources.get(cmd.resource_id, cmd.hdr)
        if not res.is_blob:
            raise _fail(_INVALID, f"resource {res.id} is not a blob", cmd.hdr)
        if not supported(cmd.format):
            raise _fail(_INVALID, f"unknown format {cmd.format}", cmd.hdr)
        stride, offset = cmd.strides[0], cmd.offsets[0]
        if cmd.width == 0 or cmd.height == 0 or stride < cmd.width * BPP:
            raise _fail(_INVALID, f"{cmd.width}x{cmd.height} image with stride {stride}", cmd.hdr)
        if offset + (cmd.height - 1) * stride + cmd.width * BPP > res.blob_size:
            raise _fail(_INVALID, f"image passes the end of the {res.blob_size}-byte blob", cmd.hdr)
        if cmd.r.width == 0 or cmd.r.height == 0 or not _inside(cmd.r, cmd.width, cmd.height):
            raise _fail(_INVALID, f"scanout rect {cmd.r} not inside the {cmd.width}x{cmd.height} image", cmd.hdr)
        if res.backing is None and res.host_buffer is None:
            raise _fail(_INVALID, f"blob {res.id} has no memory to show", cmd.hdr)
        layout = BlobLayout(cmd.width, cmd.height, cmd.format, stride, offset)
        self._attach(s, res, cmd.r, layout, self._scanout_dmabuf(res, layout))
        return responses.ok_nodata(cmd.hdr)

    def _scanout_dmabuf(self, res: Resource, layout: BlobLayout) -> HostBuffer | None:
        """A dma-buf the display can show this blob from without copies, when there is a display, the blob's
        image starts at offset 0 (DMABUF_SCANOUT has no offset) and a dma-buf exists or can be made over the
        guest's pages; None means the copy path."""
        if self.display is None or not self.display.alive or layout.offset:
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
            self._show(s)

    def _disable(self, s: Scanout) -> None:
        if s.resource is not None:
            s.resource.scanouts.discard(s.id)
        s.resource, s.blob, s.rect, s.dmabuf = None, None, NO_RECT, None
        self._show(s)

    def _flush(self, cmd: Command) -> bytes:
        assert isinstance(cmd, ResourceFlush)
        res = self.resources.get(cmd.resource_id, cmd.hdr)
        limit = (res.width, res.height) if not res.is_blob else None
        if limit is not None and not _inside(cmd.r, *limit):
            raise _fail(_INVALID, f"flush rect {cmd.r} outside the {limit[0]}x{limit[1]} resource", cmd.hdr)
        for sid in sorted(res.scanouts):
            s = self.scanouts[sid]
            clip = intersect(cmd.r, s.rect)
            if clip is not None:
                self._output(s, clip)
        return responses.ok_nodata(cmd.hdr)

    # --- cursor -----------------------------------------------------------------------------------------------

    def _update_cursor(self, cmd: Command) -> bytes:
        assert isinstance(cmd, UpdateCursor)
        self._scanout(cmd.pos.scanout_id, cmd.hdr)
        pos = cmd.pos
        if cmd.resource_id == 0:
            self._to_display(lambda d: d.cursor_pos(pos.scanout_id, pos.x, pos.y, hide=True))
            return responses.ok_nodata(cmd.hdr)
        res = self.resources.get(cmd.resource_id, cmd.hdr)
        argb = to_bgra(self._cursor_pixels(res, cmd.hdr), res.format or _CURSOR_BLOB_FORMAT, opaque=False)
        hot_x, hot_y, image = cmd.hot_x, cmd.hot_y, argb.tobytes()
        self._to_display(lambda d: d.cursor_update(pos.scanout_id, pos.x, pos.y, hot_x, hot_y, image))
        if self.pictures is not None:
            self.pictures.cursor(pos.scanout_id, argb)
        return responses.ok_nodata(cmd.hdr)

    def _cursor_pixels(self, res: Resource, hdr: CtrlHdr) -> npt.NDArray[np.uint8]:
        """The 64x64 image of a cursor resource: a 2D image of that size, or a guest blob holding at least one
        (with RESOURCE_BLOB the Linux guest makes its cursor a blob with no format: ARGB8888, as QEMU reads it)."""
        n = GPU_CURSOR_SIZE * GPU_CURSOR_SIZE * BPP
        if res.pixels is not None and (res.width, res.height) == (GPU_CURSOR_SIZE, GPU_CURSOR_SIZE):
            return res.pixels.reshape(GPU_CURSOR_SIZE, GPU_CURSOR_SIZE, BPP)
        if res.is_blob and res.backing is not None and res.blob_size >= n:
            out = np.empty(n, dtype=np.uint8)
            res.backing.gather(self.transport.memory, 0, out)
            return out.reshape(GPU_CURSOR_SIZE, GPU_CURSOR_SIZE, BPP)
        raise _fail(_INVALID, f"cursor resource {res.id} is not a 64x64 image", hdr)

    def _move_cursor(self, cmd: Command) -> bytes:
        assert isinstance(cmd, MoveCursor)
        pos = cmd.pos
        self._scanout(pos.scanout_id, cmd.hdr)
        self._to_display(lambda d: d.cursor_pos(pos.scanout_id, pos.x, pos.y))
        return responses.ok_nodata(cmd.hdr)

