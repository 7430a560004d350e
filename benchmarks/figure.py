"""Horizontal bar charts drawn into a numpy array and written with the project's own PNG encoder.

Why not matplotlib: it is not a dependency of the project, and a figure of labelled bars needs nothing but
rectangles and a small bitmap font (5x7, upper case, digits and the punctuation the labels use). Text is drawn at
twice the font size so it stays legible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from vgpu.gpu.png import encode, write_atomically

Color = tuple[int, int, int]
RED: Color = (200, 40, 40)
ORANGE: Color = (230, 150, 30)
GREEN: Color = (50, 150, 70)
GREY: Color = (150, 150, 150)
BLUE: Color = (50, 90, 180)
BLACK: Color = (0, 0, 0)

# 5x7 glyphs, one string of 5 cells per row ('#' = ink).
_GLYPHS: dict[str, tuple[str, ...]] = {
    " ": ("     ",) * 7,
    "A": (" ### ", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"),
    "B": ("#### ", "#   #", "#   #", "#### ", "#   #", "#   #", "#### "),
    "C": (" ### ", "#   #", "#    ", "#    ", "#    ", "#   #", " ### "),
    "D": ("#### ", "#   #", "#   #", "#   #", "#   #", "#   #", "#### "),
    "E": ("#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#####"),
    "F": ("#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#    "),
    "G": (" ### ", "#   #", "#    ", "# ###", "#   #", "#   #", " ####"),
    "H": ("#   #", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"),
    "I": (" ### ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    "J": ("  ###", "   # ", "   # ", "   # ", "   # ", "#  # ", " ##  "),
    "K": ("#   #", "#  # ", "# #  ", "##   ", "# #  ", "#  # ", "#   #"),
    "L": ("#    ", "#    ", "#    ", "#    ", "#    ", "#    ", "#####"),
    "M": ("#   #", "## ##", "# # #", "# # #", "#   #", "#   #", "#   #"),
    "N": ("#   #", "#   #", "##  #", "# # #", "#  ##", "#   #", "#   #"),
    "O": (" ### ", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "),
    "P": ("#### ", "#   #", "#   #", "#### ", "#    ", "#    ", "#    "),
    "Q": (" ### ", "#   #", "#   #", "#   #", "# # #", "#  # ", " ## #"),
    "R": ("#### ", "#   #", "#   #", "#### ", "# #  ", "#  # ", "#   #"),
    "S": (" ####", "#    ", "#    ", " ### ", "    #", "    #", "#### "),
    "T": ("#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "),
    "U": ("#   #", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "),
    "V": ("#   #", "#   #", "#   #", "#   #", "#   #", " # # ", "  #  "),
    "W": ("#   #", "#   #", "#   #", "# # #", "# # #", "# # #", " # # "),
    "X": ("#   #", "#   #", " # # ", "  #  ", " # # ", "#   #", "#   #"),
    "Y": ("#   #", "#   #", " # # ", "  #  ", "  #  ", "  #  ", "  #  "),
    "Z": ("#####", "    #", "   # ", "  #  ", " #   ", "#    ", "#####"),
    "0": (" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "),
    "1": ("  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    "2": (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),
    "3": ("#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "),
    "4": ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    "5": ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),
    "6": ("  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "),
    "7": ("#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "),
    "8": (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),
    "9": (" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "),
    ".": ("     ",) * 5 + (" ##  ", " ##  "),
    ",": ("     ",) * 4 + (" ##  ", "  #  ", " #   "),
    ":": ("     ", " ##  ", " ##  ", "     ", " ##  ", " ##  ", "     "),
    ";": ("     ", " ##  ", " ##  ", "     ", " ##  ", "  #  ", " #   "),
    "-": ("     ", "     ", "     ", "#####", "     ", "     ", "     "),
    "+": ("     ", "  #  ", "  #  ", "#####", "  #  ", "  #  ", "     "),
    "=": ("     ", "     ", "#####", "     ", "#####", "     ", "     "),
    "/": ("    #", "    #", "   # ", "  #  ", " #   ", "#    ", "#    "),
    "(": ("   # ", "  #  ", " #   ", " #   ", " #   ", "  #  ", "   # "),
    ")": (" #   ", "  #  ", "   # ", "   # ", "   # ", "  #  ", " #   "),
    "%": ("##   ", "##  #", "   # ", "  #  ", " #   ", "#  ##", "   ##"),
    "_": ("     ",) * 6 + ("#####",),
    "'": ("  #  ", "  #  ", "     ", "     ", "     ", "     ", "     "),
    "?": (" ### ", "#   #", "    #", "   # ", "  #  ", "     ", "  #  "),
    "<": ("   # ", "  #  ", " #   ", "#    ", " #   ", "  #  ", "   # "),
    ">": (" #   ", "  #  ", "   # ", "    #", "   # ", "  #  ", " #   "),
}
SCALE = 2
CHAR_W, CHAR_H = 6 * SCALE, 8 * SCALE


def _glyph(ch: str) -> npt.NDArray[np.bool_]:
    rows = _GLYPHS.get(ch.upper(), _GLYPHS["?"])
    cells = np.array([[c == "#" for c in row] for row in rows], dtype=bool)
    return np.kron(cells, np.ones((SCALE, SCALE), dtype=bool)).astype(bool)


def text_width(text: str) -> int:
    return len(text) * CHAR_W


def draw_text(img: npt.NDArray[np.uint8], x: int, y: int, text: str, color: Color = BLACK) -> None:
    for i, ch in enumerate(text):
        g = _glyph(ch)
        x0 = x + i * CHAR_W
        h, w = g.shape
        sub = img[y:y + h, x0:x0 + w]
        if sub.shape[:2] != g.shape:
            return  # clipped at the picture's edge
        sub[g] = color


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    color: Color = BLUE
    text: str | None = None  # drawn after the bar; default the value


def hbar_chart(path: Path, title: str, bars: Sequence[Bar], *, unit: str = "", notes: Sequence[str] = (),
               width: int = 1100) -> Path:
    """One bar per row, longest value = full width; rows whose label is empty become gaps between groups."""
    label_w = max([text_width(b.label) for b in bars] + [0]) + 16
    row_h = CHAR_H + 8
    top = 2 * CHAR_H + 10
    height = top + row_h * len(bars) + (len(notes) + 1) * (CHAR_H + 4) + 10
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    draw_text(img, 10, 8, title)
    if unit:
        draw_text(img, 10, 8 + CHAR_H + 2, unit, GREY)
    vmax = max([b.value for b in bars if b.label] + [1e-12])
    span = max(width - label_w - 10 - 12 * CHAR_W, 20)
    for i, b in enumerate(bars):
        y = top + i * row_h
        if not b.label:
            continue
        draw_text(img, 10, y + 2, b.label)
        n = round(span * max(b.value, 0.0) / vmax)
        img[y + 2:y + CHAR_H + 2, label_w:label_w + n] = b.color
        draw_text(img, label_w + n + 6, y + 2, b.text if b.text is not None else f"{b.value:g}")
    y = top + len(bars) * row_h + 4
    for note in notes:
        draw_text(img, 10, y, note, GREY)
        y += CHAR_H + 4
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, encode(img))
    return path
