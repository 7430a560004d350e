"""Inputs from files through the same entry point, without atheris: reproducers, the corpus, the coverage run.

A watchdog (faulthandler) stops a replay that hangs on one input, printing where every thread was.
"""

from __future__ import annotations

import faulthandler
import gc
import json
from pathlib import Path
from typing import Any

from .checks import Failure, fd_count, rss_bytes
from .harness import Harness, save_failure


def input_files(paths: list[Path]) -> list[Path]:
    """Files named directly, and every file under a directory named (recursively, sorted), notes (.txt) aside."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix != ".txt"))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(p)
    return out


def infer_target(paths: list[Path]) -> str | None:
    """`commands` or `vhost_user` when every path lies under a directory of that name (the corpus layout)."""
    found = {part for p in paths for part in p.resolve().parts if part in ("commands", "vhost_user")}
    return found.pop() if len(found) == 1 else None


def replay(target: str, paths: list[Path], timeout: float, save: Path | None = None,
           rounds: int = 1) -> dict[str, Any]:
    """Every file through the target, `rounds` times over; RSS is taken after each round (with several rounds,
    the same inputs again and again: memory that keeps growing is the product's, not the fuzzer's)."""
    files = [(f, f.read_bytes()) for f in input_files(paths)]
    fds_before, rss_before = fd_count(), rss_bytes()
    # The fd baseline after the first input: a replay of a handful of files still checks that nothing is kept.
    h = Harness(target, probe_every=1 << 62, warmup=1)
    failures: list[dict[str, str]] = []
    rss_rounds = []
    for _ in range(rounds):
        for f, data in files:
            faulthandler.dump_traceback_later(timeout, exit=True)
            try:
                h.one(data)
            except Failure as e:
                failures.append({"kind": e.kind, "file": str(f), "what": str(e)})
                if save is not None:
                    save_failure(save, e, data)
            finally:
                faulthandler.cancel_dump_traceback_later()
        gc.collect()
        rss_rounds.append(rss_bytes())
    h.close()
    return {"target": target, "inputs": h.inputs, "units": h.units, "failures": failures,
            "fds": {"before": fds_before, "after": fd_count()},
            "rss_bytes": {"before": rss_before, "after": rss_bytes(), "rounds": rss_rounds}}


def print_result(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['target']}: {result['inputs']} inputs, {result['units']} units, "
          f"{len(result['failures'])} failures; fds {result['fds']['before']} -> {result['fds']['after']}")
    for f in result["failures"]:
        print(f"  {f['kind']}: {f['file']}\n    " + f["what"].replace("\n", "\n    "))
