"""A VMM's display for the commands entry point: the other end of the vhost-user-gpu socket, on a thread.

It answers what QEMU's display answers (protocol features, display info, EDID, the DMABUF_UPDATE ack) and reads
and drops everything else (scanouts, frames, cursors, closing the dma-buf fds that come with them), so the device's
display paths run as they do under QEMU. Unlike the tests' `frontend.Display` it records nothing: a fuzz input may
send hundreds of megabytes of frames.
"""

from __future__ import annotations

import socket
import threading
from typing import Final

from vgpu.protocol import CtrlHdr, DisplayOne, Rect, build_edid, responses
from vgpu.vhost_user.frontend import DISPLAY_MAX_PAYLOAD
from vgpu.vhost_user.message import Channel, ProtocolError
from vgpu.vhost_user.wire import FLAG_REPLY, GpuProtocolFeature, GpuRequest, bit, build_u64

WIDTH, HEIGHT = 1024, 768
FEATURES: Final = bit(GpuProtocolFeature.EDID) | bit(GpuProtocolFeature.DMABUF2)
_ANSWERS: Final = {
    GpuRequest.GET_PROTOCOL_FEATURES: build_u64(FEATURES),
    GpuRequest.GET_DISPLAY_INFO: responses.display_info(CtrlHdr(0), [DisplayOne(Rect(0, 0, WIDTH, HEIGHT), True)]),
    GpuRequest.GET_EDID: responses.edid(CtrlHdr(0), build_edid(WIDTH, HEIGHT)),
    GpuRequest.DMABUF_UPDATE: b"",
}


class DisplayPeer(threading.Thread):
    """Serves `sock` until the back end closes its end."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True, name="fuzz-display")
        self.channel = Channel(sock, check_version=False, max_payload=DISPLAY_MAX_PAYLOAD)

    def run(self) -> None:
        try:
            while True:
                msg = self.channel.recv()
                msg.close_fds()
                answer = _ANSWERS.get(msg.request)  # type: ignore[call-overload]
                if answer is not None:
                    self.channel.send(msg.request, FLAG_REPLY, answer)
        except (ProtocolError, OSError):
            pass  # the back end closed the display (device reset), or broke the stream
        finally:
            self.channel.close()
