"""The copy benchmark is never a timed assertion; this proves it runs at its tiny size, checks the bytes it gathers
and prints a ratio to the floor for each way and size."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO


def test_transfer_copy_runs_and_prints_ratios_to_the_floor() -> None:
    r = subprocess.run([sys.executable, "-m", "benchmarks.transfer_copy", "--quick"], capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "wrote " not in r.stdout, "a quick run must not overwrite the recorded results"
    for size in ("1024x768", "1920x1080"):
        assert re.search(rf"^{size} BGRA from \d+ scattered pages$", r.stdout, re.M), r.stdout
        ratios = dict(re.findall(rf"^ratio  {size} (.+?)\s+([\d.]+)$", r.stdout, re.M))
        assert {"ours warm alias / floor", "ours warm region mappings / floor"} <= set(ratios), r.stdout
        assert all(float(v) > 0 for v in ratios.values())
    assert len(re.findall(r"^  ours warm, alias\s+[\d.]+ GB/s\s+[\d.]+ x floor", r.stdout, re.M)) == 2, r.stdout
