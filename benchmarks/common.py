"""Shared pieces of the benchmarks: back-end processes, timing loops, result files.

Every number a benchmark prints is a ratio taken side by side in one run, so the machine's speed cancels out."""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from vgpu_lab import paths

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
paths.use_checkout(REPO)


@contextmanager
def backend(cmd: list[str]) -> Iterator[str]:
    """Run a back end on a fresh socket; yields the socket path."""
    with backend_process(cmd) as (sock, _pid):
        yield sock


@contextmanager
def backend_process(cmd: list[str]) -> Iterator[tuple[str, int]]:
    """Run a back end on a fresh socket; yields the socket path and the process id (for its RSS and fds)."""
    with tempfile.TemporaryDirectory() as d:
        sock = os.path.join(d, "b.sock")
        proc = subprocess.Popen([*cmd, f"--socket-path={sock}"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=REPO)
        try:
            deadline = time.monotonic() + 15
            while not os.path.exists(sock):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[0]} did not start")
                time.sleep(0.01)
            yield sock, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()


@dataclass
class Rate:
    name: str
    batch: int
    ops_per_s: float
    p50_us: float
    p99_us: float
    samples: int


def measure(name: str, batch: int, run_batch: Callable[[], object], seconds: float, min_batches: int = 5) -> Rate:
    """Run `run_batch` (which performs `batch` operations) repeatedly for about `seconds`."""
    run_batch()  # warm up
    lat: list[float] = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        run_batch()
        lat.append(time.perf_counter() - t0)
        if time.perf_counter() - start >= seconds and len(lat) >= min_batches:
            break
    total = time.perf_counter() - start
    per_op = sorted(x / batch for x in lat)
    p99 = per_op[min(len(per_op) - 1, int(len(per_op) * 0.99))]
    return Rate(name, batch, batch * len(lat) / total, statistics.median(per_op) * 1e6, p99 * 1e6, len(lat))


def machine() -> dict[str, object]:
    return {"host": socket.gethostname(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS of /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def percentiles(samples: list[float]) -> tuple[float, float]:
    """(p50, p99) of a list of samples, in the samples' unit."""
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def write_result(name: str, data: dict[str, object]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2, default=_plain) + "\n")
    return path


def _plain(o: object) -> object:
    if isinstance(o, Rate):
        return asdict(o)
    raise TypeError(type(o))
