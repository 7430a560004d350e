"""The fuzzing process: atheris drives `Harness.one` with libFuzzer's coverage-guided mutator.

Started by `runner` (``python -m vgpu_fuzz worker ...``), never imported elsewhere: it imports the product only
inside ``atheris.instrument_imports`` so every ``vgpu`` module is instrumented (edges and comparisons feed the
mutator) and the harness is not. libFuzzer never returns and skips Python's exit handlers, so the worker itself
writes its statistics (every few seconds, and last when the run's unit budget or time is spent) and then leaves
with ``os._exit``. A failure is saved as a reproducer and counted, and fuzzing goes on; libFuzzer's own findings
(a hang past ``-timeout``, a deadly signal, memory past ``-rss_limit_mb``) end the run with its artifact.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports(include=["vgpu"]):
    from .checks import Failure, Probe
    from .harness import Harness, save_failure

STATS_EVERY_S = 2.0


class Worker:
    def __init__(self, target: str, units: int, max_time: float, stats: Path, artifacts: Path,
                 probe_every: int) -> None:
        self.harness = Harness(target, probe_every)
        self.units_wanted = units
        self.max_time = max_time
        self.stats_path = stats
        self.artifacts = artifacts
        self.failures: list[dict[str, str]] = []
        self.start = time.monotonic()
        self._last_stats = 0.0
        self.first = Probe.take(0)

    def test_one_input(self, data: bytes) -> None:
        try:
            self.harness.one(data)
        except Failure as f:
            path = save_failure(self.artifacts, f, data)
            self.failures.append({"kind": f.kind, "file": path.name, "what": str(f).splitlines()[0]})
            print(f"vgpu_fuzz: {f.kind}: {str(f).splitlines()[0]} -> {path}", file=sys.stderr, flush=True)
        now = time.monotonic()
        done = self.harness.units >= self.units_wanted or now - self.start >= self.max_time
        if done or now - self._last_stats >= STATS_EVERY_S:
            self.write_stats(final=done)
        if done:
            sys.stderr.flush()
            os._exit(0)

    def write_stats(self, final: bool) -> None:
        h = self.harness
        stats: dict[str, Any] = {
            "target": h.target_name, "final": final, "inputs": h.inputs, "units": h.units,
            "seconds": round(time.monotonic() - self.start, 1), "failures": self.failures,
            "baseline_fds": h.baseline_fds, "start": self.first.as_dict(),
            "probes": [p.as_dict() for p in h.probes],
        }
        if final:
            stats["end"] = Probe.take(h.inputs).as_dict()
        tmp = self.stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats, indent=1))
        tmp.replace(self.stats_path)
        self._last_stats = time.monotonic()


def main(target: str, units: int, max_time: float, stats: Path, artifacts: Path, probe_every: int,
         libfuzzer_args: list[str]) -> None:
    w = Worker(target, units, max_time, stats, artifacts, probe_every)
    atheris.Setup([sys.argv[0], *libfuzzer_args], w.test_one_input)
    atheris.Fuzz()
