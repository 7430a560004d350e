"""What a Wayland compositor shows, pixel for pixel: weston's ``weston_screenshooter`` from a client of our own.

Debian ships no description of that protocol, so its one request and one event are declared here with
pywayland's protocol core (the interface as weston 10 serves it: ``take_shot(wl_output, wl_buffer)`` copies the
output into a wl_shm buffer of the output's size, then ``done``).  Weston serves it only when started with
``--debug`` (see :mod:`vgpu_lab.weston`).  Every wait is bounded, so a stuck compositor fails a test instead of
hanging it.
"""

from __future__ import annotations

import mmap
import os
import select
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt
from pywayland.client.display import Display
from pywayland.protocol.wayland import WlBuffer, WlOutput, WlShm
from pywayland.protocol_core.argument import Argument
from pywayland.protocol_core.globals import Global
from pywayland.protocol_core.interface import Interface
from pywayland.protocol_core.proxy import Proxy
from pywayland.protocol_core.resource import Resource
from pywayland.scanner.argument import ArgumentType


class WestonScreenshooter(Interface):
    """weston_screenshooter, version 1 (weston <= 10)."""

    name = "weston_screenshooter"
    version = 1


class WestonScreenshooterProxy(Proxy[WestonScreenshooter]):
    interface = WestonScreenshooter

    @WestonScreenshooter.request(
        Argument(ArgumentType.Object, interface=WlOutput),
        Argument(ArgumentType.Object, interface=WlBuffer),
    )
    def take_shot(self, output: Any, buffer: Any) -> None:
        self._marshal(0, output, buffer)


class WestonScreenshooterResource(Resource[WestonScreenshooter]):
    interface = WestonScreenshooter

    @WestonScreenshooter.event()
    def done(self) -> None:
        self._post_event(0)


class WestonScreenshooterGlobal(Global[WestonScreenshooter]):
    interface = WestonScreenshooter


WestonScreenshooter._gen_c()
WestonScreenshooter.proxy_class = WestonScreenshooterProxy
WestonScreenshooter.resource_class = WestonScreenshooterResource
WestonScreenshooter.global_class = WestonScreenshooterGlobal


class CaptureError(RuntimeError):
    pass


class Capture:
    """A connection to the compositor that takes screenshots of its first output, as (h, w, 3) R, G, B."""

    def __init__(self, env: dict[str, str], timeout: float = 10.0) -> None:
        self.timeout = timeout
        runtime, name = env["XDG_RUNTIME_DIR"], env["WAYLAND_DISPLAY"]
        self.display = Display(os.path.join(runtime, name))
        self.display.connect()
        self.size: tuple[int, int] | None = None
        self._globals: dict[str, tuple[int, int]] = {}
        registry = self.display.get_registry()
        registry.dispatcher["global"] = lambda _r, n, iface, v: self._globals.__setitem__(iface, (n, v))
        self._wait(lambda: False, sync=True)
        for need in ("wl_output", "wl_shm", "weston_screenshooter"):
            if need not in self._globals:
                raise CaptureError(f"the compositor offers no {need} (weston needs --debug for the screenshooter)")
        self.output = registry.bind(self._globals["wl_output"][0], WlOutput, 1)
        self.output.dispatcher["mode"] = self._mode
        self.shm = registry.bind(self._globals["wl_shm"][0], WlShm, 1)
        self.shooter = registry.bind(self._globals["weston_screenshooter"][0], WestonScreenshooter, 1)
        self._registry = registry
        self._wait(lambda: self.size is not None, sync=True)

    def _mode(self, _output: Any, flags: int, width: int, height: int, _refresh: int) -> None:
        if flags & 1:  # WL_OUTPUT_MODE_CURRENT
            self.size = (width, height)

    def _wait(self, done: Callable[[], bool], sync: bool = False) -> None:
        synced: list[bool] = []
        if sync:
            cb = self.display.sync()
            cb.dispatcher["done"] = lambda _cb, _d: synced.append(True)
        deadline = time.monotonic() + self.timeout
        fd = self.display.get_fd()
        while not (done() or (sync and synced)):
            self.display.flush()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CaptureError(f"the compositor did not answer within {self.timeout:.0f} s")
            if select.select([fd], [], [], remaining)[0]:
                self.display.read()
                self.display.dispatch(block=False)

    def rgb(self) -> npt.NDArray[np.uint8]:
        """The output now, (height, width, 3) R, G, B."""
        assert self.size is not None
        width, height = self.size
        size = width * height * 4
        fd = os.memfd_create("vgpu-capture", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            with mmap.mmap(fd, size) as m:
                pool = self.shm.create_pool(fd, size)
                buffer = pool.create_buffer(0, width, height, width * 4, WlShm.format.xrgb8888.value)
                pool.destroy()
                shot: list[bool] = []
                self.shooter.dispatcher["done"] = lambda _s: shot.append(True)
                self.shooter.take_shot(self.output, buffer)
                self._wait(lambda: bool(shot))
                buffer.destroy()
                self.display.flush()
                bgrx = np.frombuffer(m, np.uint8).reshape(height, width, 4)
                out = np.ascontiguousarray(bgrx[..., 2::-1])
                del bgrx
                return out
        finally:
            os.close(fd)

    def close(self) -> None:
        # pywayland must disconnect before the interpreter exits (else it crashes at exit).
        self.display.disconnect()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def find(frame: npt.NDArray[np.uint8], image: npt.NDArray[np.uint8]) -> tuple[int, int] | None:
    """Where `image` (h, w, 3) appears whole in `frame`, or None (the shell places windows where it likes).
    Candidates are the places of its first pixel whose other three corners also match (a console's black
    background has thousands of the first), then compared in full."""
    h, w = image.shape[:2]
    fh, fw = frame.shape[:2]
    if h > fh or w > fw:
        return None
    ys, xs = np.nonzero(np.all(frame[:fh - h + 1, :fw - w + 1] == image[0, 0], axis=2))
    for dy, dx in ((0, w - 1), (h - 1, 0), (h - 1, w - 1)):
        keep = np.all(frame[ys + dy, xs + dx] == image[dy, dx], axis=1)
        ys, xs = ys[keep], xs[keep]
    for y, x in zip(ys.tolist(), xs.tolist(), strict=True):
        if np.array_equal(frame[y:y + h, x:x + w], image):
            return x, y
    return None
