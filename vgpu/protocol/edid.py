"""A minimal EDID 1.4 base block for a virtual monitor.

Guests (Linux DRM in particular) derive the preferred mode from the first detailed timing descriptor, so the
block is built around one CVT reduced-blanking-style 60 Hz timing for the requested size. It is a pure
function of its arguments so the same scanout always reports the same EDID.
"""

from __future__ import annotations

import math

EDID_BLOCK_SIZE = 128
EDID_HEADER = bytes((0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00))
MONITOR_NAME = b"vgpu"
MANUFACTURER = "VGP"
REFRESH_HZ = 60
DTD_MAX_ACTIVE = 4095  # 12-bit fields
DTD_MAX_PIXEL_CLOCK_HZ = 0xFFFF * 10_000
MODEL_YEAR = 2025

# Reduced-blanking timing constants (CVT 1.2, RB v1): fixed horizontal blanking, 460 us minimum vblank.
_H_BLANK = 160
_H_FRONT = 48
_H_SYNC = 32
_V_FRONT = 3
_V_SYNC = 6
_V_MIN_BACK = 6
_MIN_VBLANK_S = 460e-6
_DPI = 96


class Timing:
    """Detailed timing numbers, exposed for tests that decode the descriptor back."""

    __slots__ = (
        "h_active",
        "h_blank",
        "h_front",
        "h_sync",
        "pixel_clock_hz",
        "v_active",
        "v_blank",
        "v_front",
        "v_sync",
    )

    def __init__(self, width: int, height: int) -> None:
        self.h_active = width
        self.v_active = height
        self.h_blank = _H_BLANK
        self.h_front = _H_FRONT
        self.h_sync = _H_SYNC
        self.v_front = _V_FRONT
        self.v_sync = _V_SYNC
        h_period_est = (1.0 / REFRESH_HZ - _MIN_VBLANK_S) / height
        self.v_blank = max(math.ceil(_MIN_VBLANK_S / h_period_est), _V_FRONT + _V_SYNC + _V_MIN_BACK)
        total = (width + self.h_blank) * (height + self.v_blank) * REFRESH_HZ
        self.pixel_clock_hz = round(total / 10_000) * 10_000

    @property
    def refresh_hz(self) -> float:
        return self.pixel_clock_hz / ((self.h_active + self.h_blank) * (self.v_active + self.v_blank))


def _manufacturer_id(letters: str) -> bytes:
    v = 0
    for ch in letters:
        v = (v << 5) | (ord(ch) - ord("A") + 1)
    return v.to_bytes(2, "big")


def _dtd(t: Timing, width_mm: int, height_mm: int) -> bytes:
    clk = t.pixel_clock_hz // 10_000
    flags = 0x18 | 0x02  # digital separate sync, hsync positive, vsync negative (CVT-RB polarity)
    return bytes(
        (
            clk & 0xFF,
            clk >> 8,
            t.h_active & 0xFF,
            t.h_blank & 0xFF,
            ((t.h_active >> 8) << 4) | (t.h_blank >> 8),
            t.v_active & 0xFF,
            t.v_blank & 0xFF,
            ((t.v_active >> 8) << 4) | (t.v_blank >> 8),
            t.h_front & 0xFF,
            t.h_sync & 0xFF,
            ((t.v_front & 0xF) << 4) | (t.v_sync & 0xF),
            ((t.h_front >> 8) << 6) | ((t.h_sync >> 8) << 4) | ((t.v_front >> 4) << 2) | (t.v_sync >> 4),
            width_mm & 0xFF,
            height_mm & 0xFF,
            ((width_mm >> 8) << 4) | (height_mm >> 8),
            0,
            0,
            flags,
        )
    )


def _text_descriptor(tag: int, text: bytes) -> bytes:
    body = text[:13]
    if len(body) < 13:
        body = (body + b"\n").ljust(13, b" ")
    return bytes((0, 0, 0, tag, 0)) + body


def _range_limits(t: Timing) -> bytes | None:
    """Display range limits, or None when the mode exceeds what the 1-byte fields can express."""
    h_khz = t.pixel_clock_hz / (t.h_active + t.h_blank) / 1000
    max_clock_10mhz = math.ceil(t.pixel_clock_hz / 10_000_000)
    min_h, max_h = max(1, math.floor(h_khz) - 1), math.ceil(h_khz) + 1
    if max_h > 255 or max_clock_10mhz > 255:
        return None
    body = bytes((REFRESH_HZ - 10, REFRESH_HZ + 15, min_h, max_h, max_clock_10mhz, 0x01)) + b"\n" + b" " * 6
    return bytes((0, 0, 0, 0xFD, 0)) + body


def _dummy_descriptor() -> bytes:
    return bytes((0, 0, 0, 0x10)) + bytes(14)


def _chromaticity() -> bytes:
    """sRGB primaries and D65 white point as 10-bit fractions."""
    coords = [0.640, 0.330, 0.300, 0.600, 0.150, 0.060, 0.3127, 0.3290]
    v = [round(c * 1024) for c in coords]
    lo_rg = ((v[0] & 3) << 6) | ((v[1] & 3) << 4) | ((v[2] & 3) << 2) | (v[3] & 3)
    lo_bw = ((v[4] & 3) << 6) | ((v[5] & 3) << 4) | ((v[6] & 3) << 2) | (v[7] & 3)
    return bytes([lo_rg, lo_bw] + [x >> 2 for x in v])


def edid_checksum(block: bytes) -> int:
    return (-sum(block[:127])) & 0xFF


def build_edid(width: int, height: int, serial: int = 0) -> bytes:
    """EDID 1.4 base block whose preferred (first) detailed timing is ``width`` x ``height`` at 60 Hz.

    Raises ValueError for sizes a base block cannot describe (12-bit active fields, 655.35 MHz clock).
    """
    if not (1 <= width <= DTD_MAX_ACTIVE and 1 <= height <= DTD_MAX_ACTIVE):
        raise ValueError(f"{width}x{height} cannot be described by an EDID detailed timing descriptor")
    if not 0 <= serial <= 0xFFFFFFFF:
        raise ValueError("serial is a 32-bit value")
    t = Timing(width, height)
    if t.pixel_clock_hz > DTD_MAX_PIXEL_CLOCK_HZ:
        raise ValueError(f"{width}x{height}@{REFRESH_HZ} needs a pixel clock above 655.35 MHz")
    width_mm = round(width * 25.4 / _DPI)
    height_mm = round(height * 25.4 / _DPI)

    out = bytearray()
    out += EDID_HEADER
    out += _manufacturer_id(MANUFACTURER)
    out += (1).to_bytes(2, "little")  # product code
    out += serial.to_bytes(4, "little")
    out += bytes((0xFF, MODEL_YEAR - 1990))  # week 0xFF: the year byte is a model year
    out += bytes((1, 4))  # EDID version 1.4
    out += bytes((0xA0,))  # digital input, 8 bits per colour, interface undefined
    out += bytes((min(255, max(1, round(width_mm / 10))), min(255, max(1, round(height_mm / 10)))))
    out += bytes((120,))  # gamma 2.2
    out += bytes((0x06,))  # RGB 4:4:4, sRGB default, preferred timing is native
    out += _chromaticity()
    out += bytes(3)  # no established timings
    out += bytes((0x01, 0x01)) * 8  # no standard timings
    out += _dtd(t, width_mm, height_mm)
    out += _text_descriptor(0xFC, MONITOR_NAME)
    out += _range_limits(t) or _dummy_descriptor()
    out += _dummy_descriptor()
    out += bytes((0,))  # no extension blocks
    out += bytes((edid_checksum(bytes(out) + b"\0"),))
    assert len(out) == EDID_BLOCK_SIZE
    return bytes(out)


def parse_dtd(descriptor: bytes) -> tuple[int, int, int]:
    """(h_active, v_active, pixel clock in Hz) of an 18-byte detailed timing descriptor."""
    clk = int.from_bytes(descriptor[0:2], "little") * 10_000
    h_active = descriptor[2] | ((descriptor[4] >> 4) << 8)
    v_active = descriptor[5] | ((descriptor[7] >> 4) << 8)
    return h_active, v_active, clk
