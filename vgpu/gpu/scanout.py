"""Scanouts: which resource (or which part of a guest blob) each output shows, and getting its pixels out.

Pixels leave in two ways: to the VMM's display over the vhost-user-gpu socket (SCANOUT + UPDATE), and as PNG
pictures in a directory, at most `png_rate` per second per scanout, so a person can see what the guest shows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..blob.bufferio import read_host
from ..blob.types import HostBuffer
from ..protocol import Rect
from ..vhost_user.memory import GuestMemory
from .backing import BackingError
from .formats import BPP, bgr_order, to_bgra, to_rgb
from .png import encode, write_atomically
from .resources import Resource

if TYPE_CHECKING:
    import numpy.typing as npt

log = logging.getLogger("vgpu.gpu.scanout")


NO_RECT = Rect(0, 0, 0, 0)


@dataclass(frozen=True)
class BlobLayout:
    """What SET_SCANOUT_BLOB said about the blob's image: its size, format and where plane 0 lives."""

    width: int
    height: int
    format: int
    stride: int
    offset: int


@dataclass
class Scanout:
    id: int
    resource: Resource | None = None
    rect: Rect = NO_RECT
    blob: BlobLayout | None = None
    # The dma-buf the display was given for this scanout (owned by the resource), or None: pixels are copied.
    dmabuf: HostBuffer | None = None
    last_png: float = 0.0
    # A flush skipped by the rate limit: the picture is owed, and written when the interval has passed.
    png_owed: bool = False

    @property
    def enabled(self) -> bool:
        return self.resource is not None

    @property
    def format(self) -> int:
        if self.blob is not None:
            return self.blob.format
        assert self.resource is not None
        return self.resource.format

    def pixels(self, memory: GuestMemory, r: Rect) -> npt.NDArray[np.uint8]:
        """(h, w, 4) pixels of resource rectangle `r` (absolute resource coordinates) in the source format."""
        res = self.resource
        assert res is not None
        if self.blob is None:
            assert res.pixels is not None
            rows = res.pixels[r.y:r.y + r.height, r.x * BPP:(r.x + r.width) * BPP]
            return rows.reshape(r.height, r.width, BPP)
        b = self.blob
        start = b.offset + r.y * b.stride + r.x * BPP
        if res.backing is not None and res.host_buffer is None:
            # Read-only (a view of the backing's alias when it has one): every caller converts, which copies.
            rows = res.backing.read_rows(memory, start, b.stride, r.width * BPP, r.height)
            return rows.reshape(r.height, r.width, BPP)
        if res.host_buffer is None:
            raise BackingError("blob has no memory to show")
        span = (r.height - 1) * b.stride + r.width * BPP
        buf = np.empty(r.height * b.stride, dtype=np.uint8)
        try:
            buf[:span] = np.frombuffer(read_host(res.host_buffer, start, span), dtype=np.uint8)
        except (ValueError, OSError) as e:
            raise BackingError(str(e)) from e
        return buf.reshape(r.height, b.stride)[:, :r.width * BPP].reshape(r.height, r.width, BPP)


def intersect(a: Rect, b: Rect) -> Rect | None:
    x0, y0 = max(a.x, b.x), max(a.y, b.y)
    x1, y1 = min(a.x + a.width, b.x + b.width), min(a.y + a.height, b.y + b.height)
    if x1 <= x0 or y1 <= y0:
        return None
    return Rect(x0, y0, x1 - x0, y1 - y0)


class PictureWriter:
    """Writes `scanout-N.png` (what scanout N shows, rate-limited) and `cursor-N.png` (the cursor image sent for
    scanout N).  With `history`, every picture is also kept as `scanout-N-SEQ.png` / `cursor-N-SEQ.png`."""

    def __init__(self, directory: Path, rate: float, history: bool = False) -> None:
        self.directory = directory
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.history = history
        self.seq = 0
        directory.mkdir(parents=True, exist_ok=True)

    def _write(self, name: str, rgb: npt.NDArray[np.uint8]) -> None:
        data = encode(rgb)
        write_atomically(self.directory / f"{name}.png", data)
        if self.history:
            self.seq += 1
            write_atomically(self.directory / f"{name}-{self.seq:06d}.png", data)

    def cursor(self, scanout_id: int, argb: npt.NDArray[np.uint8]) -> None:
        """(64, 64, 4) B, G, R, A cursor pixels as sent to the display."""
        self._write(f"cursor-{scanout_id}", np.ascontiguousarray(argb[..., [2, 1, 0]]))

    def due_in(self, s: Scanout) -> float:
        """Seconds until scanout `s` may have its next picture."""
        return max(0.0, s.last_png + self.interval - time.monotonic())

    def maybe_write(self, s: Scanout, memory: GuestMemory, force: bool = False) -> bool:
        """Write the picture now if the rate allows; otherwise mark it owed and return False."""
        now = time.monotonic()
        if not force and now - s.last_png < self.interval:
            s.png_owed = True
            return False
        s.last_png = now
        s.png_owed = False
        try:
            rgb = to_rgb(s.pixels(memory, s.rect), s.format)
        except BackingError as e:
            log.warning("scanout %d picture skipped: %s", s.id, e)
            return False
        self._write(f"scanout-{s.id}", rgb)
        return True


def bgrx_array(s: Scanout, memory: GuestMemory, r: Rect) -> npt.NDArray[np.uint8]:
    """(h, w, 4) pixels of `r` as displays take them: x8r8g8b8, whose X byte a display ignores (QEMU composites
    the update as PIXMAN_x8r8g8b8, a Wayland compositor a wl_shm XRGB8888 buffer alike).  So a resource already in
    that byte order is handed over as it is (a view: the caller copies it out) and only other orders are
    converted."""
    pixels = s.pixels(memory, r)
    if bgr_order(s.format):
        return pixels
    return to_bgra(pixels, s.format, opaque=True)


def bgrx(s: Scanout, memory: GuestMemory, r: Rect) -> memoryview:
    """`bgrx_array` as one contiguous buffer for the display socket: without any copy when `r` spans whole rows."""
    return np.ascontiguousarray(bgrx_array(s, memory, r)).data
