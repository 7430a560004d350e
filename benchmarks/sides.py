"""Side by side: several back ends (ours, QEMU's C one, a no-op floor) driven through the same front end in one run.

The machine these run on is shared and noisy, so a figure taken from one back end for three seconds and then from
the other for three seconds compares two different machines.  Instead every side is started and connected first,
then measured in short slices, round-robin (the starting side rotates each round): each round's ratio compares
neighbours in time, and the summary is the median over rounds.  Alongside the wall-clock rate each slice records the
CPU time the back-end process spent (all its threads, from /proc schedstat, nanoseconds) and the CPU time this
process spent — the front end's own cost, which is what a no-op floor shows as a rate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.common import backend_process, machine, write_result

QEMU_BACKEND = "/usr/lib/qemu/vhost-user-gpu"
VGPU = [sys.executable, "-m", "vgpu", "--log-level=error"]
# The floor: our vhost-user transport with a device that completes every chain untouched, so its rate is what the
# harness (this front end, the eventfds, the process switches) plus the thinnest Python back end costs.  The
# front end's share of each side's wall time is reported separately (frontend_busy), C back end included.
ECHO = [sys.executable, "-m", "vgpu.vhost_user.examples.echo", "--noop", "--log-level=error"]
# Ours told never to poll (vgpu/vhost_user/polling.py), beside ours in the one-command-per-kick benchmarks: how much
# of each figure the polling loop makes.  C's back end does not poll; the goals are about ours as it ships.
SLEEPING = "sleeping"
SLEEPING_RATIO = "ours never polling / qemu"
#: How each back-end side is named in the printed tables and the result files.
LABELS = {"ours": "vgpu (python -m vgpu)", "qemu": "QEMU C vhost-user-gpu", "floor": "floor: no-op echo device",
          SLEEPING: "vgpu --poll-max-us 0 (never polls)"}


def sleeping_command() -> list[str]:
    return vgpu_command(["--poll-max-us=0"])


def have_qemu() -> bool:
    return os.path.exists(QEMU_BACKEND)


def vgpu_command(extra: list[str] | None = None, profile: str | None = None) -> list[str]:
    """Our back end; under cProfile (writing `profile` when it exits on SIGTERM) when asked."""
    prefix = [sys.executable, "-m", "cProfile", "-o", profile] if profile else [sys.executable]
    return [*prefix, "-m", "vgpu", "--log-level=error", *(extra or [])]


@contextmanager
def started(cmds: dict[str, list[str]]) -> Iterator[dict[str, tuple[str, int]]]:
    """Start every back end at once; yields key -> (socket path, pid).  All stop when the block ends."""
    with ExitStack() as stack:
        yield {k: stack.enter_context(backend_process(cmd)) for k, cmd in cmds.items()}


def cpu_ns(pid: int) -> int:
    """CPU time a process has used, all threads, in nanoseconds (first field of each task's schedstat)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended between listdir and open
    return total


def self_cpu_s() -> float:
    """CPU seconds this process (the front end, all its threads) has used."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass
class Side:
    """One thing to measure: `run()` performs `ops` operations; `pid` is the back-end process (None when the side
    runs in this process, like a numpy floor)."""

    key: str
    label: str
    run: Callable[[], object]
    ops: int
    pid: int | None = None


@dataclass
class SideStats:
    key: str
    label: str
    ops_per_call: int
    ops_per_s: float  # median over rounds of each round's rate
    round_rates: list[float]
    p50_us: float  # per call (one call = ops_per_call operations, e.g. one kick of 64)
    p99_us: float
    calls: int
    backend_cpu_us_per_op: float | None
    frontend_cpu_us_per_op: float
    # Front-end CPU seconds per wall second while this side ran: near 1 means the harness, not the back end, set
    # the pace (the service thread serving the display socket counts, as it is the harness too).
    frontend_busy: float


@dataclass
class _Acc:
    lat: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    be_ns: int = 0
    fe_s: float = 0.0
    wall_s: float = 0.0
    ops: int = 0


def interleave(sides: list[Side], rounds: int, slice_s: float, min_calls: int = 3) -> dict[str, SideStats]:
    """Measure every side in `rounds` rounds of one `slice_s` slice each, rotating who goes first."""
    acc = {s.key: _Acc() for s in sides}
    for s in sides:
        s.run()  # warm up (first-touch of pages, caches, lazy imports) outside the figures
    for r in range(rounds):
        order = sides[r % len(sides):] + sides[:r % len(sides)]
        for s in order:
            a = acc[s.key]
            be0 = cpu_ns(s.pid) if s.pid else 0
            fe0 = self_cpu_s()
            calls = 0
            start = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                s.run()
                t1 = time.perf_counter()
                a.lat.append(t1 - t0)
                calls += 1
                if t1 - start >= slice_s and calls >= min_calls:
                    break
            elapsed = time.perf_counter() - start
            a.fe_s += self_cpu_s() - fe0
            a.wall_s += elapsed
            if s.pid:
                a.be_ns += cpu_ns(s.pid) - be0
            a.ops += calls * s.ops
            a.rates.append(calls * s.ops / elapsed)
    out = {}
    for s in sides:
        a = acc[s.key]
        lat = sorted(a.lat)
        out[s.key] = SideStats(
            s.key, s.label, s.ops, statistics.median(a.rates), a.rates, statistics.median(lat) * 1e6,
            lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6, len(lat),
            a.be_ns / 1e3 / a.ops if s.pid else None, a.fe_s * 1e6 / a.ops, a.fe_s / a.wall_s)
    return out


def ratio(stats: dict[str, SideStats], a: str, b: str) -> float:
    """Median over rounds of a's rate / b's rate in the same round (neighbours in time)."""
    return statistics.median(x / y for x, y in zip(stats[a].round_rates, stats[b].round_rates, strict=True))


def print_sides(title: str, unit: str, stats: dict[str, SideStats]) -> None:
    print(f"--- {title}")
    print(f"{'side':<40} {unit:>11} {'p50 us':>9} {'p99 us':>9} {'BE cpu us/op':>13} {'FE cpu us/op':>13} "
          f"{'FE busy':>8}")
    for st in stats.values():
        be = "-" if st.backend_cpu_us_per_op is None else f"{st.backend_cpu_us_per_op:.1f}"
        print(f"{st.label:<40} {st.ops_per_s:>11.1f} {st.p50_us:>9.1f} {st.p99_us:>9.1f} {be:>13} "
              f"{st.frontend_cpu_us_per_op:>13.1f} {st.frontend_busy:>8.2f}")


def print_ratios(ratios: dict[str, float]) -> None:
    for k, v in ratios.items():
        print(f"ratio  {k:<40} {v:.3f}")


@dataclass
class Settings:
    quick: bool
    rounds: int
    slice_s: float
    json_path: Path | None
    profile: str | None
    only: list[str] | None


def parse(doc: str, argv: list[str] | None, names: list[str], rounds: int = 7, slice_s: float = 0.4) -> Settings:
    """The options every side-by-side benchmark module takes."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 tiny rounds; writes nothing unless --json is given")
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--slice", type=float, default=slice_s, help="seconds per side per round")
    p.add_argument("--json", type=Path, metavar="DIR",
                   help="write the result files into DIR instead of benchmarks/results (quick runs included)")
    p.add_argument("--profile", metavar="PATH", help="run our back end under cProfile, writing PATH[.<benchmark>]")
    p.add_argument("--only", nargs="*", choices=names)
    a = p.parse_args(argv)
    if a.quick:
        return Settings(True, 2, 0.02, a.json, a.profile, a.only)
    return Settings(False, a.rounds, a.slice, a.json, a.profile, a.only)


def save(settings: Settings, name: str, data: dict[str, object]) -> None:
    """benchmarks/results/<name>.json in a full run; only into --json DIR otherwise (a quick run never overwrites
    the recorded results)."""
    data = {"benchmark": name, "rounds": settings.rounds, "slice_s": settings.slice_s, "quick": settings.quick,
            **data}
    if settings.json_path is not None:
        settings.json_path.mkdir(parents=True, exist_ok=True)
        path = settings.json_path / f"{name}.json"
        path.write_text(json.dumps({"machine": machine(), **data}, indent=2, default=plain) + "\n")
        print(f"result in {path}")
    elif not settings.quick:
        print(f"wrote {write_result(name, json.loads(json.dumps(data, default=plain)))}")


def plain(o: object) -> object:
    if isinstance(o, SideStats):
        return asdict(o)
    raise TypeError(type(o))


def profile_path(settings: Settings, name: str) -> str | None:
    return f"{settings.profile}.{name}" if settings.profile else None
