"""Benchmarks are never timed assertions; this only proves each one runs on a tiny size and prints its table."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import QEMU_GPU_BACKEND, REPO, require


def test_ring_roundtrip_runs_and_prints_ratios() -> None:
    require(QEMU_GPU_BACKEND, "QEMU's C vhost-user-gpu back end (the benchmark's peer)")
    r = subprocess.run([sys.executable, "-m", "benchmarks.ring_roundtrip", "--quick"], capture_output=True,
                       text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if re.search(r"\s(1|64)\s+\d+\s+[\d.]+\s+[\d.]+$", line)]
    assert len(rows) == 6, r.stdout
    ratios = re.findall(r"^ratio .* ([\d.]+)$", r.stdout, re.M)
    assert len(ratios) == 4 and all(float(x) > 0 for x in ratios), r.stdout


def test_gpu_2d_runs_and_prints_ratios() -> None:
    require(QEMU_GPU_BACKEND, "QEMU's C vhost-user-gpu back end (the benchmark's peer)")
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_2d", "--quick"], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^vgpu 2D mix\s+\d+", r.stdout, re.M) and re.search(r"^QEMU C .* 2D mix\s+\d+", r.stdout, re.M)
    ratios = dict(re.findall(r"^ratio  (.+?)\s+([\d.]+)$", r.stdout, re.M))
    assert set(ratios) == {"transfer 1920x1080 / numpy floor", "2D mix vgpu / QEMU"}, r.stdout
    assert all(float(v) > 0 for v in ratios.values())


def _quick(module: str, *extra: str) -> str:
    r = subprocess.run([sys.executable, "-m", module, "--quick", *extra], capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "wrote " not in r.stdout, "a quick run must not overwrite the recorded results"
    return r.stdout


def test_blob_lifecycle_runs_and_prints_each_step() -> None:
    out = _quick("benchmarks.blob_lifecycle")
    assert re.search(r"^vgpu host-blob life cycle .*: \d+ life cycles/s = \d+ commands/s; life cycle p50 \d+ us, "
                     r"p99 \d+ us", out, re.M), out
    steps = re.findall(r"^  (.+?)\s+p50\s+[\d.]+ us\s+p99\s+[\d.]+ us$", out, re.M)
    assert steps == ["requirements (SUBMIT_3D)", "CREATE_BLOB HOST3D", "MAP_BLOB", "UNMAP_BLOB", "UNREF"], out
    assert "QEMU C vhost-user-gpu: no ratio" in out


def test_scale_runs_and_prints_levels_and_memory() -> None:
    out = _quick("benchmarks.scale")
    assert len(re.findall(r"^(10|100|300)\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out, re.M)) == 3, out
    assert len(re.findall(r"^(10|50)\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+\d+$", out, re.M)) == 2, out
    assert len(re.findall(r"^ratio  .* ([\d.]+)$", out, re.M)) == 2, out
    assert re.search(r"^host memory per 2D resource: -?\d+ bytes of RSS", out, re.M), out


def test_cache_matrix_runs_and_prints_the_matrix() -> None:
    out = _quick("benchmarks.cache_matrix")
    from benchmarks.cache_matrix import STRATEGIES, VERDICTS
    from benchmarks.exporter_facts import DESCRIBED

    for fact in DESCRIBED:
        assert re.search(rf"^{re.escape(fact.row)}\s+described\s+{fact.truth.name}\s", out, re.M), fact.row
    assert re.search(r"^memfd \(vgpu MemfdAllocator\)\s+host\s+CACHED\s+ENOTTY\s+CACHED", out, re.M), out
    tables = out.split("wrong answers per strategy")[1:]
    assert len(tables) == 3, out
    for table in tables:
        for name in STRATEGIES.values():
            assert re.search(rf"^{re.escape(name)}\s+" + r"\s+".join([r"\d+"] * len(VERDICTS)) + "$", table,
                             re.M), (name, table)
    # Not a timing: the project's claim that its own resolution never reports CACHED for write-combined memory.
    assert re.search(r"^ours: 0 dangerous, \d+ slow, \d+ refused, \d+ right of \d+$", out, re.M), out
    assert re.search(r"^  host\s+DMA_BUF_IOCTL_INFO, bare ioctl \(memfd: ENOTTY\)\s+[\d.]+ us p99\s+[\d.]+ us\s+"
                     r"ratio [\d.]+$", out, re.M), out
    assert "under TCG the guest's memory type changes no behaviour" in out


def test_run_all_quick_runs_every_benchmark() -> None:
    require(QEMU_GPU_BACKEND, "QEMU's C vhost-user-gpu back end (the peer of two benchmarks)")
    out = _quick("benchmarks.run_all")
    from benchmarks.run_all import BENCHMARKS

    for name in BENCHMARKS:
        assert re.search(rf"^=== {name}: [\d.]+ s$", out, re.M), out
    assert "quick run: nothing written" in out
