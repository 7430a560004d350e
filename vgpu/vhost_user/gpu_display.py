"""The back end's side of the vhost-user-gpu display socket (QEMU `docs/interop/vhost-user-gpu.rst`).

QEMU hands the socket over with GPU_SET_SOCKET when the guest driver is ready.  Queries (display info, EDID) block
on QEMU's reply; they wait through `Transport.wait_reply`, and sends that fill the socket wait through
`Transport.wait_writable`, both of which keep the front-end socket served meanwhile.
Payloads that are virtio-gpu structs (display info, EDID) pass through as bytes: their layout belongs to the GPU
protocol layer, not to this transport.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from typing import Final

from .device import BackendChannelError, Transport
from .message import Buffer, Channel, ProtocolError
from .wire import (
    GPU_CURSOR_POS_ST,
    GPU_CURSOR_SIZE,
    GPU_UPDATE_ST,
    GpuCursorUpdate,
    GpuDmabufScanout,
    GpuDmabufScanout2,
    GpuEdidRequest,
    GpuProtocolFeature,
    GpuRequest,
    GpuScanout,
    bit,
    build,
    build_u64,
    parse_u64,
)

log = logging.getLogger("vgpu.vhost_user.display")

# What we can use of the display protocol.
SUPPORTED: Final = bit(GpuProtocolFeature.EDID) | bit(GpuProtocolFeature.DMABUF2)
REPLY_TIMEOUT: Final = 5.0
#: How long a display may leave a message half sent before we give up on it (a frame is megabytes).
SEND_TIMEOUT: Final = 10.0


class DisplayError(Exception):
    """The display socket failed or the front end did not answer."""


class DisplayClient:
    """Owns the display socket; every method sends one message (queries wait for the answer)."""

    def __init__(self, transport: Transport, sock: socket.socket,
                 on_ready: Callable[[], None] | None = None) -> None:
        self.transport = transport
        # Called once the front end has answered the feature negotiation: it is listening now.
        self.on_ready = on_ready
        self.channel = Channel(sock, check_version=False)
        self.features = 0
        self._negotiating = False
        self.transport.watch(self.channel.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        # Outside a query: the answer to our GET_PROTOCOL_FEATURES, unsolicited traffic, or EOF (QEMU closes the
        # socket when the guest resets).
        try:
            self.channel.fill()
        except ProtocolError:
            log.info("display socket closed by the front end")
            self.close()
            return
        while (msg := self.channel.poll()) is not None:
            msg.close_fds()
            if self._negotiating and msg.is_reply and msg.request == GpuRequest.GET_PROTOCOL_FEATURES:
                try:
                    self._finish_negotiation(msg.payload)
                except DisplayError as e:
                    # The front end went away mid-negotiation: the display is gone, the device carries on.
                    log.info("display negotiation ended: %s", e)
                    return
                if self.on_ready is not None and not self.channel.closed:
                    self.on_ready()
            else:
                log.debug("ignoring display message %d", msg.request)
    @property
    def alive(self) -> bool:
        return not self.channel.closed

    def _send(self, req: GpuRequest, payload: bytes | Sequence[Buffer] = b"", fds: list[int] | None = None) -> None:
        if self.channel.closed:
            raise DisplayError("display socket is closed")
        # Never block on a full socket: QEMU reads it from its main loop, which may itself be waiting for our
        # answer to GET_CONFIG or SET_CONFIG (the guest's vCPU holds QEMU's big lock while it reads or writes the
        # config space), so we keep serving the front end until the display takes the rest.
        try:
            self.channel.send(req, 0, payload, fds,
                              wait_writable=lambda: self.transport.wait_writable(self.channel.sock, SEND_TIMEOUT))
        except (OSError, BackendChannelError) as e:
            self.close()  # a message cut short leaves the stream unusable
            raise DisplayError(f"display socket: {e}") from e

    def _query(self, req: GpuRequest, payload: bytes = b"") -> bytes:
        if self._negotiating:
            self.negotiate()
        self._send(req, payload)
        try:
            msg = self.transport.wait_reply(self.channel, req, REPLY_TIMEOUT)
        except Exception as e:
            raise DisplayError(f"no answer to {req.name}: {e}") from e
        msg.close_fds()
        return msg.payload

    def start_negotiation(self) -> None:
        """Ask for the front end's protocol features without waiting: QEMU hands the socket over while it is busy
        starting the rings, and answers only when its main loop is free again."""
        self._send(GpuRequest.GET_PROTOCOL_FEATURES)
        self._negotiating = True

    def _finish_negotiation(self, payload: bytes) -> None:
        self._negotiating = False
        if len(payload) != 8:
            log.warning("bad GET_PROTOCOL_FEATURES reply of %d bytes; using no display features", len(payload))
            return
        self.features = parse_u64(payload) & SUPPORTED
        self._send(GpuRequest.SET_PROTOCOL_FEATURES, build_u64(self.features))

    def negotiate(self) -> int:
        """Finish the feature negotiation (waiting for the answer if it has not come yet)."""
        if not self._negotiating:
            self.start_negotiation()
        try:
            msg = self.transport.wait_reply(self.channel, GpuRequest.GET_PROTOCOL_FEATURES, REPLY_TIMEOUT)
        except Exception as e:
            raise DisplayError(f"no answer to GET_PROTOCOL_FEATURES: {e}") from e
        msg.close_fds()
        self._finish_negotiation(msg.payload)
        return self.features

    def has(self, feature: GpuProtocolFeature) -> bool:
        if self._negotiating:
            try:
                self.negotiate()
            except DisplayError as e:
                log.warning("display: %s", e)
        return bool(self.features & bit(feature))

    def display_info(self) -> bytes:
        """The front end's virtio_gpu_resp_display_info, as bytes."""
        return self._query(GpuRequest.GET_DISPLAY_INFO)

    def edid(self, scanout_id: int) -> bytes:
        """The front end's virtio_gpu_resp_edid for a scanout, as bytes (needs the EDID feature)."""
        if not self.has(GpuProtocolFeature.EDID):
            raise DisplayError("the front end did not negotiate EDID")
        return self._query(GpuRequest.GET_EDID, build(GpuEdidRequest, scanout_id=scanout_id))

    def scanout(self, scanout_id: int, width: int, height: int) -> None:
        self._send(GpuRequest.SCANOUT, build(GpuScanout, scanout_id=scanout_id, width=width, height=height))

    def update(self, scanout_id: int, x: int, y: int, width: int, height: int, pixels: Buffer) -> None:
        """`pixels`: height rows of width x8r8g8b8 pixels, any buffer (sent as is, not copied into the message)."""
        self._send(GpuRequest.UPDATE, (GPU_UPDATE_ST.pack(scanout_id, x, y, width, height), pixels))

    def cursor_pos(self, scanout_id: int, x: int, y: int, hide: bool = False) -> None:
        req = GpuRequest.CURSOR_POS_HIDE if hide else GpuRequest.CURSOR_POS
        self._send(req, GPU_CURSOR_POS_ST.pack(scanout_id, x, y))

    def cursor_update(self, scanout_id: int, x: int, y: int, hot_x: int, hot_y: int, argb: bytes) -> None:
        if len(argb) != GPU_CURSOR_SIZE * GPU_CURSOR_SIZE * 4:
            raise ValueError("cursor image must be 64x64 ARGB")
        self._send(GpuRequest.CURSOR_UPDATE, build(
            GpuCursorUpdate, pos=dict(scanout_id=scanout_id, x=x, y=y), hot_x=hot_x, hot_y=hot_y, data=argb))

    def dmabuf_scanout(self, scanout_id: int, rect: tuple[int, int, int, int], fd: int, fd_width: int,
                       fd_height: int, stride: int, flags: int, fourcc: int, modifier: int | None) -> None:
        """Show a dma-buf; DMABUF_SCANOUT2 (with the modifier) when negotiated."""
        x, y, w, h = rect
        base = dict(scanout_id=scanout_id, x=x, y=y, width=w, height=h, fd_width=fd_width, fd_height=fd_height,
                    fd_stride=stride, fd_flags=flags, fd_drm_fourcc=fourcc)
        if modifier is not None and self.has(GpuProtocolFeature.DMABUF2):
            self._send(GpuRequest.DMABUF_SCANOUT2, build(GpuDmabufScanout2, dmabuf_scanout=base,
                                                         modifier=modifier), [fd])
        else:
            self._send(GpuRequest.DMABUF_SCANOUT, build(GpuDmabufScanout, **base), [fd])

    def dmabuf_update(self, scanout_id: int, x: int, y: int, width: int, height: int) -> None:
        """DMABUF_UPDATE waits for the front end's (empty) reply: it has finished reading the buffer."""
        self._query(GpuRequest.DMABUF_UPDATE, GPU_UPDATE_ST.pack(scanout_id, x, y, width, height))

    def close(self) -> None:
        if not self.channel.closed:
            self.transport.unwatch(self.channel.fileno())
            self.channel.close()


