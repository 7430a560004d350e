"""The whole benchmark suite in one command: ``python -m benchmarks.run_all``.

Runs every benchmark module in its own process (a crashed or leaking one cannot skew the next), then prints the
figures against the issue's goals (benchmarks.table) and draws them as PNG plots next to each benchmark's JSON in
benchmarks/results/.  The side-by-side modules (commands, transfers, blob_lifecycle, process_costs) measure ours,
QEMU's C back end and a floor through the same front end, interleaved.  About 3 minutes on this machine kind when
the lab (QEMU, the patched guest kernel) is provisioned; well under the 10-minute budget.

``--quick`` runs each benchmark at its tiny size and writes nothing (the test suite's smoke check); with
``--json DIR`` the side-by-side modules write their results into DIR instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import table
from benchmarks.common import REPO, RESULTS, write_result
from benchmarks.figure import GREEN, ORANGE, RED, Bar, hbar_chart

#: Side-by-side modules first (they take --json), then the ones that compare a back end with itself.
SIDE_BY_SIDE = ("commands", "transfers", "blob_lifecycle", "process_costs")
BENCHMARKS = (*SIDE_BY_SIDE, "transfer_copy", "scale", "cache_matrix")
#: Goals of the figures table.py does not cover: (minimum or maximum, target).
TARGETS = {
    "2D mix p50, 10000 / 10 live resources": ("<=", 1.2),
    "blob life cycle p50, 1000 / 10 mapped blobs": ("<=", 1.2),
    "dangerous answers, ours": ("<=", 0),
}


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def headline() -> dict[str, float]:
    """The figures the issue names, from the results the benchmarks just wrote."""
    out: dict[str, float] = {}
    for goal, _result, value in table.evaluate():
        out[goal.what] = value
        TARGETS[goal.what] = (goal.op, goal.target)
    if (s := _load("scale")) is not None:
        lv = s["resources_2d"]["levels"]
        out[f"2D mix p50, {lv[-1]} / {lv[0]} live resources"] = float(s["resources_2d"]["p50_ratio_highest_to_lowest"])
        lb = s["mapped_blobs"]["levels"]
        out[f"blob life cycle p50, {lb[-1]} / {lb[0]} mapped blobs"] = float(
            s["mapped_blobs"]["p50_ratio_highest_to_lowest"])
    if (c := _load("cache_matrix")) is not None:
        for key, name in c["strategies"].items():
            out[f"dangerous answers, {'ours' if key == 'ours' else name}"] = float(c["counts"][key]["dangerous"])
    return out


def verdict(name: str, value: float) -> str:
    if name not in TARGETS:
        return ""
    op, target = TARGETS[name]
    ok = value >= target if op == ">=" else value <= target
    shown = f"{target:,.0f}" if target >= 100 else f"{target:.3g}"
    return f"target {op} {shown}: {'met' if ok else 'NOT met'}"


def plots(ratios: dict[str, float]) -> list[Path]:
    out = []
    bars = []
    for name, value in ratios.items():
        if name.startswith("dangerous") or name not in TARGETS or TARGETS[name][1] > 10:
            continue  # counts and absolute rates do not share a ratio axis
        v = verdict(name, value)
        color = GREEN if "met" in v and "NOT" not in v else (RED if "NOT" in v else ORANGE)
        bars.append(Bar(name[:60], value, color, f"{value:.2f}"))
    out.append(hbar_chart(RESULTS / "ratios.png", "VGPU BENCHMARK RATIOS (SIDE BY SIDE, ONE RUN)", bars,
                          unit="green: issue target met; red: not met; orange: no target",
                          notes=[time.strftime("%Y-%m-%d") + " - see benchmarks/results/*.json for the machine"]))
    if (s := _load("scale")) is not None:
        sb = []
        for level in s["resources_2d"]["levels"]:
            rate = s["resources_2d"]["rates"][str(level)]
            sb.append(Bar(f"2D mix, {level} live resources", rate["p50_us"], GREEN, f"p50 {rate['p50_us']:.0f} us"))
        sb.append(Bar("", 0))
        for level in s["mapped_blobs"]["levels"]:
            cyc = s["mapped_blobs"]["cycles"][str(level)]
            sb.append(Bar(f"blob life cycle, {level} mapped", cyc["p50_us"], ORANGE, f"p50 {cyc['p50_us']:.0f} us"))
        out.append(hbar_chart(RESULTS / "scale.png", "LATENCY AGAINST THE NUMBER OF LIVE RESOURCES", sb,
                              unit="median microseconds per 2D mix (5 commands) / per blob life cycle (5 commands)"))
    if (b := _load("blob_lifecycle")) is not None:
        lb = [Bar(step, p50, GREEN, f"p50 {p50:.0f} us, p99 {p99:.0f} us")
              for step, (p50, p99) in b["steps_us"].items()]
        out.append(hbar_chart(RESULTS / "blob_lifecycle.png", "HOST-BLOB LIFE CYCLE, PER STEP (VGPU)", lb,
                              unit="QEMU's C back end has no blobs: no ratio"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, nothing written")
    p.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run only these")
    p.add_argument("--json", type=Path, metavar="DIR", help="side-by-side results into DIR (see the modules)")
    args = p.parse_args(argv)
    started = time.monotonic()
    times: dict[str, float] = {}
    failed = []
    for name in args.only or BENCHMARKS:
        print(f"=== {name}", flush=True)
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *(["--quick"] if args.quick else []),
               *([f"--json={args.json}"] if args.json and name in SIDE_BY_SIDE else [])]
        rc = subprocess.run(cmd, cwd=REPO, check=False).returncode
        times[name] = time.monotonic() - t0
        print(f"=== {name}: {times[name]:.1f} s{'' if rc == 0 else f', FAILED with {rc}'}", flush=True)
        if rc != 0:
            failed.append(name)
    total = time.monotonic() - started
    print("\nrun times: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) + f"; total {total:.1f} s")
    if args.quick or args.json:
        print("quick run: nothing written to benchmarks/results, no ratios summarised")
        return 1 if failed else 0
    ratios = headline()
    print("\nheadline ratios")
    for name, value in ratios.items():
        print(f"ratio  {name:<52} {value:8.2f}  {verdict(name, value)}")
    print(f"wrote {write_result('summary', {'ratios': ratios, 'run_seconds': times, 'total_seconds': total})}")
    for path in plots(ratios):
        print(f"wrote {path}")
    print("\n" + "\n".join(table.rows()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
