"""The soak's figures and verdicts without QEMU: the curve is drawn where the values say, a leak or a failed guest
is reported, and the JSON the command writes reads back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import soak as command
from benchmarks.curve import Series, line_chart
from vgpu.gpu import png
from vgpu_lab import soak


def record(i: int, fds: int = 7, rss: int = 40_000, ok: bool = True) -> soak.GuestRecord:
    return soak.GuestRecord(i, 8.0, ok, "" if ok else "step 'modeset' missing", fds, rss, 17, 68_000, 2, ok, "")


def test_line_chart_draws_each_series_in_its_colour(tmp_path: Path) -> None:
    red, blue = (200, 0, 0), (0, 0, 200)
    path = line_chart(tmp_path / "c.png", "T", [Series("low", [1, 1, 1], blue), Series("high", [9, 9, 9], red)],
                      x_label="x", y_label="y", y_min=0)
    img = png.decode(path.read_bytes())
    rows_of = {c: np.flatnonzero(np.all(img == c, axis=-1).any(axis=1)) for c in (red, blue)}
    # Both lines are drawn; the higher value sits higher in the picture (above its legend swatch).
    assert rows_of[red].size and rows_of[blue].size
    assert rows_of[red].min() < rows_of[blue].min()


def test_a_run_that_drifts_or_fails_says_so() -> None:
    good = soak.SoakRun("qemu10", "QEMU", 7, 39_000, [record(i) for i in range(5)])
    assert good.failures == [] and good.rss_slope_kib() == pytest.approx(0.0, abs=1e-6)
    leaking = soak.SoakRun("qemu10", "QEMU", 7, 39_000,
                           [record(i, fds=7 + i, rss=40_000 + 3000 * i) for i in range(4)])
    assert leaking.rss_slope_kib() == pytest.approx(3000.0)
    assert any("guest 1: 8 fds" in f for f in leaking.failures)
    assert any(f.startswith("guest 3:") for f in leaking.failures)
    failed = soak.SoakRun("qemu11", "QEMU", 7, 39_000, [record(0), record(1, ok=False)])
    assert "guest 1: step 'modeset' missing" in failed.failures


def test_the_command_writes_json_and_figures(tmp_path: Path) -> None:
    runs = [soak.SoakRun("qemu11", "QEMU 11.1", 7, 39_000, [record(i) for i in range(3)]),
            soak.SoakRun("qemu10", "QEMU 10", 7, 39_000, [record(0), record(1, ok=False)])]
    command.write(tmp_path, runs, True, 0.0)
    data = json.loads((tmp_path / "soak.json").read_text())
    assert data["complete"] and not data["all_ok"]
    assert [r["guests"] for r in data["runs"]] == [3, 2] and data["runs"][1]["guests_ok"] == 1
    assert len(data["runs"][0]["guests_detail"]) == 3
    for p in command.figures(tmp_path, runs):
        assert png.decode(p.read_bytes()).shape[2] == 3


def test_replot_merges_runs_recorded_apart(tmp_path: Path) -> None:
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    command.write(a, [soak.SoakRun("qemu11", "QEMU 11.1", 7, 39_000, [record(i) for i in range(3)])], False, 0.0)
    command.write(b, [soak.SoakRun("qemu10", "QEMU 10", 7, 39_000, [record(i) for i in range(2)])], True, 0.0)
    assert command.main(["--replot", str(a / "soak.json"), str(b / "soak.json"), "--guests", "2",
                         "--json", str(out)]) == 0
    data = json.loads((out / "soak.json").read_text())
    assert data["complete"] and [r["kind"] for r in data["runs"]] == ["qemu11", "qemu10"]
    assert (out / "soak.png").is_file() and (out / "soak_fds.png").is_file()
