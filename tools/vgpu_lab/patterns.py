"""The pixels the guest program ``kms_pattern`` draws, reproduced exactly in numpy.

Why: an end-to-end test must be able to say not just "a frame arrived" but "the frame the guest drew arrived,
every pixel in place". The formulas below are the ones in ``tools/vgpu_lab/guest/kms_pattern.c`` (keep both in step);
every frame pixel is distinct up to 4096x4096, so a wrong offset, stride or row order cannot go unnoticed.

Pixels are 32-bit words as the guest stores them in memory (little endian): XRGB8888 for the frame (the X byte is
written as 0xFF) and ARGB8888 for the cursor. ``as_bytes`` gives the exact byte image a back end receives in a
``TRANSFER_TO_HOST_2D`` for a tightly packed resource.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

CURSOR_SIZE = 64
#: Where kms_pattern moves the cursor (DRM_MODE_CURSOR_MOVE) after setting its image.
CURSOR_X = 100
CURSOR_Y = 80

U32Array = npt.NDArray[np.uint32]


def frame_pixels(width: int, height: int) -> U32Array:
    """The (height, width) frame: ``0xFF000000 | x&0xFF << 16 | y&0xFF << 8 | (x>>8)&0xF << 4 | (y>>8)&0xF``."""
    if not (0 < width <= 4096 and 0 < height <= 4096):
        raise ValueError(f"frame size {width}x{height} outside 1..4096")
    x = np.arange(width, dtype=np.uint32)[np.newaxis, :]
    y = np.arange(height, dtype=np.uint32)[:, np.newaxis]
    pixels = np.uint32(0xFF000000) | (x & 0xFF) << 16 | (y & 0xFF) << 8 | ((x >> 8) & 0xF) << 4 | ((y >> 8) & 0xF)
    return np.ascontiguousarray(pixels, dtype=np.uint32)


def cursor_pixels() -> U32Array:
    """The 64x64 cursor: ``0xFF000000 | 4x << 16 | 4y << 8 | (4*(x^y)) & 0xFF``."""
    x = np.arange(CURSOR_SIZE, dtype=np.uint32)[np.newaxis, :]
    y = np.arange(CURSOR_SIZE, dtype=np.uint32)[:, np.newaxis]
    pixels = np.uint32(0xFF000000) | (4 * x) << 16 | (4 * y) << 8 | ((4 * (x ^ y)) & 0xFF)
    return np.ascontiguousarray(pixels, dtype=np.uint32)


def as_bytes(pixels: U32Array) -> bytes:
    """The little-endian byte image of a pixel array, row after row with no padding."""
    return pixels.astype("<u4", copy=False).tobytes()


def frame_pixel(x: int, y: int) -> int:
    """One frame pixel, for messages and spot checks."""
    return 0xFF000000 | (x & 0xFF) << 16 | (y & 0xFF) << 8 | ((x >> 8) & 0xF) << 4 | ((y >> 8) & 0xF)


def cursor_pixel(x: int, y: int) -> int:
    """One cursor pixel."""
    return 0xFF000000 | (4 * x) << 16 | (4 * y) << 8 | ((4 * (x ^ y)) & 0xFF)
