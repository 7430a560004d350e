"""Faults: what our back end does when its VMM fails under it — measured, one row per fault.

    python -m benchmarks.faults [--no-qemu] [--cut-rounds N] [--faults NAME ...] [--json DIR]

Each fault hits one back-end process in turn (``tests.fault_scenarios``): SIGKILL of the VMM with blobs mapped,
in MAP_BLOB with the SHMEM_MAP ack pending, in the middle of a batch of transfers; the main socket closing while a
map waits; SIGSTOP while a map waits (then SIGCONT and the late ack) and while frames go to the display; a
disconnect after each message of the
set-up; and SIGKILL of a real QEMU 11.1 whose guest holds a mapped blob, followed by a fresh QEMU. For each:
whether the process survived, its fds and RSS before (idle) and after, what it still held (memfds in
/proc/PID/fd and /proc/PID/maps), the line it logged about what it dropped, how long until it was back at its idle
fds, and how long from the fault until the next VMM had a blob mapped. Writes benchmarks/results/faults.json.
These are observations, not timed assertions (tests/test_faults.py checks the same faults briefly).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, machine, write_result
from tests import fault_scenarios as fs
from vgpu_lab.shell import ProvisionError


def qemu_row(work: Path) -> fs.Fault:
    from tests.fault_qemu import qemu_kill_with_a_blob_mapped
    from vgpu_lab import provision

    f = fs.Fault("SIGKILL of QEMU with a guest's blob mapped", "QEMU 11.1 (sid chroot)")
    try:
        p = provision.Provisioner()
        p.qemu11()
        p.guest_kernel()
        p.busybox()
        p.guest_programs()
    except (ProvisionError, OSError) as e:
        f.details["not_run"] = f"lab unavailable: {e}"
        return f
    return qemu_kill_with_a_blob_mapped(p, work)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| fault | VMM | outcome | fds before → after | RSS KiB before → after | back to idle fds | next VMM "
             "served | what the back end logged | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "not_run" in r["details"]:
            outcome = f"not run: {r['details']['not_run']}"
        else:
            outcome = "survived, freed, next VMM served" if r["ok"] else \
                f"FAILED (survived {r['survived']}, released {r['released']}, served next {r['served_next']}, " \
                f"held {len(r['held_after'])})"
        lines.append(f"| {r['fault']} | {r['vmm']} | {outcome} | {r['fds_before']} → {r['fds_after']} | "
                     f"{r['rss_before_kib']:,} → {r['rss_after_kib']:,} | {r['release_s']:.2f} s | "
                     f"{r['next_vmm_s']:.2f} s | {r['dropped'] or '—'} | {r['note']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-qemu", action="store_true", help="skip the QEMU 11.1 row (no lab needed)")
    ap.add_argument("--cut-rounds", type=int, default=5, help="rounds of the set-up cuts (RSS over many cuts)")
    ap.add_argument("--faults", nargs="+", metavar="NAME", choices=[f.__name__ for f in fs.FRONTEND_FAULTS],
                    help="only these front-end faults (default: all)")
    ap.add_argument("--json", type=Path, metavar="DIR", help=f"write faults.json here instead of {RESULTS}")
    args = ap.parse_args(argv)
    started = time.monotonic()
    rows: list[fs.Fault] = []
    with tempfile.TemporaryDirectory(prefix="vgpu-faults-") as d:
        s = fs.Subject(Path(d))
        try:
            for scenario in fs.FRONTEND_FAULTS:
                if args.faults and scenario.__name__ not in args.faults:
                    continue
                if scenario is fs.disconnects_during_setup:
                    rows.append(fs.disconnects_during_setup(s, args.cut_rounds))
                else:
                    rows.append(scenario(s))
                fs.write_log(rows[-1], sys.stdout)
        finally:
            s.close()
        if not args.no_qemu:
            rows.append(qemu_row(Path(d) / "qemu"))
            fs.write_log(rows[-1], sys.stdout)
    row_data = [r.row() for r in rows]
    data = {"rows": row_data, "all_ok": all(r.ok for r in rows if "not_run" not in r.details),
            "wall_s": round(time.monotonic() - started, 1)}
    print(table(row_data))
    if args.json is not None:
        args.json.mkdir(parents=True, exist_ok=True)
        (args.json / "faults.json").write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
        print(f"(written to {args.json / 'faults.json'})")
    else:
        print(f"wrote {write_result('faults', data)}")
    return 0 if data["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
