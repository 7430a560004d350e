"""Soak: one back-end process serves many real guests in a row; its fds and RSS after each, as a curve.

    python -m benchmarks.soak [--guests N] [--kinds qemu11 qemu10] [--json DIR] [--replot SOAK_JSON ...]

For each kind (``vgpu_lab.soak``): QEMU 11.1's guests map two host-visible blobs and draw a KMS frame on guest
blobs; QEMU 10's draw fbcon and a KMS frame through vhost-user-gpu-pci. One back end per kind, started once,
serves N guests one after another. Per guest: seconds, the guest's own check, whether its frame is among our
pictures, blobs mapped, fds and RSS after it (and their peaks during it). Writes benchmarks/results/soak.json
after every guest (``complete`` false until the end, so a long run's partial numbers survive) and the curves
soak.png (RSS) and soak_fds.png. Observations, not timed assertions; tests/e2e/test_soak.py runs a short one.
Each guest takes 7-20 s under TCG on 2 shared cores: 100 of each is about an hour; run it under ``nice``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, machine
from benchmarks.curve import Series, line_chart
from benchmarks.figure import BLUE, GREEN, ORANGE, Color
from vgpu_lab import provision, soak
from vgpu_lab.shell import ProvisionError

COLORS: dict[str, tuple[Color, Color]] = {"qemu11": (BLUE, (150, 175, 225)), "qemu10": (GREEN, (150, 210, 160))}


def write(out: Path, runs: list[soak.SoakRun], complete: bool, started: float) -> None:
    data = {
        "machine": machine(), "complete": complete, "wall_s": round(time.monotonic() - started, 1),
        "rss_slack_kib": soak.RSS_SLACK_KIB,
        "all_ok": complete and all(not r.failures for r in runs),
        "runs": [{**r.summary(), "guests_detail": [soak.record_row(g) for g in r.records]} for r in runs],
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "soak.json.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(out / "soak.json")


def figures(out: Path, runs: list[soak.SoakRun]) -> list[Path]:
    rss: list[Series] = []
    fds: list[Series] = []
    notes = []
    for r in runs:
        line, light = COLORS.get(r.kind, (ORANGE, ORANGE))
        bad = [g.index for g in r.records if not (g.guest_ok and g.frame_ok)]
        rss.append(Series(f"{r.kind}: RSS after each guest", [g.rss_after_kib / 1024 for g in r.records], line, bad))
        rss.append(Series(f"{r.kind}: peak RSS during each guest", [g.rss_peak_kib / 1024 for g in r.records], light))
        fds.append(Series(f"{r.kind}: fds after each guest", [g.fds_after for g in r.records], line, bad))
        fds.append(Series(f"{r.kind}: peak fds during each guest", [g.fds_peak for g in r.records], light))
        after = [g.rss_after_kib for g in r.records]
        ok = sum(g.guest_ok and g.frame_ok for g in r.records)
        notes.append(f"{r.kind}: {ok}/{len(r.records)} guests ok; idle before any guest {r.idle_fds_cold} fds, "
                     f"{r.idle_rss_cold_kib / 1024:.1f} MiB")
        notes.append(f"  after each guest: at most {max(g.fds_after for g in r.records)} fds, "
                     f"RSS at most {max(after) / 1024:.1f} MiB, trend {r.rss_slope_kib():+.1f} KiB/guest")
    return [
        line_chart(out / "soak.png", "Soak: one back end, consecutive guests - RSS", rss, x_label="guest",
                   y_label="MiB resident", y_min=0, notes=notes),
        line_chart(out / "soak_fds.png", "Soak: one back end, consecutive guests - open fds", fds, x_label="guest",
                   y_label="open fds", y_min=0, notes=notes),
    ]


def read_runs(path: Path) -> list[soak.SoakRun]:
    """The runs a soak.json recorded (complete or not), to merge runs made apart or redraw their figures."""
    out = []
    for r in json.loads(path.read_text())["runs"]:
        run = soak.SoakRun(r["kind"], r["vmm"], r["idle_fds_cold"], r["idle_rss_cold_kib"],
                           [soak.GuestRecord(**g) for g in r["guests_detail"]], r["backend_alive"])
        out.append(run)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guests", type=int, default=100, help="guests per kind (default 100)")
    ap.add_argument("--kinds", nargs="+", choices=soak.KINDS, default=list(soak.KINDS))
    ap.add_argument("--work", type=Path, metavar="DIR",
                    help="keep the work directory here (initrds, each failed guest's serial and our log)")
    ap.add_argument("--json", type=Path, metavar="DIR", default=RESULTS,
                    help="where soak.json and the figures go (default benchmarks/results)")
    ap.add_argument("--replot", type=Path, nargs="+", metavar="SOAK_JSON",
                    help="run no guests: merge these soak.json files (one run per kind, the last file's wins) and "
                         "write soak.json and the figures from them (e.g. kinds soaked by separate invocations)")
    args = ap.parse_args(argv)
    started = time.monotonic()
    if args.replot:
        by_kind = {r.kind: r for path in args.replot for r in read_runs(path)}
        merged = [by_kind[k] for k in soak.KINDS if k in by_kind]
        # Complete when every kind has the guests asked for (--guests): a partial run's file says false forever.
        write(args.json, merged, all(len(r.records) >= args.guests for r in merged), started)
        for path in figures(args.json, merged):
            print(f"wrote {path}")
        return 0 if all(not r.failures for r in merged) else 1
    try:
        p = provision.Provisioner()
    except (ProvisionError, OSError) as e:
        print(f"lab unavailable: {e}", file=sys.stderr)
        return 2
    runs: list[soak.SoakRun] = []

    def progress(run: soak.SoakRun, g: soak.GuestRecord) -> None:
        state = "ok" if g.guest_ok and g.frame_ok else f"FAIL {g.failure or 'frame not seen'}"
        print(f"{run.kind} guest {g.index:3d}: {g.seconds:6.2f} s  fds {g.fds_after} (peak {g.fds_peak})  RSS "
              f"{g.rss_after_kib} KiB (peak {g.rss_peak_kib})  maps {g.maps}  {state}", flush=True)
        write(args.json, [*runs, run], False, started)

    with tempfile.TemporaryDirectory(prefix="vgpu-soak-") as tmp:
        d = args.work or Path(tmp)
        for kind in args.kinds:
            try:
                runs.append(soak.soak(p, kind, args.guests, Path(d) / kind, progress))
            except (ProvisionError, OSError) as e:
                print(f"{kind}: lab unavailable: {e}", file=sys.stderr)
                return 2
            for failure in runs[-1].failures:
                print(f"{kind}: {failure}")
    write(args.json, runs, True, started)
    for path in figures(args.json, runs):
        print(f"wrote {path}")
    print(json.dumps([r.summary() for r in runs], indent=2))
    return 0 if all(not r.failures for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
