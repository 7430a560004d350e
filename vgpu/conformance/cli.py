"""`vgpu-conformance`: put any vhost-user GPU back end through the catalogue and print one verdict per
requirement."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ..vhost_user.profiles import PROFILES, QEMU
from .catalogue import DEFAULT_CATALOGUE, load
from .runner import FAIL, CheckResult, retry_timeouts, run, table


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vgpu-conformance", description=__doc__)
    p.add_argument("--backend", required=True, metavar="CMD",
                   help="the back-end command, with {sock} where the socket path goes, e.g. "
                        "'/usr/lib/qemu/vhost-user-gpu --socket-path={sock}'")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--only", nargs="+", metavar="ID", help="run only these requirement ids")
    p.add_argument("--catalogue", type=Path, default=DEFAULT_CATALOGUE, help="requirement catalogue (TOML)")
    p.add_argument("--quiet", action="store_true", help="no per-check progress on stderr")
    p.add_argument("--profile", choices=sorted(PROFILES), default=QEMU.name,
                   help="set every session up as this VMM does (vgpu.vhost_user.profiles; crosvm: its sequence, "
                        "no display socket)")
    p.add_argument("--retry-timeouts", action="store_true",
                   help="run requirements that failed only by timing out once more, on a fresh process")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def progress(r: CheckResult) -> None:
        if not args.quiet:
            print(f"  {r.status:<4} {r.requirement}/{r.name} ({r.seconds:.2f} s)", file=sys.stderr, flush=True)

    try:
        catalogue = load(args.catalogue)
        result = run(args.backend, catalogue, args.only, progress=progress, profile=PROFILES[args.profile])
        if args.retry_timeouts:
            result = retry_timeouts(result, catalogue)
    except ValueError as e:
        parser().error(str(e))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return 1 if result.counts()[FAIL] else 0


if __name__ == "__main__":
    sys.exit(main())
