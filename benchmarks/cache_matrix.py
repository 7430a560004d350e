"""The cache-attribute benchmark: is each strategy's answer right, what does asking cost, what does a wrong one cost.

1. **Correctness matrix.** Rows are exporters: the ones this project can create for real — a memfd on the host, and
   udmabuf, the system dma-heap, vgem PRIME and virtio-gpu PRIME exports (plus a memfd) inside our patched 6.12
   guest kernel, with our patch's vgem test exporters (a buffer that moves between WC and WB pages, one that needs
   cache maintenance), whose truth is the PTE the kernel installed (read from its page-table dump; for the moving
   one, every PTE it had) — and the exporters users meet that cannot exist here (i915, amdgpu, msm, panfrost, …),
   described by the kernel fact in :mod:`benchmarks.exporter_facts`, some of them buffers TTM moves. A truth can
   be several attributes (``WC|CACHED``: it changes over the buffer's life) or ``SYNC`` (no attribute is right;
   :mod:`benchmarks.truths`). Columns are strategies: the kernel's attribute read alone (what the earlier
   revisions' readers do; for a described buffer that moves, asked in its cached placement), our
   :class:`~vgpu.blob.resolve.Resolver` hearing the exporter (the patched kernel for real rows; for described
   rows a played kernel answering as an honest hook would), the same with ``--map-changing-placement``, our
   resolver with the kernel silent (ENOTTY, every stock kernel; allocator knowledge, no rules, no heuristic), the
   legacy driver-name heuristic, "always WC" and "always cached". A wrong answer is *dangerous* when it says
   CACHED for write-combined or uncached memory (aliased cache types) and *slow* when it says WC/uncached for
   cached memory; an answer that is not given (an errno, the resolver refusing) is counted as *refused*, never
   as right or wrong. Counts are printed per truth source (page tables, kernel source) and for the changing and
   the incoherent rows apart, so refusals cannot hide what an answer would have been.
2. **Cost per query**: the ioctl (ENOTTY on this host, a value in the guest), reading fdinfo, opening a DRM node
   and asking DRM_IOCTL_VERSION (only inside the guest: this host has no DRM) — median and p99, as ratios to the
   cheapest in the same environment. Guest numbers run under TCG, so only their ratios mean anything.
3. **What a wrong answer costs**: guest-side read/write bandwidth through a WC (vgem) and a cached (udmabuf,
   memfd) mapping. Under TCG the memory type changes no behaviour, so the figure shows exactly that and the
   output says so; the cost on hardware is not measured here and no number is invented for it.

Writes benchmarks/results/cache_matrix.json, cache_matrix.png and cache_matrix_costs.png.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import arm64_column, truths
from benchmarks.common import RESULTS, write_result
from benchmarks.exporter_facts import DESCRIBED, KERNEL_SOURCE, REAL_SOURCES, ExporterFact
from benchmarks.figure import GREEN, GREY, ORANGE, RED, Bar, hbar_chart
from vgpu.blob import uapi
from vgpu.blob.allocators import MemfdAllocator
from vgpu.blob.dmabuf import KernelAnswer, KernelAnswerKind, decode_map_attr, query_map_attr, read_fdinfo
from vgpu.blob.resolve import Resolver, legacy_heuristic
from vgpu.blob.types import CacheAttr, HostBuffer, Unresolved
from vgpu_lab import paths
from vgpu_lab.cache_matrix_probe import timed
from vgpu_lab.shell import ProvisionError

STRATEGIES = {
    "kernel": "kernel query, flags ignored",
    "ours": "ours, exporter answers",
    "ours_opted_in": "ours, changing mapped WC",
    "ours_stock": "ours, kernel silent",
    "legacy": "legacy heuristic",
    "always_wc": "always WC",
    "always_cached": "always cached",
}
VERDICTS = ("right", "dangerous", "slow", "other", "refused")
PTE_ATTR = {"WB": "CACHED", "WC": "WC", "UC-": "UNCACHED", "UC": "UNCACHED"}
ANSWERS = {a.name for a in CacheAttr}
ENOTTY = KernelAnswer(KernelAnswerKind.ENOTTY, errno=errno.ENOTTY)
GUEST_PROBE = "vgpu_lab.cache_matrix_probe"


def verdict(answer: str, truth: str) -> str:
    """right / dangerous (CACHED for WC or UC memory) / slow (WC or UC for cached) / other / refused; a truth of
    several placements or one that needs cache maintenance is judged by :func:`benchmarks.truths.judge`."""
    if truth not in ANSWERS:
        return truths.judge(truth, answer, lambda a, t: verdict(str(a), t))
    if answer not in ANSWERS:
        return "refused"
    if answer == truth:
        return "right"
    if answer == "CACHED":
        return "dangerous"
    if truth == "CACHED":
        return "slow"
    return "other"  # WC for uncached or the reverse: both bypass the cache, still not what the exporter mapped


@dataclass
class Row:
    name: str
    where: str  # "host", "guest (patched 6.12, TCG)" or "described"
    truth: str
    truth_source: str
    answers: dict[str, str]
    provenance: dict[str, str] = field(default_factory=dict)
    fact_source: str = ""
    verified: str = ""

    def verdicts(self) -> dict[str, str]:
        return {k: verdict(v, self.truth) for k, v in self.answers.items()}


def _fixed(answers: dict[str, str]) -> dict[str, str]:
    return {**answers, "always_wc": "WC", "always_cached": "CACHED"}


def _resolve(resolver: Resolver, buffer: HostBuffer) -> tuple[str, str]:
    try:
        r = resolver.resolve(buffer)
    except Unresolved:
        return "refused", "-"
    return r.attr.name, r.provenance.value


def host_memfd_row() -> Row:
    """A memfd made by our allocator on this host: the kernel is asked for real (ENOTTY: no ioctl, no dma-buf)."""
    with MemfdAllocator() as alloc:
        buffer = alloc.allocate(1 << 20)
        try:
            answer = query_map_attr(buffer.fd)
            ours, prov = _resolve(Resolver(), buffer)
        finally:
            buffer.close()
    kernel = answer.attr.name if answer.attr is not None else answer.code
    return Row("memfd (vgpu MemfdAllocator)", "host", "CACHED",
               "kernel fact (" + REAL_SOURCES["memfd"] + "); the guest memfd row's PTE shows the same",
               _fixed({"kernel": kernel, "ours": ours, "ours_opted_in": ours, "ours_stock": ours, "legacy": "n/a"}),
               {"ours": prov, "ours_opted_in": prov, "ours_stock": prov})


def hooked_answer(fact: ExporterFact) -> KernelAnswer:
    """What the exporter would answer DMA_BUF_IOCTL_INFO (revision 3) if it had our hook and described its mmap
    path honestly: the attribute of now (asked in its first placement), FIXED unless the attribute changes."""
    value = (uapi.DMA_BUF_MAP_REVISION << uapi.DMA_BUF_MAP_REVISION_SHIFT) | int(fact.truth)
    if fact.needs_sync:
        value |= uapi.DMA_BUF_MAP_NEEDS_SYNC
    return decode_map_attr(value if fact.changes else value | uapi.DMA_BUF_MAP_FIXED)


def described_rows() -> list[Row]:
    """Exporters that cannot exist here: our Resolver runs for real on a stand-in buffer with their names.

    ``ours`` and ``ours_opted_in`` hear the answer the exporter would give with our hook (:func:`hooked_answer`,
    a played kernel: no such kernel exists for these drivers); ``ours_stock`` hears what every released kernel says
    (ENOTTY). ``kernel`` is the attribute alone, read as the earlier revisions would, asked in the placement that
    makes it worst (for a buffer that moves: the cached one)."""
    rows = []
    placeholder = os.memfd_create("vgpu-described", os.MFD_CLOEXEC)
    try:
        for fact in DESCRIBED:
            answer = hooked_answer(fact)

            def hooked(_fd: int, answer: KernelAnswer = answer) -> KernelAnswer:
                return answer

            def resolve(resolver: Resolver, fact: ExporterFact = fact) -> tuple[str, str]:
                return _resolve(resolver, HostBuffer(fd=placeholder, size=1 << 20, allocator="external",
                                                     exporter=fact.exp_name, drm_driver=fact.driver))

            ours, prov = resolve(Resolver(kernel_query=hooked))
            opted, opted_prov = resolve(Resolver(kernel_query=hooked, map_changing=True))
            stock, stock_prov = resolve(Resolver(kernel_query=lambda _fd: ENOTTY))
            naive = fact.moves_to if fact.changes and fact.moves_to is CacheAttr.CACHED else fact.truth
            rows.append(Row(fact.row, "described", fact.truth_name, fact.fact,
                            _fixed({"kernel": naive.name, "ours": ours, "ours_opted_in": opted, "ours_stock": stock,
                                    "legacy": legacy_heuristic(fact.driver).name}),
                            {"kernel": f"played: {answer.code}", "ours": prov, "ours_opted_in": opted_prov,
                             "ours_stock": stock_prov}, fact.source, fact.verified))
    finally:
        os.close(placeholder)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# the guest


@dataclass
class GuestResult:
    rows: list[Row]
    costs: list[dict[str, object]]
    bandwidth: list[dict[str, object]]
    notes: list[str]
    seconds: float


def guest_command(program: str, env: dict[str, str]) -> str:
    """Mount the host root over 9p, give the chroot the guest's /dev, /proc, /sys and debugfs (for the page-table
    dump), and let the C program exec our probe there on the fds it made."""
    from vgpu_lab import dmabuf_guest

    root = dmabuf_guest.GUEST_HOST_ROOT
    steps = [
        f"mkdir -p {root}",
        f"mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 {dmabuf_guest.HOST_ROOT_TAG} "
        f"{root}",
        f"mount --bind /dev {root}/dev",
        f"mount --bind /proc {root}/proc",
        f"mount --bind /sys {root}/sys",
        f"mount -t debugfs debugfs {root}/sys/kernel/debug",
        shlex.join([program, "--exec", "chroot", root, "/usr/bin/env", f"PYTHONPATH={paths.project_root()}",
                    "PYTHONDONTWRITEBYTECODE=1", *(f"{k}={v}" for k, v in env.items()), sys.executable, "-m",
                    GUEST_PROBE]),
    ]
    return " && ".join(steps)


def run_guest(runs: int, bw_size: int, bw_seconds: float, build_kernel: bool) -> GuestResult | str:
    """Boot the patched kernel once; returns the results, or why the guest part could not run."""
    from vgpu_lab import dmabuf_guest, guest, initramfs, kernel_build, provision
    from vgpu_lab.qemu import QemuConfig
    from vgpu_lab.qemu import run_guest as boot

    started = time.monotonic()
    try:
        provisioner = provision.Provisioner()
        if build_kernel:
            kernel: Path | None = kernel_build.patched_kernel(provisioner.cache).bzimage
        else:
            found = kernel_build.find_patched_kernel(provisioner.cache)
            kernel = found.bzimage if found is not None else None
        if kernel is None:
            return ("the patched kernel is not built (python -m vgpu_lab.kernel_build, about 6 minutes, or "
                    "--build-kernel)")
        qemu = provisioner.qemu()
        busybox = provisioner.busybox()
        program = guest.build_program("dmabuf_info", provisioner.cache, gcc=provisioner.toolchain())
    except (ProvisionError, kernel_build.KernelBuildError, guest.GuestBuildError, OSError) as exc:
        return f"lab component unavailable: {exc}"
    with tempfile.TemporaryDirectory(prefix="vgpu-cache-matrix-") as tmp:
        work = Path(tmp)
        env = {"VGPU_CM_RUNS": str(runs), "VGPU_CM_BW_SIZE": str(bw_size), "VGPU_CM_BW_S": str(bw_seconds)}
        guest_program = "/bin/dmabuf_info"
        initrd = initramfs.build_initramfs(
            work / "initrd.gz", busybox=busybox, command=guest_command(guest_program, env), modules=(),
            files={guest_program: program}, wait_for=dmabuf_guest.WAIT_FOR)
        config = QemuConfig(device=None, qemu=qemu.system,
                            extra_args=("-device", "virtio-gpu-pci", *dmabuf_guest.host_root_args()))
        run = boot(kernel=kernel, initrd=initrd, socket_path=None, config=config, timeout=dmabuf_guest.BOOT_TIMEOUT)
    lines = run.guest_lines()
    if not any(line.startswith("VGPU-GUEST cm-done ok") for line in lines):
        return "the guest probe did not finish:\n" + run.describe()
    c_reports = dmabuf_guest.parse_report(lines)
    facts = [json.loads(line.split(" ", 2)[2]) for line in lines if line.startswith("VGPU-GUEST cm {")]
    rows: list[Row] = []
    notes: list[str] = []
    moves = dmabuf_guest.parse_moves(lines)
    for f in (f for f in facts if f["kind"] == "row"):
        c = c_reports.get(str(f["name"]))
        if c is None or c.pte not in PTE_ATTR:
            notes.append(f"{f['name']}: no page-table truth ({c})")
            continue
        truth = PTE_ATTR[c.pte]
        source = f"PTE {c.pte} ({c.pte_bits}) in the guest's page-table dump"
        if f["name"] == "vgem-moving":
            seen = [c.pte, *(m.pte for m in moves)]
            truth = "|".join(dict.fromkeys(PTE_ATTR[p] for p in seen if p in PTE_ATTR))
            source = f"PTEs {' -> '.join(seen)} across the C program's two moves"
        elif f["name"] == "vgem-incoherent":
            truth = truths.SYNC
        source += "; " + REAL_SOURCES.get(str(f["name"]), "")
        rows.append(Row(f"{f['name']} (exp_name {f['exporter']})", "guest (patched 6.12, TCG)", truth, source,
                        _fixed({k: str(f[k]) for k in ("kernel", "ours", "ours_opted_in", "ours_stock", "legacy")}),
                        {"kernel": str(f["kernel_said"]), "ours": str(f["ours_provenance"]),
                         "ours_opted_in": str(f["ours_opted_in_provenance"]),
                         "ours_stock": str(f["ours_stock_provenance"]), "legacy": f"name {f['legacy_name']}"}))
    costs = [f for f in facts if f["kind"] in ("cost", "cost-missing")]
    bandwidth = [f for f in facts if f["kind"] in ("bw", "bw-missing")]
    return GuestResult(rows, costs, bandwidth, notes, time.monotonic() - started)


# ---------------------------------------------------------------------------------------------------------------
# costs on the host


def host_costs(runs: int) -> list[dict[str, object]]:
    """The same questions on this host's only kind of buffer (a memfd): the ioctl answers ENOTTY."""
    out: list[dict[str, object]] = []
    fd = os.memfd_create("vgpu-cost", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 1 << 20)
        arg = bytearray(16)
        arg[0] = uapi.DMA_BUF_INFO_MAP_ATTR

        def bare() -> object:
            try:
                return fcntl.ioctl(fd, uapi.DMA_BUF_IOCTL_INFO, arg, True)
            except OSError as exc:
                return exc.errno

        def fdinfo() -> object:
            with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
                return f.read()

        out.append({"kind": "cost", "case": "DMA_BUF_IOCTL_INFO, bare ioctl (memfd: ENOTTY)", **timed(bare, runs)})
        out.append({"kind": "cost", "case": "DMA_BUF_IOCTL_INFO, vgpu query_map_attr (memfd: ENOTTY)",
                    **timed(lambda: query_map_attr(fd), runs)})
        out.append({"kind": "cost", "case": "fdinfo, bare read (memfd)", **timed(fdinfo, runs)})
        out.append({"kind": "cost", "case": "fdinfo, vgpu read_fdinfo (memfd)",
                    **timed(lambda: read_fdinfo(fd), runs)})
    finally:
        os.close(fd)
    drm = sorted(Path("/dev/dri").glob("card*")) if Path("/dev/dri").is_dir() else []
    if not drm:
        out.append({"kind": "cost-missing", "case": "DRM node + DRM_IOCTL_VERSION",
                    "reason": "this host has no /dev/dri (no DRM driver): measured inside the guest only"})
    return out


def with_ratios(costs: list[dict[str, object]]) -> list[dict[str, object]]:
    measured = [c for c in costs if c["kind"] == "cost"]
    if not measured:
        return costs
    cheapest = min(float(str(c["median_us"])) for c in measured)
    for c in measured:
        c["ratio_to_cheapest"] = float(str(c["median_us"])) / cheapest
    return costs


# ---------------------------------------------------------------------------------------------------------------
# output


def tally(rows: list[Row]) -> dict[str, dict[str, int]]:
    counts = {s: dict.fromkeys(VERDICTS, 0) for s in STRATEGIES}
    for row in rows:
        for s, v in row.verdicts().items():
            counts[s][v] += 1
    return counts


def print_matrix(rows: list[Row]) -> None:
    short = {"right": "", "dangerous": " !!", "slow": " (slow)", "other": " (other)", "refused": ""}
    width = max(len(r.name) for r in rows) + 2
    head = f"{'exporter':<{width}} {'where':<10} {'truth':<9}" + "".join(f" {v:<24}" for v in STRATEGIES.values())
    print(head)
    for r in rows:
        verdicts = r.verdicts()
        cells = "".join(f" {r.answers[s] + short[verdicts[s]]:<24}" for s in STRATEGIES)
        print(f"{r.name:<{width}} {r.where.split(' ')[0]:<10} {r.truth:<9}{cells}")
    print("(!! = dangerous: CACHED reported for WC/uncached memory; (slow) = WC/uncached reported for cached "
          "memory; refused = no answer given)")


def print_counts(counts: dict[str, dict[str, int]], label: str) -> None:
    print(f"\nwrong answers per strategy ({label})")
    print(f"{'strategy':<28}" + "".join(f" {v:>9}" for v in VERDICTS))
    for s, name in STRATEGIES.items():
        print(f"{name:<28}" + "".join(f" {counts[s][v]:>9}" for v in VERDICTS))


def matrix_figure(counts: dict[str, dict[str, int]], n_rows: int, path: Path) -> Path:
    colors = {"dangerous": RED, "slow": ORANGE, "other": ORANGE, "refused": GREY, "right": GREEN}
    bars: list[Bar] = []
    for s, name in STRATEGIES.items():
        for v in ("dangerous", "slow", "other", "refused", "right"):
            if v == "other" and counts[s][v] == 0:
                continue
            bars.append(Bar(f"{name}: {v}", counts[s][v], colors[v], str(counts[s][v])))
        bars.append(Bar("", 0))
    return hbar_chart(path, f"CACHE ATTRIBUTE: ANSWERS PER STRATEGY OVER {n_rows} EXPORTERS", bars[:-1],
                      unit="rows; dangerous = CACHED for WC/UC memory, slow = WC for cached memory",
                      notes=["real exporters: truth from page tables; described: kernel source facts"])


def cost_figure(host: list[dict[str, object]], guest: list[dict[str, object]], path: Path) -> Path:
    bars: list[Bar] = []
    for label, costs in (("host", host), ("guest, TCG", guest)):
        for c in costs:
            if c["kind"] == "cost":
                ratio = float(str(c["ratio_to_cheapest"]))
                bars.append(Bar(f"{label}: {c['case']}"[:64], ratio, ORANGE if ratio > 1.5 else GREEN,
                                f"{ratio:.1f}x ({float(str(c['median_us'])):.1f} us)"))
        bars.append(Bar("", 0))
    return hbar_chart(path, "COST PER QUERY, MEDIAN, AS A RATIO TO THE CHEAPEST (PER ENVIRONMENT)", bars[:-1],
                      unit="guest numbers run under TCG emulation: compare ratios, not microseconds")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few runs, tiny bandwidth buffers")
    p.add_argument("--runs", type=int, default=20000, help="calls per cost case on the host (guest: a tenth)")
    p.add_argument("--no-guest", action="store_true", help="skip the guest boot (real rows: host memfd only)")
    p.add_argument("--build-kernel", action="store_true", help="build the patched kernel if it is not cached")
    p.add_argument("--no-write", action="store_true", help="do not write results (quick runs never do)")
    args = p.parse_args(argv)
    started = time.monotonic()
    host_runs = 300 if args.quick else args.runs
    guest_runs = 100 if args.quick else max(args.runs // 10, 100)

    rows = [host_memfd_row()]
    guest: GuestResult | str = "skipped (--no-guest)"
    if not args.no_guest:
        guest = run_guest(guest_runs, (256 << 10) if args.quick else (4 << 20), 0.05 if args.quick else 0.5,
                          args.build_kernel)
    if isinstance(guest, GuestResult):
        rows += guest.rows
    else:
        print(f"guest rows not measured: {guest}")
    described = described_rows()
    rows += described
    print_matrix(rows)
    counts = tally(rows)
    print_counts(counts, f"all {len(rows)} rows")
    real = [r for r in rows if r.where != "described"]
    print_counts(tally(real), f"{len(real)} real exporters, truth from page tables")
    print_counts(tally(described), f"{len(described)} described exporters, truth from {KERNEL_SOURCE}")
    changing = [r for r in rows if "|" in r.truth]
    print_counts(tally(changing), f"{len(changing)} rows whose truth changes over the buffer's life (TTM placement)")
    incoherent = [r for r in rows if r.truth == truths.SYNC]
    print_counts(tally(incoherent), f"{len(incoherent)} rows that need cache maintenance (only refusing is right)")
    ours = counts["ours"]
    print(f"\nours: {ours['dangerous']} dangerous, {ours['slow']} slow, {ours['refused']} refused, "
          f"{ours['right']} right of {len(rows)}")
    arm64 = arm64_column.load()
    arm64_rows = arm64_column.column(rows, arm64_column.guest_types(arm64)) if arm64 is not None else []
    if arm64 is not None:
        arm64_column.print_column(arm64_rows, STRATEGIES, arm64)
    else:
        print("\narm64 guests not judged: no measurement (python -m benchmarks.arm64_column)")

    hc = with_ratios(host_costs(host_runs))
    gc = with_ratios(guest.costs) if isinstance(guest, GuestResult) else []
    print("\ncost per query (median and p99 of single calls; ratio = median / cheapest median of the same place)")
    for label, costs in (("host", hc), ("guest (TCG)", gc)):
        for c in costs:
            if c["kind"] == "cost":
                print(f"  {label:<12} {c['case']:<58} {float(str(c['median_us'])):>9.2f} us "
                      f"p99 {float(str(c['p99_us'])):>9.2f} us  ratio {float(str(c['ratio_to_cheapest'])):.2f}")
            else:
                print(f"  {label:<12} {c['case']:<58} not measured: {c['reason']}")
    if not gc:
        print("  guest costs (DRM_IOCTL_VERSION, an answering ioctl) not measured: no guest run")

    print("\nwhat a wrong answer costs (guest read/write bandwidth through an mmap of each kind of buffer)")
    tcg_note = ("under TCG the guest's memory type changes no behaviour (QEMU emulates every access the same way), "
                "so these numbers cannot show the cost of a wrong answer on hardware; it is not measured here")
    bw = guest.bandwidth if isinstance(guest, GuestResult) else []
    for b in bw:
        if b["kind"] == "bw":
            print(f"  {b['allocator']:<8} {b['attr']:<6} PTE {b['pte']:<4} read {float(str(b['read_gbs'])):.3f} GB/s "
                  f"write {float(str(b['write_gbs'])):.3f} GB/s ({b['size']} bytes)")
        else:
            print(f"  {b['allocator']:<8} not measured: {b['reason']}")
    measured = {str(b["allocator"]): b for b in bw if b["kind"] == "bw"}
    tcg_ratio: dict[str, float] = {}
    if "vgem" in measured and "udmabuf" in measured:
        for what in ("read", "write"):
            tcg_ratio[what] = float(str(measured["vgem"][f"{what}_gbs"])) / float(
                str(measured["udmabuf"][f"{what}_gbs"]))
        print(f"  WC/cached bandwidth under TCG: read {tcg_ratio['read']:.2f}, write {tcg_ratio['write']:.2f}")
    print(f"  {tcg_note}")

    elapsed = time.monotonic() - started
    print(f"\ncache_matrix: {elapsed:.1f} s" + (f" (guest boot and probe {guest.seconds:.1f} s)"
                                                 if isinstance(guest, GuestResult) else ""))
    if not args.quick and not args.no_write:
        result: dict[str, object] = {
            "strategies": STRATEGIES, "verdicts": VERDICTS,
            "rows": [{**r.__dict__, "verdicts": r.verdicts()} for r in rows],
            "counts": counts, "counts_real": tally(real), "counts_described": tally(described),
            "counts_changing": tally(changing), "counts_incoherent": tally(incoherent),
            "costs_host": hc, "costs_guest": gc, "bandwidth_guest": bw, "bandwidth_tcg_wc_over_cached": tcg_ratio,
            "bandwidth_note": tcg_note,
            "guest": "measured" if isinstance(guest, GuestResult) else guest,
            "guest_notes": guest.notes if isinstance(guest, GuestResult) else [], "seconds": elapsed,
            "arm64": {"measured": arm64, "rows": arm64_rows,
                      "counts": arm64_column.tally(arm64_rows, list(STRATEGIES))} if arm64 is not None else None,
        }
        print(f"wrote {write_result('cache_matrix', result)}")
        figure = RESULTS / "cache_matrix.png"
        if arm64 is not None:
            arm64_counts = arm64_column.tally(arm64_rows, list(STRATEGIES))
            figure = arm64_column.figure_by_arch(counts, arm64_counts, STRATEGIES, len(rows), arm64, figure)
        else:
            figure = matrix_figure(counts, len(rows), figure)
        print(f"wrote {figure}")
        print(f"wrote {cost_figure(hc, gc, RESULTS / 'cache_matrix_costs.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
