"""The long run: a fuzzing worker in a process of its own, then its findings, memory and coverage, as one report.

The worker (`worker`) may end in ways Python cannot report (libFuzzer kills it on a hang or a deadly signal), so
this parent starts it, waits, and reads what it left: its statistics file, libFuzzer's artifacts (``timeout-``,
``crash-``, ``oom-``) and our own reproducers (``crash-``, ``leak-``, ``hang-``). Line coverage is measured
afterwards by replaying the corpus the run grew (every input that reached new code) under coverage.py, without
atheris: what the fuzzer reached, counted in the product's own lines.

Memory is judged twice. During the run RSS climbs by tens of MB while live Python objects stay flat: libFuzzer and
atheris grow their own tables as coverage grows, so that figure is reported with a wide slack. The product's own
growth is measured apart: the grown corpus, which holds every behaviour the run reached, replayed many times over
in one process without atheris. Its RSS may step up in the first rounds (the allocator's high-water mark: numpy
images up to the quota come and go) and must then hold: over the second half of the rounds, thousands of inputs,
it may move by no more than STEADY_SLACK (a leak of a few hundred bytes per input would show).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Final

HERE: Final = Path(__file__).resolve().parent
SEEDS: Final = HERE / "corpus"
REPRODUCERS: Final = HERE / "reproducers"
PACKAGES: Final = ("vgpu/gpu", "vgpu/protocol", "vgpu/vhost_user")
# The VMM side of the vhost-user package (what plays QEMU and the guest for tests) and its example device are not
# the back end: they stay out of the coverage figures (the commands harness itself runs the driver code).
NOT_BACKEND: Final = ("vgpu/vhost_user/frontend.py", "vgpu/vhost_user/driver.py", "vgpu/vhost_user/examples/")
MAX_LEN: Final = {"commands": 4096, "vhost_user": 8192}
#: Memory a run may gain after warm-up before it counts as growth: libFuzzer keeps its corpus in memory (a few
#: MB), CPython's allocator keeps arenas it once needed, and numpy images of up to the 32 MiB quota come and go.
RSS_SLACK: Final = 64 << 20
OBJECTS_SLACK: Final = 0.05
STEADY_ROUNDS: Final = 20
STEADY_SLACK: Final = 2 << 20
FINDINGS: Final = {"crash": "crashes", "hang": "hangs", "timeout": "hangs", "leak": "leaks", "oom": "memory_growth"}


def run(target: str, units: int, max_time: float, timeout: int, work: Path | None, seed: int, probe_every: int,
        extra: list[str], measure_coverage: bool = True) -> dict[str, Any]:
    work = work or Path(tempfile.mkdtemp(prefix=f"vgpu-fuzz-{target}-"))
    corpus, artifacts, stats = work / "corpus", work / "artifacts", work / "stats.json"
    for d in (corpus, artifacts):
        d.mkdir(parents=True, exist_ok=True)
    seeds = [d for d in (SEEDS / target, REPRODUCERS / target) if d.is_dir()]
    libfuzzer = [f"-max_len={MAX_LEN[target]}", f"-timeout={timeout}", f"-artifact_prefix={artifacts}/",
                 "-rss_limit_mb=4096", f"-seed={seed}", "-use_value_profile=1", *extra,
                 str(corpus), *map(str, seeds)]
    cmd = [sys.executable, "-m", "vgpu_fuzz", "worker", target, "--units", str(units), "--max-time", str(max_time),
           "--stats", str(stats), "--artifacts", str(artifacts), "--probe-every", str(probe_every), "--",
           *libfuzzer]
    log = work / "worker.log"
    print(f"vgpu_fuzz: {target}: working in {work} (log: {log})", file=sys.stderr, flush=True)
    with open(log, "wb") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    worker = json.loads(stats.read_text()) if stats.exists() else {}
    result = summarise(target, worker, rc, artifacts, log.read_text(errors="replace"))
    result["corpus"] = {"seeds": sum(len(list(d.iterdir())) for d in seeds), "grown": len(list(corpus.iterdir()))}
    result["coverage"] = coverage(target, [corpus, *seeds], work) if measure_coverage else None
    if measure_coverage:
        steady = steady_state(target, [corpus, *seeds])
        result["memory"]["steady_replay"] = steady
        result["memory_growth"] += int(steady["grew"])
    result["run"] = {"work": str(work), "libfuzzer": libfuzzer[:-1 - len(seeds)], "seed": seed,
                     "command": f"python -m vgpu_fuzz run {target} --units {units}"}
    return result


def summarise(target: str, worker: dict[str, Any], rc: int, artifacts: Path, log: str) -> dict[str, Any]:
    findings = {"crashes": 0, "hangs": 0, "leaks": 0, "memory_growth": 0}
    files = sorted(p.name for p in artifacts.iterdir() if p.suffix != ".txt")
    for name in files:
        findings[FINDINGS.get(name.split("-", 1)[0], "crashes")] += 1
    warm = (worker.get("probes") or [None])[0]
    end = worker.get("end")
    memory: dict[str, Any] = {"start": worker.get("start"), "after_warmup": warm, "end": end}
    if warm and end:
        rss_growth = end["rss_bytes"] - warm["rss_bytes"]
        obj_growth = end["python_objects"] - warm["python_objects"]
        grew = rss_growth > RSS_SLACK or obj_growth > OBJECTS_SLACK * warm["python_objects"]
        memory.update(rss_growth_bytes=rss_growth, python_objects_growth=obj_growth, grew=grew,
                      rule=f"growth after warm-up above {RSS_SLACK >> 20} MiB RSS or "
                           f"{OBJECTS_SLACK:.0%} of live Python objects")
        findings["memory_growth"] += int(grew)
    complete = bool(worker.get("final"))
    cov = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", log)
    return {
        "target": target,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "engine": f"atheris {metadata.version('atheris')} (libFuzzer), Python {platform.python_version()}",
        "units_executed": worker.get("units", 0), "inputs": worker.get("inputs", 0),
        "seconds": worker.get("seconds"), "completed": complete, "worker_exit": rc,
        **findings, "failures": worker.get("failures", []), "artifacts": files,
        "fds": {"after_warmup": worker.get("baseline_fds"), "end": (end or {}).get("fds")},
        "memory": memory,
        "probes": worker.get("probes", []),
        "libfuzzer_coverage": dict(zip(("edges", "features", "corpus"), map(int, cov[-1]), strict=True))
        if cov else None,
    }


def coverage(target: str, dirs: list[Path], work: Path) -> dict[str, Any]:
    """Line coverage of the back end's packages by a replay of `dirs`, under coverage.py."""
    data, out = work / "coverage.data", work / "coverage.json"
    env = {**os.environ, "COVERAGE_FILE": str(data)}
    replay = [sys.executable, "-m", "coverage", "run", "--source=vgpu", "-m", "vgpu_fuzz", "replay", target,
              *map(str, dirs)]
    subprocess.run(replay, env=env, check=False, stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "coverage", "json", "-q", "-o", str(out)], env=env, check=True)
    files = json.loads(out.read_text())["files"]
    result: dict[str, Any] = {"excluded": list(NOT_BACKEND)}
    for pkg in PACKAGES:
        lines = covered = 0
        for name, f in files.items():
            path = name.replace(os.sep, "/")
            rel = path[path.rfind("vgpu/"):]
            if rel.startswith(pkg + "/") and not rel.startswith(NOT_BACKEND):
                lines += f["summary"]["num_statements"]
                covered += f["summary"]["covered_lines"]
        result[pkg] = {"lines": lines, "covered": covered, "percent": round(100 * covered / lines, 1) if lines else 0}
    return result


def steady_state(target: str, dirs: list[Path]) -> dict[str, Any]:
    """RSS over STEADY_ROUNDS replays of `dirs` in one process (no atheris): the product's memory, alone."""
    cmd = [sys.executable, "-m", "vgpu_fuzz", "replay", target, *map(str, dirs), "--rounds", str(STEADY_ROUNDS),
           "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    out = json.loads(p.stdout[p.stdout.index("{"):])
    rounds = out["rss_bytes"]["rounds"]
    half = rounds[len(rounds) // 2 - 1]
    growth = rounds[-1] - half
    return {"rounds": STEADY_ROUNDS, "inputs": out["inputs"], "failures": len(out["failures"]),
            "rss_per_round": rounds, "growth_bytes": growth, "growth_from_first_round_bytes": rounds[-1] - rounds[0],
            "fds": out["fds"], "grew": growth > STEADY_SLACK or bool(out["failures"]),
            "rule": f"RSS over the second half of the rounds grows by at most {STEADY_SLACK >> 20} MiB"}


def write_report(path: Path, result: dict[str, Any]) -> None:
    report: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    report.setdefault("about", "python -m vgpu_fuzz run TARGET: coverage-guided fuzzing (atheris) of the back end; "
                                "see tools/vgpu_fuzz/__init__.py")
    report.setdefault("targets", {})[result["target"]] = result
    path.write_text(json.dumps(report, indent=1) + "\n")
