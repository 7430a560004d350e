"""The linux-dmabuf path against the protocol, with a FAKE compositor: no compositor on this machine kind offers
zwp_linux_dmabuf_v1 (no DRM device, software rendering only; see the README), so this one is a few lines of
wire format in a thread that offers it, lists XRGB8888 with the linear modifier, and records what our display
sends.  Checked: the requests a dma-buf scanout makes (create_params, add with the very buffer's fd and its
offset, stride and modifier, create_immed with its size and fourcc) and that the window attaches that buffer.
Not checked, because nothing here can: that a real compositor imports and shows it.
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from vgpu.display.sink import DmabufImage
from vgpu.display.wayland import WaylandDisplay

XRGB8888 = 0x34325258
GLOBALS = [(1, "wl_compositor", 4), (2, "wl_shm", 1), (3, "xdg_wm_base", 1), (4, "zwp_linux_dmabuf_v1", 3)]


def message(obj: int, opcode: int, payload: bytes = b"") -> bytes:
    return struct.pack("<II", obj, (8 + len(payload)) << 16 | opcode) + payload


def string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<I", len(raw)) + raw + b"\0" * (-len(raw) % 4)


def read_string(payload: bytes, at: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<I", payload, at)
    return payload[at + 4:at + 4 + n - 1].decode(), at + 4 + n + (-n % 4)


@dataclass
class Fake:
    """What the fake compositor saw: objects by interface, the dma-buf requests, and what was attached."""

    objects: dict[int, str] = field(default_factory=lambda: {1: "wl_display"})
    requests: list[tuple[str, int, bytes]] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    attached: list[int] = field(default_factory=list)
    error: BaseException | None = None


def serve(listener: socket.socket, fake: Fake, done: threading.Event) -> None:
    try:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            buf = b""
            surface_ids: set[int] = set()
            xdg_surface = 0
            configured = False
            while not done.is_set():
                data, fds, _, _ = socket.recv_fds(conn, 65536, 16)
                if not data:
                    return
                fake.fds += fds
                buf += data
                while len(buf) >= 8:
                    obj, word = struct.unpack_from("<II", buf)
                    size, opcode = word >> 16, word & 0xFFFF
                    if len(buf) < size:
                        break
                    payload, buf = buf[8:size], buf[size:]
                    iface = fake.objects.get(obj, "?")
                    fake.requests.append((iface, opcode, payload))
                    out = b""
                    if iface == "wl_display" and opcode == 1:  # get_registry
                        (rid,) = struct.unpack("<I", payload)
                        fake.objects[rid] = "wl_registry"
                        for name, gname, version in GLOBALS:
                            out += message(rid, 0, struct.pack("<I", name) + string(gname) +
                                           struct.pack("<I", version))
                    elif iface == "wl_display" and opcode == 0:  # sync
                        (cb,) = struct.unpack("<I", payload)
                        out += message(cb, 0, struct.pack("<I", 0)) + message(1, 1, struct.pack("<I", cb))
                    elif iface == "wl_registry" and opcode == 0:  # bind
                        gname, at = read_string(payload, 4)
                        _version, new = struct.unpack_from("<II", payload, at)
                        fake.objects[new] = gname
                        if gname == "wl_shm":
                            out += message(new, 0, struct.pack("<I", 1))  # xrgb8888
                        elif gname == "zwp_linux_dmabuf_v1":
                            out += message(new, 0, struct.pack("<I", XRGB8888))
                            out += message(new, 1, struct.pack("<III", XRGB8888, 0, 0))  # linear
                    elif iface == "wl_compositor" and opcode == 0:
                        (new,) = struct.unpack("<I", payload)
                        fake.objects[new] = "wl_surface"
                        surface_ids.add(new)
                    elif iface == "xdg_wm_base" and opcode == 2:
                        new, _surface = struct.unpack("<II", payload)
                        fake.objects[new] = "xdg_surface"
                        xdg_surface = new
                    elif iface == "xdg_surface" and opcode == 1:
                        (new,) = struct.unpack("<I", payload)
                        fake.objects[new] = "xdg_toplevel"
                    elif iface == "zwp_linux_dmabuf_v1" and opcode == 1:
                        (new,) = struct.unpack("<I", payload)
                        fake.objects[new] = "zwp_linux_buffer_params_v1"
                    elif iface == "zwp_linux_buffer_params_v1" and opcode == 3:  # create_immed
                        (new,) = struct.unpack_from("<I", payload)
                        fake.objects[new] = "wl_buffer"
                    elif iface == "wl_surface" and opcode == 6 and not configured:  # the first commit
                        configured = True
                        out += message(xdg_surface, 0, struct.pack("<I", 7))
                    elif iface == "wl_surface" and opcode == 1:  # attach
                        fake.attached.append(struct.unpack_from("<I", payload)[0])
                        done.set()
                    if out:
                        conn.sendall(out)
    except BaseException as e:
        fake.error = e
    finally:
        done.set()


def test_fake_compositor_dmabuf_scanout_sends_the_buffer_itself() -> None:
    path = Path(tempfile.mkdtemp(prefix="vgpu-fake-wl-", dir="/tmp")) / "wl"
    fake, done = Fake(), threading.Event()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    thread = threading.Thread(target=serve, args=(listener, fake, done), daemon=True)
    thread.start()
    memfd = os.memfd_create("stand-in-dmabuf")  # any fd: the fake compositor imports nothing
    try:
        display = WaylandDisplay(str(path))
        try:
            assert display.takes_dmabuf
            image = DmabufImage(fd=memfd, width=64, height=32, stride=320, offset=4096, fourcc=XRGB8888, modifier=0)
            display.show(0, 64, 32, image)
            deadline = time.monotonic() + 10
            while not done.is_set() and time.monotonic() < deadline:
                display.service()
                time.sleep(0.01)
            assert fake.error is None, fake.error
            windows = display.status()["windows"]
            assert isinstance(windows, list) and [w["buffer"] for w in windows] == ["linux-dmabuf"]
        finally:
            display.close()
        thread.join(5)
        named = [(i, op, p) for i, op, p in fake.requests if i in ("zwp_linux_dmabuf_v1", "zwp_linux_buffer_params_v1")]
        assert [(i, op) for i, op, _ in named] == [("zwp_linux_dmabuf_v1", 1), ("zwp_linux_buffer_params_v1", 1),
                                                   ("zwp_linux_buffer_params_v1", 3)]
        # add(fd, plane 0, offset, stride, modifier hi, lo): the fd travels out of band.
        assert struct.unpack("<5I", named[1][2]) == (0, 4096, 320, 0, 0)
        (fd,) = fake.fds
        try:
            assert os.fstat(fd).st_ino == os.fstat(memfd).st_ino, "the buffer sent is not the scanout's dma-buf"
        finally:
            os.close(fd)
        new, width, height, fourcc, flags = struct.unpack("<IiiII", named[2][2])
        assert (width, height, fourcc, flags) == (64, 32, XRGB8888, 0)
        # Once configured, the window attaches that very wl_buffer (no wl_shm pool was ever made).
        assert fake.attached == [new]
        assert not any(i == "wl_shm" for i, _, _ in fake.requests)
    finally:
        os.close(memfd)
        listener.close()
        path.unlink(missing_ok=True)
        path.parent.rmdir()
