"""What the GPU device's output tells a display of its own, scanout by scanout.

A sink never blocks and never fails the device: it copies what it is handed (or keeps a dma-buf's fd for as long
as the scanout shows it), presents when the display is ready for another frame, and drops what it cannot show.
Pixels arrive as (height, width, 4) uint8 arrays in bytes B, G, R, X (x8r8g8b8, the X byte ignored), the layout the
VMM's display socket takes too, so one conversion serves every display.  They are asked for only when needed (a
scanout shown straight from a dma-buf needs none), hence a callable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt


@dataclass(frozen=True)
class DmabufImage:
    """A whole single-plane image in a dma-buf: what a scanout shows when it can be shown without copies.  The
    fd stays its owner's, open until the scanout shows something else."""

    fd: int
    width: int
    height: int
    stride: int
    offset: int
    fourcc: int
    modifier: int


class Sink(Protocol):
    @property
    def takes_dmabuf(self) -> bool:
        """Whether showing a dma-buf could spare the copies (the device then makes one over guest blobs)."""
        ...

    def show(self, scanout: int, width: int, height: int, dmabuf: DmabufImage | None = None) -> None:
        """Scanout `scanout` now shows a `width` x `height` image, from `dmabuf` when given (the sink may still
        ask for pixels if it cannot show the buffer itself); 0 x 0: it is off (its window goes away)."""

    def update(self, scanout: int, x: int, y: int, width: int, height: int,
               pixels: Callable[[], npt.NDArray[np.uint8]]) -> None:
        """This rectangle of the scanout changed; `pixels()` gives its (height, width, 4) x8r8g8b8 pixels."""

    def cursor(self, scanout: int, image: npt.NDArray[np.uint8] | None, hot_x: int, hot_y: int, x: int,
               y: int) -> None:
        """The guest's cursor over this scanout: a (64, 64, 4) B, G, R, A image (premultiplied, as DRM cursor
        planes are) with its hot spot at scanout position (x, y); None hides it."""

    def move_cursor(self, scanout: int, x: int, y: int) -> None: ...

    def reset(self) -> None:
        """The guest's device is gone (or reset): every scanout is off."""

    def status(self) -> Mapping[str, object]:
        """What the sink shows, as plain data for a status query (only reads)."""
        ...
