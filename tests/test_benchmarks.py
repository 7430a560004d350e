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
