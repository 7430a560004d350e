"""A PNG encoder for scanout pictures: what the guest shows, for a person (or a test) to look at.

Small enough to keep here rather than pull in an imaging library: 8-bit RGB, no interlace, filter 0 on every
row, zlib at speed 1 (pictures are written while the guest runs).
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode(rgb: npt.NDArray[np.uint8]) -> bytes:
    """PNG bytes of an (h, w, 3) uint8 image."""
    h, w, c = rgb.shape
    if c != 3:
        raise ValueError("expected (h, w, 3) RGB")
    rows = np.zeros((h, 1 + w * 3), dtype=np.uint8)
    rows[:, 1:] = rgb.reshape(h, w * 3)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)) + \
        _chunk(b"IEND", b"")


def decode(data: bytes) -> npt.NDArray[np.uint8]:
    """The (h, w, 3) image of a PNG written by `encode` (filter 0 only): lets tests compare pixel for pixel."""
    if not data.startswith(SIGNATURE):
        raise ValueError("not a PNG")
    pos, idat, w, h = 8, b"", 0, 0
    while pos < len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype = struct.unpack_from(">IIBB", body)
            if (depth, ctype) != (8, 2):
                raise ValueError("only 8-bit RGB is supported")
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    rows = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + w * 3)
    if np.any(rows[:, 0]):
        raise ValueError("only filter 0 is supported")
    return rows[:, 1:].reshape(h, w, 3).copy()


def write_atomically(path: Path, data: bytes) -> None:
    """Readers never see a half-written picture."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
