"""The arm64 column of the cache matrix: what each strategy's answer becomes in an arm64 guest, as measured there.

``python -m benchmarks.arm64_column`` boots the arm64 guest (:mod:`vgpu_lab.arm64`: QEMU 11.1's
``qemu-system-aarch64``, Debian's arm64 6.12, about 25 s) with one GPU per map_info our back end can send, reads
the memory type the guest kernel used for each mapping from the guest's own page table, tries an unaligned
``memcpy`` into each, and writes ``benchmarks/results/arm64_memory_types.json``.

:mod:`benchmarks.cache_matrix` reads that file to judge every row a second time, for arm64 guests.  A strategy's
answer becomes the guest memory type measured for it; our device (``ours``, ``ours_stock``) first adapts its
answer to the guest as the back end does with ``--guest-arch=aarch64`` (:func:`vgpu.blob.guest_arch.for_guest`).
The host side is the row's truth as an arm64 host kernel maps it (``arch/arm64/include/asm/pgtable.h``: the
default pgprot is MT_NORMAL, ``pgprot_writecombine`` MT_NORMAL_NC, ``pgprot_noncached`` MT_DEVICE_nGnRnE).
Verdicts as on x86: *dangerous* when the guest's memory is cacheable and the host's is not, *slow* the reverse,
*other* when both are non-cacheable but of different types (Normal-NC for Device is our deliberate choice: see
``spec/arm64.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from benchmarks import truths
from benchmarks.common import RESULTS, write_result
from benchmarks.figure import GREEN, ORANGE, RED, Bar, hbar_chart
from vgpu.blob.guest_arch import GuestArch, for_guest
from vgpu.blob.types import CacheAttr, Provenance, Resolution

NAME = "arm64_memory_types"
#: How an arm64 host kernel maps what an exporter asks for.
HOST_MEMORY_TYPE = {"CACHED": "Normal-WB", "WC": "Normal-NC", "UNCACHED": "Device-nGnRnE"}
#: The strategies that are our device, and so adapt their answer to the guest.
ADAPTED = ("ours", "ours_opted_in", "ours_stock")
VERDICTS = ("right", "dangerous", "slow", "other", "refused")


class MatrixRow(Protocol):
    """What this needs of :class:`benchmarks.cache_matrix.Row`."""

    truth: str
    answers: dict[str, str]


def load(path: Path = RESULTS / f"{NAME}.json") -> dict[str, Any] | None:
    """The committed measurement, or None when it was never taken."""
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def guest_types(measured: Mapping[str, Any]) -> dict[str, str]:
    """map_info name -> the memory type the arm64 guest's page table showed for it."""
    return {name: str(entry["memory_type"]) for name, entry in measured["map_info"].items()}


def sent_to_arm64(strategy: str, answer: str) -> str:
    """The answer an arm64 guest receives: our device adapts it, every other strategy sends it as it is."""
    if strategy not in ADAPTED or answer not in CacheAttr.__members__:
        return answer
    truth = Resolution(CacheAttr[answer], Provenance.KERNEL, "")
    return for_guest(truth, GuestArch.AARCH64).attr.name


def verdict(guest: str | None, host: str) -> str:
    if guest is None:
        return "refused"
    if guest == host:
        return "right"
    if guest.startswith("Normal-WB"):
        return "dangerous"
    if host.startswith("Normal-WB"):
        return "slow"
    return "other"


def column(rows: Sequence[MatrixRow], types: Mapping[str, str]) -> list[dict[str, dict[str, str]]]:
    """Per row: what each strategy sends an arm64 guest, the memory type that gives, and its verdict."""
    out = []
    for row in rows:
        host = "|".join(HOST_MEMORY_TYPE[p] for p in truths.placements(row.truth))
        sent = {s: sent_to_arm64(s, a) for s, a in row.answers.items()}
        memory = {s: types.get(a, "-") for s, a in sent.items()}

        def one(guest: object, placement: str) -> str:
            return verdict(guest if isinstance(guest, str) else None, HOST_MEMORY_TYPE[placement])

        out.append({"host": {"memory_type": host}, "sent": sent, "memory_type": memory,
                    "verdicts": {s: truths.judge(row.truth, types.get(a), one) for s, a in sent.items()}})
    return out


def tally(col: Sequence[Mapping[str, Mapping[str, str]]], strategies: Sequence[str]) -> dict[str, dict[str, int]]:
    counts = {s: dict.fromkeys(VERDICTS, 0) for s in strategies}
    for row in col:
        for s, v in row["verdicts"].items():
            counts[s][v] += 1
    return counts


def print_column(col: Sequence[Mapping[str, Mapping[str, str]]], names: Mapping[str, str],
                 measured: Mapping[str, Any]) -> None:
    types = guest_types(measured)
    print("\narm64 guests: the memory type each answer gives (measured in the guest's page table: "
          + ", ".join(f"{k} -> {v}" for k, v in types.items()) + ")")
    counts = tally(col, list(names))
    print(f"{'strategy':<24}" + "".join(f" {v:>9}" for v in VERDICTS))
    for s, name in names.items():
        print(f"{name:<24}" + "".join(f" {counts[s][v]:>9}" for v in VERDICTS))
    ours = counts["ours"]
    print(f"ours on arm64: {ours['dangerous']} dangerous, {ours['slow']} slow, {ours['other']} other, "
          f"{ours['refused']} refused, {ours['right']} right of {len(col)}")


def figure_by_arch(counts_x86: Mapping[str, Mapping[str, int]], counts_arm64: Mapping[str, Mapping[str, int]],
                   names: Mapping[str, str], n_rows: int, measured: Mapping[str, Any], path: Path) -> Path:
    """The matrix figure with an x86 and an arm64 column per strategy: one bar per (strategy, guest) as long as its
    right answers, red when any answer is dangerous, orange when any is slow or other, the counts written out."""
    bars: list[Bar] = []
    for s, name in names.items():
        for arch, counts in (("x86", counts_x86), ("arm64", counts_arm64)):
            c = counts[s]
            color = RED if c["dangerous"] else ORANGE if c["slow"] or c["other"] else GREEN
            wrong = f"dangerous {c['dangerous']}, slow {c['slow']}, " + \
                (f"other {c['other']}, " if c["other"] else "") + f"refused {c['refused']}"
            bars.append(Bar(f"{name}, {arch}: {wrong}", c["right"], color, f"right {c['right']}"))
        bars.append(Bar("", 0))
    types = guest_types(measured)
    signals = {k: int(e["unaligned_memcpy_signal"]) for k, e in measured["map_info"].items()}
    notes = ["arm64 guest's page table: " + ", ".join(f"{k} -> {v}" for k, v in types.items()),
             "unaligned memcpy: " + ", ".join(f"{k} {'SIGBUS' if sig else 'ok'}" for k, sig in signals.items()),
             "ours sends an arm64 guest WC (Normal-NC) where the host maps uncached",
             "truth: page tables (real exporters), kernel source (described)"]
    return hbar_chart(path, f"CACHE ATTRIBUTE OVER {n_rows} EXPORTERS: X86 AND ARM64 GUESTS", bars[:-1],
                      unit="bar = right answers; red: a dangerous answer (cacheable for WC/UC memory)", notes=notes,
                      width=1400)


# ---------------------------------------------------------------------------------------------------------------
# the measurement


def measure() -> dict[str, object]:
    """Boot the arm64 guest once with every map_info; what its page table and a memcpy said for each."""
    from vgpu_lab import provision
    from vgpu_lab.arm64.boot import map_info_devices, run_blob_devices

    lab = provision.Provisioner().arm64()
    with tempfile.TemporaryDirectory(prefix="vgpu-arm64-column-") as tmp:
        work = Path(tmp)
        devices = map_info_devices(work)
        run = run_blob_devices(lab, work, [d for d, _, _ in devices])
    if run.guest.guest_status != 0:
        raise RuntimeError("the arm64 guest did not finish:\n" + run.describe())
    entries: list[dict[str, object]] = []
    by_map_info: dict[str, dict[str, object]] = {}
    for d, (device, map_info, _) in zip(run.devices, devices, strict=True):
        pte, log = d.pte, d.map_log
        if pte is None or log is None or d.guest_map_info != map_info:
            raise RuntimeError(f"{device.name}: no page-table entry or a different map_info\n{run.describe()}")
        entry: dict[str, object] = {
            "memory_type": pte.memory_type, "attrindx": pte.attrindx, "mair_byte": f"{pte.mair:#04x}",
            "unaligned_memcpy_signal": d.unaligned_signal}
        name = CacheAttr(map_info).name
        entries.append({"device": device.name, "map_info": map_info, "map_info_name": name,
                        "guest_arch_option": next((a for a in device.backend_args if a.startswith("--guest-arch")),
                                                  None),
                        "log": f"map_info {log[4]} ({log[5][:160]})", **entry})
        by_map_info.setdefault(name, entry)
    return {"qemu": lab.qemu.version, "kernel": lab.kernel.release, "map_info": by_map_info, "devices": entries,
            "boot_seconds": round(run.guest.elapsed, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-write", action="store_true", help="print, do not write the results")
    args = p.parse_args(argv)
    started = time.monotonic()
    result = measure()
    for e in result["devices"]:  # type: ignore[attr-defined]
        print(f"{e['device']:<34} map_info {e['map_info']} ({e['map_info_name']:<8}) -> {e['memory_type']:<14} "
              f"AttrIndx {e['attrindx']} MAIR {e['mair_byte']}  unaligned memcpy: "
              f"{'SIGBUS' if e['unaligned_memcpy_signal'] else 'ok'}")
    print(f"arm64_column: {time.monotonic() - started:.1f} s (boot {result['boot_seconds']} s)")
    if not args.no_write:
        print(f"wrote {write_result(NAME, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
