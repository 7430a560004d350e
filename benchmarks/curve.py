"""Line charts (a value per step, several series on shared axes) drawn into numpy and written as PNG.

The companion of figure.py's bar charts, with the same font and encoder, for curves such as a soak's RSS after
each guest: where a bar chart compares sides, a curve shows whether something drifts over time.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from vgpu.gpu.png import encode, write_atomically

from .figure import CHAR_H, CHAR_W, GREY, Color, draw_text, text_width

LIGHT: Color = (225, 225, 225)


@dataclass(frozen=True)
class Series:
    label: str
    values: Sequence[float]
    color: Color
    marks: Sequence[int] = ()  # indexes drawn with a red cross (e.g. a failed guest)


def _line(img: npt.NDArray[np.uint8], x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
    """A 2-pixel-wide straight line (sampled densely enough that no gap shows)."""
    n = max(abs(x1 - x0), abs(y1 - y0), 1)
    xs = np.rint(np.linspace(x0, x1, n + 1)).astype(int)
    ys = np.rint(np.linspace(y0, y1, n + 1)).astype(int)
    h, w = img.shape[:2]
    for dx, dy in ((0, 0), (1, 0), (0, 1)):
        ok = (xs + dx >= 0) & (xs + dx < w) & (ys + dy >= 0) & (ys + dy < h)
        img[ys[ok] + dy, xs[ok] + dx] = color


def _nice_step(span: float, ticks: int) -> float:
    raw = span / max(ticks, 1)
    mag = 10 ** np.floor(np.log10(raw)) if raw > 0 else 1.0
    return float(next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw))


def line_chart(path: Path, title: str, series: Sequence[Series], *, x_label: str, y_label: str,
               y_min: float | None = None, y_max: float | None = None, notes: Sequence[str] = (),
               width: int = 1100, plot_height: int = 360) -> Path:
    """Every series over x = 0, 1, ... on one pair of axes, with a legend under the plot."""
    values = [v for s in series for v in s.values]
    lo = min(values, default=0.0) if y_min is None else y_min
    hi = max(values, default=1.0) if y_max is None else y_max
    if hi <= lo:
        hi = lo + 1.0
    step = _nice_step(hi - lo, 6)
    lo, hi = float(np.floor(lo / step)) * step, float(np.ceil(hi / step)) * step
    n = max((len(s.values) for s in series), default=1)
    left = 10 + text_width(f"{hi:g}") + 10
    top = 3 * CHAR_H + 16
    right = width - 20
    bottom = top + plot_height
    legend = len(series) + len(notes) + 2
    img = np.full((bottom + CHAR_H * 2 + 8 + legend * (CHAR_H + 4), width, 3), 255, dtype=np.uint8)
    draw_text(img, 10, 8, title)
    draw_text(img, 10, 8 + CHAR_H + 2, y_label, GREY)

    def y_of(v: float) -> int:
        return round(bottom - (v - lo) / (hi - lo) * (bottom - top))

    def x_of(i: float) -> int:
        return round(left + i / max(n - 1, 1) * (right - left))

    for k in range(round((hi - lo) / step) + 1):
        v = lo + k * step
        y = y_of(v)
        img[y, left:right] = LIGHT
        draw_text(img, 10, y - CHAR_H // 2, f"{v:g}", GREY)
    xstep = max(1, int(_nice_step(max(n - 1, 1), 8)))
    for i in range(0, n, xstep):
        x = x_of(i)
        img[top:bottom, x] = LIGHT
        draw_text(img, x - text_width(str(i)) // 2, bottom + 6, str(i), GREY)
    draw_text(img, right - text_width(x_label), bottom + CHAR_H + 8, x_label, GREY)
    img[top:bottom + 1, left] = GREY
    img[bottom, left:right + 1] = GREY
    for s in series:
        pts = [(x_of(i), y_of(v)) for i, v in enumerate(s.values)]
        for (xa, ya), (xb, yb) in itertools.pairwise(pts):
            _line(img, xa, ya, xb, yb, s.color)
        if len(pts) == 1:
            _line(img, pts[0][0] - 2, pts[0][1], pts[0][0] + 2, pts[0][1], s.color)
        for i in s.marks:
            if 0 <= i < len(pts):
                x, y = pts[i]
                _line(img, x - 5, y - 5, x + 5, y + 5, (200, 40, 40))
                _line(img, x - 5, y + 5, x + 5, y - 5, (200, 40, 40))
    y = bottom + 2 * CHAR_H + 12
    for s in series:
        img[y + CHAR_H // 2 - 1:y + CHAR_H // 2 + 2, 10:10 + 3 * CHAR_W] = s.color
        draw_text(img, 10 + 4 * CHAR_W, y, s.label)
        y += CHAR_H + 4
    for note in notes:
        draw_text(img, 10, y, note, GREY)
        y += CHAR_H + 4
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, encode(img))
    return path
