"""Benchmarks are never timed assertions; this only proves each one runs on a tiny size and prints its table.
End to end: the cache matrix boots the patched guest kernel for its guest rows, and the side-by-side modules run
QEMU's C back end.

One quick run of the whole suite (``python -m benchmarks.run_all --quick --json DIR``, as a module-scoped fixture)
serves every test here: each benchmark runs once, and each test reads what its benchmark wrote into DIR or
printed in its section of the output."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import QEMU_GPU_BACKEND, REPO, require

SIDE_KEYS = {"ops_per_s", "round_rates", "p50_us", "p99_us", "calls", "backend_cpu_us_per_op",
             "frontend_cpu_us_per_op", "frontend_busy"}


@dataclass(frozen=True)
class QuickRun:
    out: str
    results: dict[str, dict[str, Any]]

    def section(self, name: str) -> str:
        """What benchmark `name` printed."""
        m = re.search(rf"^=== {name}\n(.*?)^=== {name}: ", self.out, re.M | re.S)
        assert m, self.out
        return m.group(1)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    require(QEMU_GPU_BACKEND, "QEMU's C vhost-user-gpu back end (the peer of the side-by-side benchmarks)")
    results = tmp_path_factory.mktemp("benchmarks")
    r = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--quick", f"--json={results}"],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "wrote " not in r.stdout, "a quick run must not overwrite the recorded results"
    return QuickRun(r.stdout, {p.stem: json.loads(p.read_text()) for p in results.glob("*.json")})


def _sane_sides(result: dict[str, Any], keys: set[str]) -> None:
    assert set(result["sides"]) == keys, result["sides"].keys()
    for st in result["sides"].values():
        assert set(st) >= SIDE_KEYS, st
        assert st["ops_per_s"] > 0 and st["calls"] > 0 and len(st["round_rates"]) == result["rounds"]
        assert st["frontend_cpu_us_per_op"] >= 0
    assert all(v > 0 for v in result["ratios"].values()), result["ratios"]
    assert result["machine"]["cpus"] and result["quick"] is True


def test_commands_measure_ours_qemu_and_the_floor_side_by_side(quick: QuickRun) -> None:
    results = quick.results
    assert {"display_info", "create_unref", "mix_2d"} <= set(results)
    for res in (results[name] for name in ("display_info", "create_unref", "mix_2d")):
        _sane_sides(res, {"ours", "qemu", "floor", "sleeping"})  # sleeping: ours with --poll-max-us 0
        assert set(res["ratios"]) == {"ours / qemu", "ours / floor", "qemu / floor", "ours never polling / qemu"}
    assert results["create_unref"]["sides"]["qemu"]["ops_per_call"] == 128  # two kicks of 64


def test_transfers_measure_against_qemu_and_the_copy_floor(quick: QuickRun) -> None:
    results = quick.results
    _sane_sides(results["transfer_scattered"], {"ours", "qemu", "floor", "copy"})
    assert results["transfer_scattered"]["bytes_per_op"] == 1024 * 768 * 4
    assert {"ours / qemu", "ours / copy"} <= set(results["transfer_scattered"]["ratios"])
    _sane_sides(results["frames_1080p"], {"ours", "qemu", "floor", "sleeping"})
    assert "ours never polling / qemu" in results["frames_1080p"]["ratios"]


def test_blob_lifecycle_against_its_floors(quick: QuickRun) -> None:
    res = quick.results["blob_lifecycle"]
    _sane_sides(res, {"ours", "transport", "syscalls"})
    assert list(res["steps_us"]) == ["requirements (SUBMIT_3D)", "CREATE_BLOB HOST3D", "MAP_BLOB", "UNMAP_BLOB",
                                     "UNREF"]
    assert res["qemu"] == "no blob support"


def test_process_costs(quick: QuickRun) -> None:
    res = quick.results["process_costs"]
    for key in ("ours", "qemu"):
        m = res["median"][key]
        assert m["startup_s"] > 0 and m["idle_rss"] > 0 and m["session_rss"] > 0, m
        assert len(res["runs"][key]) == res["rounds"]


def test_scale_runs_and_prints_levels_and_memory(quick: QuickRun) -> None:
    out = quick.section("scale")
    assert len(re.findall(r"^(10|100|300)\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out, re.M)) == 3, out
    assert len(re.findall(r"^(10|50)\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+\d+$", out, re.M)) == 2, out
    assert len(re.findall(r"^ratio  .* ([\d.]+)$", out, re.M)) == 2, out
    assert re.search(r"^host memory per 2D resource: -?\d+ bytes of RSS", out, re.M), out


def test_cache_matrix_runs_and_prints_the_matrix(quick: QuickRun) -> None:
    out = quick.section("cache_matrix")
    from benchmarks.cache_matrix import STRATEGIES, VERDICTS
    from benchmarks.exporter_facts import DESCRIBED

    for fact in DESCRIBED:
        truth = re.escape(fact.truth_name)
        assert re.search(rf"^{re.escape(fact.row)}\s+described\s+{truth}\s", out, re.M), fact.row
    assert re.search(r"^memfd \(vgpu MemfdAllocator\)\s+host\s+CACHED\s+ENOTTY\s+CACHED", out, re.M), out
    tables = out.split("wrong answers per strategy")[1:]
    # all, real, described, truth that changes, needs cache maintenance
    assert len(tables) == 5, out
    # A buffer whose truth changes: the attribute read alone is dangerous (asked while cached), ours refuses by
    # default and opted in answers the WC that is safe in every placement.
    changing = tables[3]
    assert re.search(r"^kernel query, flags ignored\s+0\s+[1-9]\d*\s+0\s+0\s+0$", changing, re.M), changing
    assert re.search(r"^ours, exporter answers\s+0\s+0\s+0\s+0\s+[1-9]\d*$", changing, re.M), changing
    assert re.search(r"^ours, changing mapped WC\s+[1-9]\d*\s+0\s+0\s+0\s+0$", changing, re.M), changing
    for table in tables:
        for name in STRATEGIES.values():
            assert re.search(rf"^{re.escape(name)}\s+" + r"\s+".join([r"\d+"] * len(VERDICTS)) + "$", table,
                             re.M), (name, table)
    # Not a timing: the project's claim that its own resolution never reports CACHED for write-combined memory.
    assert re.search(r"^ours: 0 dangerous, \d+ slow, \d+ refused, \d+ right of \d+$", out, re.M), out
    assert re.search(r"^  host\s+DMA_BUF_IOCTL_INFO, bare ioctl \(memfd: ENOTTY\)\s+[\d.]+ us p99\s+[\d.]+ us\s+"
                     r"ratio [\d.]+$", out, re.M), out
    assert "under TCG the guest's memory type changes no behaviour" in out


def test_run_all_quick_runs_every_benchmark(quick: QuickRun) -> None:
    from benchmarks.run_all import BENCHMARKS

    for name in BENCHMARKS:
        assert re.search(rf"^=== {name}: [\d.]+ s$", quick.out, re.M), quick.out
    assert "quick run: nothing written" in quick.out


def test_transfer_copy_runs_and_prints_ratios_to_the_floor(quick: QuickRun) -> None:
    """The copy benchmark checks the bytes it gathers and prints a ratio to the floor for each way and size."""
    out = quick.section("transfer_copy")
    for size in ("1024x768", "1920x1080"):
        assert re.search(rf"^{size} BGRA from \d+ scattered pages$", out, re.M), out
        ratios = dict(re.findall(rf"^ratio  {size} (.+?)\s+([\d.]+)$", out, re.M))
        assert {"ours warm alias / floor", "ours warm region mappings / floor"} <= set(ratios), out
        assert all(float(v) > 0 for v in ratios.values())
    assert len(re.findall(r"^  ours warm, alias\s+[\d.]+ GB/s\s+[\d.]+ x floor", out, re.M)) == 2, out
