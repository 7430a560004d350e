"""The display layout the device answers GET_DISPLAY_INFO with, as QEMU's vhost-user-gpu front end drives it.

QEMU never tells the back end that its layout changed: it keeps EVENT_DISPLAY in its own copy of the config space
and forwards every guest read (GET_CONFIG) and write (SET_CONFIG, its whole 16-byte copy) of that space to us.
So the device may keep the layout between queries, but must ask the display again after any config access.
These tests count the GET_DISPLAY_INFO requests the front end's display receives. The last one reproduces a
deadlock the end-to-end resize found: QEMU stops reading the display socket while the guest's vCPU waits for our
answer to a config access, so a back end blocked writing a frame to that socket never answers.
"""

from __future__ import annotations

import fcntl
import struct
import sys
import termios
import threading
import time

import pytest

from vgpu.conformance.process import BackendProcess
from vgpu.procfs import wait_until
from vgpu.protocol import CtrlHdr, CtrlType, DisplayOne, GetDisplayInfo, Rect, encode_command, responses
from vgpu.protocol import structs as s
from vgpu.session import Session, pattern
from vgpu.vhost_user.frontend import Display
from vgpu.vhost_user.message import Message
from vgpu.vhost_user.wire import GpuRequest

pytestmark = pytest.mark.vgpu("--log-level=info")


def layout(width: int, height: int) -> bytes:
    return responses.display_info(CtrlHdr(0), [DisplayOne(Rect(0, 0, width, height), True)])


def guest_asks(gpu: Session) -> tuple[int, int]:
    """What the guest is told for scanout 0."""
    resp = s.resp_display_info.parse(gpu.cmd(encode_command(GetDisplayInfo(CtrlHdr(
        CtrlType.CMD_GET_DISPLAY_INFO))), 408))
    assert resp.hdr.type == CtrlType.RESP_OK_DISPLAY_INFO
    return resp.pmodes[0].r.width, resp.pmodes[0].r.height


def test_layout_is_asked_again_only_after_a_config_access(vgpu: BackendProcess) -> None:
    size = [(1152, 864)]
    display = Display(lambda: layout(*size[0]))
    gpu = Session.open(vgpu.socket_path, display=display)

    def asked() -> int:
        return len(display.of(GpuRequest.GET_DISPLAY_INFO))

    try:
        assert guest_asks(gpu) == (1152, 864)
        assert asked() == 1
        # Further queries cost no round trip to the display.
        for _ in range(3):
            assert guest_asks(gpu) == (1152, 864)
        assert asked() == 1
        # The front end's layout changes without a word to the back end (QEMU's way): still no round trip ...
        size[0] = (1024, 768)
        assert guest_asks(gpu) == (1152, 864) and asked() == 1
        # ... until the guest reads the config space (QEMU forwards the read as GET_CONFIG), as the Linux driver
        # does before it asks again; then once, and cached again.
        gpu.fe.get_config(0, 16)
        assert guest_asks(gpu) == (1024, 768) and asked() == 2
        assert guest_asks(gpu) == (1024, 768) and asked() == 2
        # A write of events_clear drops the layout too, as the guest writes it ...
        size[0] = (800, 600)
        gpu.fe.set_config(4, struct.pack("<I", 1))
        assert guest_asks(gpu) == (800, 600) and asked() == 3
        # ... and as QEMU forwards it: its whole copy of the config space, read-only fields included.
        size[0] = (640, 480)
        whole = bytearray(gpu.fe.get_config(0, 16))
        struct.pack_into("<I", whole, 4, 1)
        struct.pack_into("<I", whole, 8, 7)  # num_scanouts: read-only, ignored
        gpu.fe.set_config(0, bytes(whole))
        assert s.config.parse(gpu.fe.get_config(0, 16)).num_scanouts == 1
        assert guest_asks(gpu) == (640, 480) and asked() == 4
        assert guest_asks(gpu) == (640, 480) and asked() == 4
    finally:
        gpu.close()


def test_whole_config_write_clears_the_display_event(vgpu: BackendProcess) -> None:
    gpu = Session.open(vgpu.socket_path)
    try:
        guest_asks(gpu)
        gpu.fe.set_display(Display(lambda: layout(800, 600)))  # a new layout: the device raises EVENT_DISPLAY
        assert wait_until(lambda: s.config.parse(gpu.fe.get_config(0, 16)).events_read == 1)
        whole = bytearray(gpu.fe.get_config(0, 16))
        struct.pack_into("<I", whole, 4, 1)
        gpu.fe.set_config(0, bytes(whole))
        assert s.config.parse(gpu.fe.get_config(0, 16)).events_read == 0
    finally:
        gpu.close()


class StallingDisplay(Display):
    """A display whose reader stops at an UPDATE until released, like QEMU's main loop while a vCPU waits."""

    def __init__(self) -> None:
        super().__init__(lambda: layout(1024, 768))
        self.stall = False
        self.stalled = threading.Event()
        self.release = threading.Event()

    def handle(self, msg: Message) -> None:
        if self.stall and msg.request == GpuRequest.UPDATE:
            self.stalled.set()
            self.release.wait(30)
        super().handle(msg)


def _unread(sock_fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(sock_fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder)


def _holds_still(sock_fd: int) -> bool:
    before = _unread(sock_fd)
    time.sleep(0.2)
    return _unread(sock_fd) == before


def test_config_space_is_served_while_the_display_is_not_reading(vgpu: BackendProcess) -> None:
    display = StallingDisplay()
    gpu = Session.open(vgpu.socket_path, display=display)
    full = Rect(0, 0, 1024, 768)  # 3 MiB a frame: far more than a socket buffer holds
    errors: list[BaseException] = []

    def flush_twice() -> None:
        try:
            gpu.flush(1, full)  # read whole by the display, which then stops
            gpu.flush(1, full)  # fills the socket: the back end cannot finish sending it
        except BaseException as e:
            errors.append(e)

    flusher = threading.Thread(target=flush_twice)
    try:
        gpu.image_2d(1, 1024, 768, pixels=pattern(1024, 768))
        gpu.show(1, 0, full)
        gpu.flush(1, full)
        display.wait_for(GpuRequest.UPDATE)
        display.stall = True
        flusher.start()
        assert display.stalled.wait(10)
        channel = display.channel
        assert channel is not None
        # Full: bytes wait unread and stop growing. (How many a full socket holds depends on the kernel and on how
        # the sender cut its writes into buffers: 91 KB were seen here, so no more than 32 KiB is demanded.)
        assert wait_until(lambda: _unread(channel.fileno()) > 32 << 10, 10), "the back end never filled the socket"
        assert wait_until(lambda: _holds_still(channel.fileno()), 10), "the socket never filled up"
        # The back end is mid-frame on a full socket; the guest reads and writes config, QEMU-style.
        config = gpu.fe.get_config(0, 16)
        gpu.fe.set_config(0, config[:4] + struct.pack("<I", 1) + config[8:])
        assert flusher.is_alive(), "the frame went out although the display never read it"
        display.release.set()
        flusher.join(30)
        assert not flusher.is_alive() and not errors, errors
        # Nothing was lost or cut short: the display got every frame whole.
        updates = display.wait_for(GpuRequest.UPDATE, 3)
        assert [Display.update_rect(u.payload) for u in updates] == [(0, 0, 0, 1024, 768)] * 3
    finally:
        display.release.set()
        if flusher.ident is not None:
            flusher.join(30)
        gpu.close()
