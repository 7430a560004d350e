"""``python -m vgpu_lab.clients_report``: real clients in a guest, on our back end and on QEMU's C one, side by side.

Runs :mod:`vgpu_lab.guest_clients`' modetest session and IGT's KMS programs inside a QEMU 10 guest
(``vhost-user-gpu-pci``) against each back end in turn, and writes ``spec/guest-clients.md``: modetest's answers
and whether the console showed the same pictures, then every IGT subtest's verdict for both.  Flip rates are
machine- and load-dependent and go to the JSON beside it (``--json``), not into the page.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vgpu_lab import provision
from vgpu_lab.guest_clients import (
    IGT_TESTS,
    MODETEST_PICTURES,
    ModetestReport,
    igt_results,
    igt_script,
    modetest_report,
    modetest_script,
    provision_clients,
    provision_sid_clients,
    run_clients,
    weston_script,
)
from vgpu_lab.qemu import Backend, socket_dir

BACKENDS = ("vgpu", "QEMU C")


@dataclass
class Side:
    modetest: ModetestReport
    igt: dict[str, dict[str, str]]
    weston_same: bool  # weston's own screenshot is what the console showed
    guest_ok: bool


def backend_command(which: str, lab: provision.Lab, pictures: Path | None = None) -> list[str]:
    if which == "vgpu":
        png = [f"--scanout-png={pictures}", "--png-history", "--png-rate=30"] if pictures else []
        return [sys.executable, "-m", "vgpu", "--socket-path={sock}", "--log-level=warning", *png]
    return [str(lab.qemu.vhost_user_gpu), "--socket-path={sock}"]


def run_side(which: str, lab: provision.Lab, sid_root: Path, work: Path, tests: Sequence[str]) -> Side:
    with socket_dir() as d:
        sock = d / "gpu.sock"
        with Backend(backend_command(which, lab), sock):
            mt = run_clients(lab, sock, modetest_script(), work / "modetest")
        with Backend(backend_command(which, lab), sock):
            igt = run_clients(lab, sock, igt_script(sid_root, tests), work / "igt", timeout=1800)
        with Backend(backend_command(which, lab), sock):
            weston = run_clients(lab, sock, weston_script(sid_root), work / "weston", outbox=work / "outbox")
    ok = all(r.guest.returncode == 0 and not r.guest.timed_out for r in (mt, igt, weston))
    shot = work / "outbox" / "weston-screenshot.png"
    console = weston.dumps.get("weston")
    same = False
    if shot.is_file() and console is not None:
        with Image.open(shot) as image:
            same = bool(np.array_equal(np.asarray(image.convert("RGB")), console))
    return Side(modetest_report(mt), igt_results(igt), same, ok)


def markdown(sides: dict[str, Side]) -> str:
    ours, qemu = sides["vgpu"], sides["QEMU C"]
    out = ["# Real clients in a guest: vgpu and QEMU's C vhost-user-gpu side by side", "",
           "Written by `python -m vgpu_lab.clients_report` (a QEMU 10 guest, `vhost-user-gpu-pci`, Linux 6.12, the",
           "clients run from the host's root over 9p: libdrm's `modetest` from bookworm's `libdrm-tests`, IGT from",
           "sid's `igt-gpu-tools-tests` 2.5 with `IGT_FORCE_DRIVER=virtio_gpu` — IGT has no driver bit for",
           "virtio-gpu, so without it every test skips). Verdicts only; nothing here depends on timing.", "",
           "## modetest", "", "| check | vgpu | QEMU C |", "|---|---|---|"]
    listed = [", ".join(side.modetest.connectors) or "none" for side in (ours, qemu)]
    out.append(f"| `-c` lists connectors | {listed[0]} | {listed[1]} |")
    out.append(f"| modes offered | {len(ours.modetest.modes)} | {len(qemu.modetest.modes)} |")
    for step in [name for name, _ in MODETEST_PICTURES] + ["flip", "cursor"]:
        out.append(f"| `{step}` exit status | {ours.modetest.exits.get(step, '—')} | "
                   f"{qemu.modetest.exits.get(step, '—')} |")
    for name, _ in MODETEST_PICTURES:
        a, b = ours.modetest.pictures.get(name), qemu.modetest.pictures.get(name)
        same = a is not None and b is not None and a.shape == b.shape and bool(np.array_equal(a, b))
        size = f"{a.shape[1]}x{a.shape[0]}" if a is not None else "none"
        out.append(f"| console picture `{name}` ({size}) identical | {'yes' if same else 'NO'} | (reference) |")
    out.append(f"| page flips seen (`-v`) | {'yes' if ours.modetest.flip_hz else 'no'} | "
               f"{'yes' if qemu.modetest.flip_hz else 'no'} |")
    out += ["", "## weston", "", "| check | vgpu | QEMU C |", "|---|---|---|",
            f"| weston 16 (DRM, pixman, kiosk) + weston-flower: its screenshot is the console's picture | "
            f"{'yes' if ours.weston_same else 'NO'} | {'yes' if qemu.weston_same else 'NO'} |"]
    out += ["", "## IGT", "", "| program | subtest | vgpu | QEMU C |", "|---|---|---|---|"]
    counts = {k: {"SUCCESS": 0, "SKIP": 0, "FAIL": 0, "other": 0} for k in sides}
    differ = 0
    for test in IGT_TESTS:
        names = list(dict.fromkeys([*ours.igt.get(test, {}), *qemu.igt.get(test, {})]))
        if not names:
            out.append(f"| {test} | (no subtest ran) | — | — |")
        for sub in names:
            va, vb = ours.igt.get(test, {}).get(sub, "not run"), qemu.igt.get(test, {}).get(sub, "not run")
            for key, v in (("vgpu", va), ("QEMU C", vb)):
                counts[key][v if v in counts[key] else "other"] += 1
            differ += va != vb
            mark = " **differs**" if va != vb else ""
            out.append(f"| {test} | {sub} | {va}{mark} | {vb} |")
    out += ["", "| back end | success | skip | fail | other |", "|---|---|---|---|---|"]
    for key, c in counts.items():
        out.append(f"| {key} | {c['SUCCESS']} | {c['SKIP']} | {c['FAIL']} | {c['other']} |")
    out += ["", f"Subtests whose verdict differs between the two back ends: {differ}.", ""]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vgpu_lab.clients_report", description=__doc__)
    p.add_argument("--output", type=Path, default=Path("spec") / "guest-clients.md")
    p.add_argument("--json", type=Path, help="also write the raw results (flip rates included) here")
    p.add_argument("--tests", default=",".join(IGT_TESTS), help="IGT programs, comma-separated")
    args = p.parse_args(argv)
    prov = provision.Provisioner()
    lab = prov.all()
    prov.qemu11()
    provision_clients(prov)
    sid_root = provision_sid_clients(prov)
    tests = [t for t in args.tests.split(",") if t]
    with tempfile.TemporaryDirectory(prefix="vgpu-clients-") as tmp:
        sides = {which: run_side(which, lab, sid_root, Path(tmp) / which.replace(" ", "-"), tests)
                 for which in BACKENDS}
    args.output.write_text(markdown(sides))
    if args.json:
        raw = {k: {"guest_ok": side.guest_ok, "weston_same": side.weston_same, "igt": side.igt,
                   "modetest": {"connectors": side.modetest.connectors, "modes": side.modetest.modes,
                                "exits": side.modetest.exits, "flip_hz": side.modetest.flip_hz}}
               for k, side in sides.items()}
        args.json.write_text(json.dumps(raw, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0 if all(s.guest_ok for s in sides.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
