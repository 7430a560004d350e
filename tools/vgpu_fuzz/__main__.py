"""python -m vgpu_fuzz {run,replay,seeds,table} (and `worker`, which `run` starts)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Nothing of the product is imported at module level: the worker must import it under atheris's instrumentation.
TARGETS = ("commands", "vhost_user")
REPORT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "fuzz.json"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vgpu_fuzz", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="fuzz one entry point; findings, memory and coverage into the report")
    r.add_argument("target", choices=TARGETS)
    r.add_argument("--units", type=int, required=True,
                   help="stop after this many guest commands (commands) or vhost-user messages (vhost_user)")
    r.add_argument("--max-time", type=float, default=6 * 3600.0, help="or after this many seconds")
    r.add_argument("--timeout", type=int, default=30, help="an input running longer is a hang (libFuzzer)")
    r.add_argument("--work", type=Path, help="corpus, artifacts and logs (default: a new temporary directory)")
    r.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    r.add_argument("--probe-every", type=int, default=20000, help="inputs between memory probes")
    r.add_argument("--report", type=Path, default=REPORT, help="the JSON report to update (default: %(default)s)")
    r.add_argument("--no-report", action="store_true", help="print the result, write no report")
    r.add_argument("--no-coverage", action="store_true", help="skip the coverage replay (a quick run)")
    r.epilog = "Extra libFuzzer flags go after --, e.g. -- -max_len=2048 -dict=FILE"

    rp = sub.add_parser("replay", help="run inputs from files through an entry point (no atheris)")
    rp.add_argument("target", nargs="?", help=f"{' or '.join(TARGETS)}; default: inferred from the paths "
                    "(a commands/ or vhost_user/ directory)")
    rp.add_argument("paths", nargs="+", type=Path)
    rp.add_argument("--timeout", type=float, default=30.0, help="a hang: stop with every thread's stack")
    rp.add_argument("--save", type=Path, help="write reproducers of failing inputs here")
    rp.add_argument("--rounds", type=int, default=1, help="replay everything this many times (a memory check)")
    rp.add_argument("--json", action="store_true")

    w = sub.add_parser("worker", help=argparse.SUPPRESS)
    w.add_argument("target", choices=TARGETS)
    w.add_argument("--units", type=int, required=True)
    w.add_argument("--max-time", type=float, required=True)
    w.add_argument("--stats", type=Path, required=True)
    w.add_argument("--artifacts", type=Path, required=True)
    w.add_argument("--probe-every", type=int, required=True)

    s = sub.add_parser("seeds", help="rewrite the committed seed corpus")
    s.add_argument("--out", type=Path, help="default: the corpus beside this package")

    t = sub.add_parser("table", help="the report as a Markdown table")
    t.add_argument("--report", type=Path, default=REPORT)
    t.add_argument("--update-readme", action="store_true", help="replace the table between its markers in README")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # libFuzzer's flags come after `--` (argparse will not take arguments that look like options there).
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser().parse_args(argv[:split])
    args.libfuzzer = argv[split + 1:]
    if args.cmd == "worker":
        from . import worker
        worker.main(args.target, args.units, args.max_time, args.stats, args.artifacts, args.probe_every,
                    args.libfuzzer)
        return 1  # not reached: the worker leaves through os._exit or libFuzzer
    if args.cmd == "run":
        from . import runner
        result = runner.run(args.target, args.units, args.max_time, args.timeout, args.work, args.seed,
                            args.probe_every, args.libfuzzer, not args.no_coverage)
        if not args.no_report:
            runner.write_report(args.report, result)
        print(json.dumps({k: v for k, v in result.items() if k != "probes"}, indent=1))
        bad = result["crashes"] + result["hangs"] + result["leaks"] + result["memory_growth"]
        return 1 if bad or not result["completed"] else 0
    if args.cmd == "replay":
        from .replay import infer_target, print_result, replay
        if args.target is not None and args.target not in TARGETS:  # a path, not a target: infer it
            args.paths.insert(0, Path(args.target))
            args.target = None
        target = args.target or infer_target(args.paths)
        if target is None:
            parser().error("give the target: the paths do not say which entry point they are for")
        result = replay(target, args.paths, args.timeout, args.save, args.rounds)
        print_result(result, args.json)
        return 1 if result["failures"] else 0
    if args.cmd == "seeds":
        from . import seeds
        seeds.write_all(args.out)
        return 0
    from . import table
    text = table.render(json.loads(args.report.read_text()))
    if args.update_readme:
        table.update_readme(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
