"""wl_shm buffers over memfds, and the damage bookkeeping that keeps each of them current.

Every buffer has a pool (and a memfd) of its own: buffers come and go with a scanout's size, and a wl_shm pool
can grow but never shrink.  Our fd is closed as soon as the pool exists (libwayland sent a duplicate), so the
mapping is the only thing a buffer holds besides its proxy.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import numpy as np
from pywayland.protocol.wayland import WlShm

if TYPE_CHECKING:
    import numpy.typing as npt
    from pywayland.protocol.wayland import WlBufferProxy, WlShmProxy

#: wl_shm's own codes for the two formats every compositor supports (other formats are DRM fourccs).
SHM_ARGB8888: Final = int(WlShm.format.argb8888)
SHM_XRGB8888: Final = int(WlShm.format.xrgb8888)

Rect = tuple[int, int, int, int]  # x, y, width, height
#: Beyond this many rectangles a damage list becomes its bounding box: cheaper to copy a little more than to
#: walk (and send) hundreds of small rectangles after a busy frame.
MAX_RECTS: Final = 8


def add_damage(rects: list[Rect], r: Rect) -> None:
    rects.append(r)
    if len(rects) > MAX_RECTS:
        x0 = min(x for x, _, _, _ in rects)
        y0 = min(y for _, y, _, _ in rects)
        x1 = max(x + w for x, _, w, _ in rects)
        y1 = max(y + h for _, y, _, h in rects)
        rects[:] = [(x0, y0, x1 - x0, y1 - y0)]


class ShmBuffer:
    """One width x height wl_buffer of 4-byte pixels, its pixels as a numpy view, and whether the compositor
    still holds it (from attach until its release event)."""

    def __init__(self, shm: WlShmProxy, width: int, height: int, fmt: int) -> None:
        self.width, self.height = width, height
        stride = width * 4
        size = stride * height
        fd = os.memfd_create("vgpu-wl-shm", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
            pool = shm.create_pool(fd, size)
        finally:
            os.close(fd)
        self.wl: WlBufferProxy = pool.create_buffer(0, width, height, stride, fmt)
        pool.destroy()
        self.pixels: npt.NDArray[np.uint8] | None = np.frombuffer(self._map, np.uint8).reshape(height, width, 4)
        self.busy = False
        # What changed in the image since this buffer last held it (see ScanoutWindow): a new buffer missed all.
        self.missed: list[Rect] = [(0, 0, width, height)]
        # Called when the compositor gives the buffer back (a window waiting for a free buffer commits then).
        self.on_release: Callable[[], None] | None = None
        self.wl.dispatcher["release"] = self._released

    def _released(self, _buffer: WlBufferProxy) -> None:
        self.busy = False
        if self.on_release is not None:
            self.on_release()

    def destroy(self) -> None:
        """Give the buffer back (the compositor keeps its own mapping while it still shows it)."""
        if self.pixels is None:
            return
        self.wl.destroy()
        self.pixels = None  # the view must go before the mapping can close
        self._map.close()
