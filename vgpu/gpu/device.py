"""The virtio-gpu device on the vhost-user transport.

Each chain on the control or cursor queue is one command: decoded by the protocol layer, executed here, answered
with the encoder for its response.  `CommandError` is the only way a command fails, and `_execute` is the one place
it becomes a RESP_ERR_* response, so every failure echoes the request's fence, context and ring like a success.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Final

from ..protocol import (
    Command,
    CommandError,
    CtrlHdr,
    CtrlType,
    DisplayOne,
    GetDisplayInfo,
    GetEdid,
    GpuFeature,
    Rect,
    build_edid,
    decode,
    responses,
    structs,
)
from ..vhost_user.device import Device, DeviceRefused
from ..vhost_user.gpu_display import DisplayClient, DisplayError
from ..vhost_user.virtqueue import Virtqueue, VirtqueueError
from ..vhost_user.wire import ProtocolFeature, bit
from .config import GpuConfig

log = logging.getLogger("vgpu.gpu")

EVENTS_CLEAR_OFFSET: Final = 4
CONFIG_SIZE: Final = 16

Handler = Callable[[Command], bytes]


class GpuDevice(Device):
    num_queues = 2
    max_queue_size = 1024

    def __init__(self, config: GpuConfig) -> None:
        self.cfg = config
        self.events_read = 0
        self.acked = 0
        self.display: DisplayClient | None = None
        self._handlers: dict[type[Command], Handler] = {
            GetDisplayInfo: self._get_display_info,
            GetEdid: self._get_edid,
        }

    # --- transport interface ----------------------------------------------------------------------------------

    def device_features(self) -> int:
        return GpuFeature.F_EDID.mask if self.cfg.edid else 0

    def protocol_features(self) -> int:
        return bit(ProtocolFeature.CONFIG)

    def set_features(self, features: int) -> None:
        self.acked = features

    def config(self) -> bytes:
        return bytes(structs.config.build(dict(events_read=self.events_read, events_clear=0,
                                               num_scanouts=self.cfg.num_scanouts, num_capsets=0)))

    def write_config(self, offset: int, data: bytes) -> None:
        # Only events_clear is writable: a 1 clears that event in events_read.
        if offset != EVENTS_CLEAR_OFFSET or len(data) != 4:
            raise DeviceRefused(f"config write at {offset} of {len(data)} bytes (only events_clear is writable)")
        self.events_read &= ~int.from_bytes(data, "little")

    def set_gpu_socket(self, sock: socket.socket) -> None:
        if self.display is not None:
            self.display.close()
        self.display = DisplayClient(self.transport, sock)
        try:
            self.display.negotiate()
        except DisplayError as e:
            log.warning("display socket unusable: %s", e)
            self.display.close()
            self.display = None

    def reset(self) -> None:
        if self.display is not None:
            self.display.close()
            self.display = None
        self.events_read = 0

    def process_queue(self, queue: Virtqueue) -> None:
        t = self.transport
        for item in queue.chains(t.memory):
            if isinstance(item, VirtqueueError):
                log.warning("queue %d: %s", queue.index, item)
                continue
            written = item.write(self._execute(item.read_all(), queue.index))
            t.complete(queue, item, written)
        t.flush(queue)

    # --- commands ---------------------------------------------------------------------------------------------

    def _execute(self, request: bytes | memoryview, queue_index: int) -> bytes:
        hdr: CtrlHdr | None = None
        try:
            cmd = decode(request)
            hdr = cmd.hdr
            handler = self._handlers.get(type(cmd))
            if handler is None:
                raise CommandError(CtrlType.RESP_ERR_UNSPEC, f"{type(cmd).__name__} is not implemented", hdr)
            return handler(cmd)
        except CommandError as e:
            log.info("queue %d: %s -> %s", queue_index, e.message, e.response_type.name)
            return responses.error(e.hdr or hdr, e.response_type)

    def _default_modes(self) -> list[DisplayOne]:
        return [DisplayOne(Rect(0, 0, self.cfg.width, self.cfg.height), True)
                ] + [DisplayOne(Rect(0, 0, 0, 0), False)] * (self.cfg.num_scanouts - 1)

    def _modes(self) -> list[DisplayOne]:
        """The front end's display layout when it has one, limited to our scanouts; else the configured one."""
        if self.display is not None and self.display.alive:
            try:
                raw = self.display.display_info()
                info = structs.resp_display_info_c.parse(raw)
                modes = [DisplayOne(Rect(m.r.x, m.r.y, m.r.width, m.r.height), bool(m.enabled))
                         for m in info.pmodes[: self.cfg.num_scanouts]]
                if any(m.enabled and m.r.width and m.r.height for m in modes):
                    return modes
            except Exception as e:  # a broken front-end answer must not break the guest's display
                log.warning("front end display info unusable (%s); using the configured display", e)
        return self._default_modes()

    def _get_display_info(self, cmd: Command) -> bytes:
        assert isinstance(cmd, GetDisplayInfo)
        return responses.display_info(cmd.hdr, self._modes())

    def _get_edid(self, cmd: Command) -> bytes:
        assert isinstance(cmd, GetEdid)
        if not self.acked & GpuFeature.F_EDID.mask:
            raise CommandError(CtrlType.RESP_ERR_UNSPEC, "GET_EDID without F_EDID", cmd.hdr)
        if cmd.scanout >= self.cfg.num_scanouts:
            raise CommandError(CtrlType.RESP_ERR_INVALID_SCANOUT_ID, f"no scanout {cmd.scanout}", cmd.hdr)
        mode = self._modes()[cmd.scanout]
        w, h = (mode.r.width, mode.r.height) if mode.r.width and mode.r.height else (self.cfg.width,
                                                                                        self.cfg.height)
        return responses.edid(cmd.hdr, build_edid(w, h, serial=cmd.scanout))

