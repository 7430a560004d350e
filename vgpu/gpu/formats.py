"""The eight virtio-gpu pixel formats: every one is 4 bytes per pixel, they differ in channel order.

Names follow the spec's (Gallium) convention: components listed from the lowest byte in memory, so B8G8R8A8 is
bytes B, G, R, A.  The display socket wants PIXMAN x8r8g8b8 (bytes B, G, R, X on a little-endian host), the
cursor a8r8g8b8 (B, G, R, A), and a PNG R, G, B(, A): conversions are channel gathers on numpy views.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import numpy as np

from ..protocol import Format

if TYPE_CHECKING:
    import numpy.typing as npt

BPP: Final = 4

# Byte index of (R, G, B, A) in each format; A is None for X (padding) formats.
_CHANNELS: Final[dict[int, tuple[int, int, int, int | None]]] = {
    Format.FORMAT_B8G8R8A8_UNORM: (2, 1, 0, 3),
    Format.FORMAT_B8G8R8X8_UNORM: (2, 1, 0, None),
    Format.FORMAT_A8R8G8B8_UNORM: (1, 2, 3, 0),
    Format.FORMAT_X8R8G8B8_UNORM: (1, 2, 3, None),
    Format.FORMAT_R8G8B8A8_UNORM: (0, 1, 2, 3),
    Format.FORMAT_X8B8G8R8_UNORM: (3, 2, 1, None),
    Format.FORMAT_A8B8G8R8_UNORM: (3, 2, 1, 0),
    Format.FORMAT_R8G8B8X8_UNORM: (0, 1, 2, None),
}

# DRM fourcc of each format, for dma-buf scanouts (fourcc names the little-endian word, so B8G8R8A8 = ARGB8888).
DRM_FOURCC: Final[dict[int, int]] = {
    Format.FORMAT_B8G8R8A8_UNORM: 0x34325241,  # AR24
    Format.FORMAT_B8G8R8X8_UNORM: 0x34325258,  # XR24
    Format.FORMAT_A8R8G8B8_UNORM: 0x34324142,  # BA24
    Format.FORMAT_X8R8G8B8_UNORM: 0x34325842,  # BX24
    Format.FORMAT_R8G8B8A8_UNORM: 0x34324241,  # AB24
    Format.FORMAT_X8B8G8R8_UNORM: 0x34325852,  # RX24
    Format.FORMAT_A8B8G8R8_UNORM: 0x34324152,  # RA24
    Format.FORMAT_R8G8B8X8_UNORM: 0x34324258,  # XB24
}


def supported(fmt: int) -> bool:
    return fmt in _CHANNELS


def bgr_order(fmt: int) -> bool:
    """Bytes B, G, R, then X or A: the display socket's x8r8g8b8 as it is."""
    return _CHANNELS[fmt][:3] == (2, 1, 0)


def to_bgra(pixels: npt.NDArray[np.uint8], fmt: int, opaque: bool) -> npt.NDArray[np.uint8]:
    """(h, w, 4) pixels in `fmt` as bytes B, G, R, A (x8r8g8b8 / a8r8g8b8); alpha 255 when `opaque` or absent."""
    r, g, b, a = _CHANNELS[fmt]
    if (r, g, b) == (2, 1, 0) and (opaque or a == 3):
        out = np.array(pixels, copy=True)
        if opaque or a is None:
            out[..., 3] = 255
        return out
    out = np.empty_like(pixels)
    out[..., 0] = pixels[..., b]
    out[..., 1] = pixels[..., g]
    out[..., 2] = pixels[..., r]
    out[..., 3] = 255 if opaque or a is None else pixels[..., a]
    return out


def to_rgb(pixels: npt.NDArray[np.uint8], fmt: int) -> npt.NDArray[Any]:
    """(h, w, 3) R, G, B for a picture of what the scanout shows (alpha ignored, as a display does)."""
    r, g, b, _ = _CHANNELS[fmt]
    return np.ascontiguousarray(pixels[..., [r, g, b]])
