"""End to end: the whole device — our back end driven by our own front end — inside a real 6.12 guest
(:mod:`vgpu_lab.device_guest` runs there; see it for why and how), and the resolver's fallbacks on the exporter
that has no hook (virtio-gpu's PRIME export answers ENOSYS on the patched kernel): :mod:`vgpu_lab.dmabuf_probe`
runs the resolver on the real fd with an operator rule, with the legacy heuristic, and with neither.

The patched kernel must answer for udmabuf (CACHED) and vgem (WC) and the front end's own PTE must agree; Debian's
stock 6.12 must give the same map_info through the allocator's knowledge, with the kernel's ENOTTY in the detail.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.e2e.conftest import Rig
from vgpu.protocol import CtrlType
from vgpu_lab import dmabuf_guest
from vgpu_lab.device_guest import ALLOCATORS, DMABUF_NAMES, HEIGHT, MAP_LOG, MAP_OFFSET, WIDTH, run_device_guest
from vgpu_lab.dmabuf_guest import FallbackReport

#: map_info the guest must see (virtio_gpu.h: CACHED 1, UNCACHED 2, WC 3) and the PTE type it stands for.
MAP_INFO = {"CACHED": 1, "UNCACHED": 2, "WC": 3}
PTE_OF_ATTR = {"CACHED": "WB", "WC": "WC"}


def _boot_device(rig: Rig, tmp_path: Path, *, patched: bool, rounds: tuple[str, ...] = ALLOCATORS
                 ) -> tuple[dict[str, dict[str, Any]], str, float]:
    """Boot one kernel with the given rounds; returns (round → its record, failure context, seconds)."""
    run, records = run_device_guest(
        kernel=rig.patched.bzimage if patched else rig.stock.vmlinuz, busybox=rig.busybox, qemu=rig.qemu.system,
        work=tmp_path, rounds=rounds, modules_dir=None if patched else rig.stock.modules_dir)
    context = run.describe()
    for r in records:
        print(json.dumps(r, sort_keys=True))
    assert not run.timed_out and run.returncode == 0 and run.guest_status == 0, context
    assert not [r for r in records if r["kind"] == "exception"], context
    assert records and records[-1]["kind"] == "done", context
    start = next(r for r in records if r["kind"] == "start")
    assert start["kernel"].startswith("6.12."), context
    found = {r["allocator"]: r for r in records if r["kind"] == "round"}
    for r in records:
        if r["kind"] == "scanout":
            found["scanout"] = r
    assert set(found) == set(rounds), context
    return found, context, run.elapsed


def _check_round(r: dict[str, Any], context: str, *, attr: str, provenance: str, detail: str) -> re.Match[str]:
    """The flow every round must complete, and the map_info / provenance it must end in."""
    where = f"{r['allocator']}: {json.dumps(r, sort_keys=True)}\n{context}"
    assert r["create_blob"] == CtrlType.RESP_OK_NODATA, where
    assert r["map_resp"] == CtrlType.RESP_OK_MAP_INFO, where
    assert r["map_info"] == MAP_INFO[attr], where
    assert r["reqs_size"] == WIDTH * HEIGHT * 4, where
    # The front end mapped exactly the blob, at the offset asked, and what it mapped is the back end's dma-buf.
    assert r["shm_log"] == [["map", MAP_OFFSET, r["reqs_size"]]], where
    assert r["window_readback"] is True and (r["frontend_mapping"] or "").startswith(DMABUF_NAMES), where
    assert r["backend_buffer"] is not None, where
    assert r["unmap_resp"] == CtrlType.RESP_OK_NODATA, where
    assert r["backend_errors"] == [], where
    # The back end's own account of the decision.
    (line,) = r["map_log"]
    m = MAP_LOG.search(line)
    assert m is not None, where
    assert (int(m.group(1)), int(m.group(2), 16), int(m.group(3), 16)) == (1, MAP_OFFSET, r["reqs_size"]), where
    assert (m.group(4), m.group(5)) == (attr, provenance), where
    assert detail in m.group(6), where
    return m


def test_device_in_the_patched_guest_asks_the_kernel(rig: Rig, tmp_path: Path) -> None:
    """udmabuf → map_info 1, vgem → map_info 3, both decided by the kernel, and the PTE agrees."""
    rounds, context, elapsed = _boot_device(rig, tmp_path, patched=True)
    print(f"patched kernel, device rounds {list(ALLOCATORS)}: {elapsed:.2f} s wall")
    expect = {"udmabuf": ("CACHED", "CACHED+fixed"), "vgem": ("WC", "WC+fixed")}
    for allocator, (attr, answer) in expect.items():
        r = rounds[allocator]
        m = _check_round(r, context, attr=attr, provenance="kernel", detail=f"DMA_BUF_IOCTL_INFO: {answer}")
        print(f"patched  {allocator:8} map_info {r['map_info']} ({attr}) provenance {m.group(5)!r}: {m.group(6)}; "
              f"front end PTE {r['pte']} ({r['pte_bits']}); round {r['seconds']} s")
        # Ground truth: the front end's own page-table entry for the window has the type the guest was told.
        assert r["pte"] == PTE_OF_ATTR[attr], f"{allocator}: {r}\n{context}"


def test_device_in_the_stock_guest_falls_back_to_the_allocator(rig: Rig, tmp_path: Path) -> None:
    """Debian's 6.12 answers ENOTTY: the same map_info, now on the allocator's word, with the ENOTTY named."""
    rounds, context, elapsed = _boot_device(rig, tmp_path, patched=False)
    print(f"stock kernel, device rounds {list(ALLOCATORS)}: {elapsed:.2f} s wall")
    for allocator, attr in (("udmabuf", "CACHED"), ("vgem", "WC")):
        r = rounds[allocator]
        m = _check_round(r, context, attr=attr, provenance="allocator",
                         detail=f"{allocator}: ")
        assert "kernel: DMA_BUF_IOCTL_INFO: ENOTTY" in m.group(6), f"{allocator}: {r}\n{context}"
        # Debian's kernel has no PTDUMP_DEBUGFS: no page-table truth here, and the record says so.
        assert r["pte"] is None and "pte_error" in r, f"{allocator}: {r}\n{context}"
        print(f"stock    {allocator:8} map_info {r['map_info']} ({attr}) provenance {m.group(5)!r}: {m.group(6)}; "
              f"round {r['seconds']} s")


def _boot_probe(rig: Rig, tmp_path: Path, *, patched: bool) -> tuple[dict[tuple[str, str], FallbackReport], str]:
    """The dmabuf_info program + our probe on the same fds (the boot of tests/e2e/test_kernel_ioctl.py)."""
    modules: tuple[str, ...] = ()
    if not patched:
        modules = dmabuf_guest.STOCK_MODULES + dmabuf_guest.STOCK_9P_MODULES
    run = dmabuf_guest.run_dmabuf_guest(
        kernel=rig.patched.bzimage if patched else rig.stock.vmlinuz, busybox=rig.busybox, program=rig.program,
        work=tmp_path, qemu=rig.qemu.system, modules_dir=None if patched else rig.stock.modules_dir,
        modules=modules, with_python=True,
    )
    context = run.describe()
    assert not run.timed_out and run.returncode == 0 and run.guest_status == 0, context
    lines = run.guest_lines()
    assert any(line.startswith("VGPU-GUEST py-done ok") for line in lines), context
    fallbacks = dmabuf_guest.parse_fallbacks(lines)
    for (name, mode), f in sorted(fallbacks.items()):
        print(f"{'patched' if patched else 'stock'}  {name:11} {mode:9} kernel {f.answer:24} -> "
              f"{f.resolved or 'Unresolved'} ({f.provenance or '-'}): {f.detail}")
    return fallbacks, context


def test_a_guest_blob_is_shown_as_a_udmabuf(rig: Rig, tmp_path: Path) -> None:
    """Where the kernel has udmabuf, a guest blob on a scanout reaches the display as a dma-buf of its own guest
    pages (DMABUF_SCANOUT2), holding exactly what the guest drew; a flush is a DMABUF_UPDATE, no pixels copied."""
    found, context, elapsed = _boot_device(rig, tmp_path, patched=False, rounds=("scanout",))
    r = found["scanout"]
    print(f"guest blob scanout via udmabuf: {elapsed:.2f} s wall; {r}")
    ok = int(CtrlType.RESP_OK_NODATA)
    assert (r["create"], r["set_scanout_blob"], r["flush"]) == (ok, ok, ok), context
    assert r["exp_name"] == "udmabuf" and r["contents_match"], context
    assert r["scanout_fields"][:9] == [0, 0, 0, 64, 64, 64, 64, 256, 0], context  # rect, size, stride, flags
    assert r["dmabuf_updates"] == 1 and r["copied_updates"] == 0, context
    assert r["log"] and "shown as a udmabuf" in r["log"][0], context


def test_enosys_falls_back_with_the_fallbacks_provenance(rig: Rig, tmp_path: Path) -> None:
    """virtio-gpu's PRIME export answers ENOSYS on the patched kernel: rule, heuristic or refusal, ENOSYS named."""
    fallbacks, context = _boot_probe(rig, tmp_path, patched=True)
    rule, heuristic, none = (fallbacks[("virtio-gpu", mode)] for mode in ("rule", "heuristic", "none"))
    assert rule.exporter == "virtio_gpu" and rule.answer == "ENOSYS", f"{rule}\n{context}"
    assert (rule.resolved, rule.provenance) == ("WC", "operator rule"), f"{rule}\n{context}"
    assert "rule exporters.virtio_gpu = wc in probe-rules.toml" in rule.detail, f"{rule}\n{context}"
    assert "DMA_BUF_IOCTL_INFO: ENOSYS" in rule.detail, f"{rule}\n{context}"
    assert (heuristic.resolved, heuristic.provenance) == ("WC", "legacy heuristic"), f"{heuristic}\n{context}"
    assert "'virtio_gpu' is not 'i915'" in heuristic.detail, f"{heuristic}\n{context}"
    assert "DMA_BUF_IOCTL_INFO: ENOSYS" in heuristic.detail, f"{heuristic}\n{context}"
    assert (none.resolved, none.provenance) == (None, None), f"{none}\n{context}"
    assert "the kernel did not say (DMA_BUF_IOCTL_INFO: ENOSYS" in none.detail, f"{none}\n{context}"
    # An exporter that answers is not second-guessed: the kernel outranks a rule and the heuristic.
    for name, attr in (("udmabuf", "CACHED"), ("system-heap", "CACHED"), ("vgem", "WC")):
        for mode in ("rule", "heuristic", "none"):
            f = fallbacks[(name, mode)]
            assert (f.resolved, f.provenance) == (attr, "kernel"), f"{f}\n{context}"
    # A memfd is no dma-buf: no exporter for a rule, no guess, so a refusal naming the kernel's ENOTTY.
    for mode in ("rule", "heuristic", "none"):
        f = fallbacks[("memfd", mode)]
        assert f.resolved is None and "ENOTTY" in f.detail, f"{f}\n{context}"


def test_stock_kernel_falls_back_on_enotty(rig: Rig, tmp_path: Path) -> None:
    """The same fallbacks on Debian's 6.12, where every exporter (virtio-gpu included) answers ENOTTY."""
    fallbacks, context = _boot_probe(rig, tmp_path, patched=False)
    rule, heuristic, none = (fallbacks[("virtio-gpu", mode)] for mode in ("rule", "heuristic", "none"))
    assert (rule.resolved, rule.provenance) == ("WC", "operator rule"), f"{rule}\n{context}"
    assert "DMA_BUF_IOCTL_INFO: ENOTTY" in rule.detail, f"{rule}\n{context}"
    assert (heuristic.resolved, heuristic.provenance) == ("WC", "legacy heuristic"), f"{heuristic}\n{context}"
    assert none.resolved is None and "ENOTTY" in none.detail, f"{none}\n{context}"
    # Nothing answers on a stock kernel: udmabuf from outside (no allocator knowledge) is the heuristic's guess.
    f = fallbacks[("udmabuf", "heuristic")]
    assert (f.resolved, f.provenance, f.answer) == ("WC", "legacy heuristic", "ENOTTY"), f"{f}\n{context}"
    assert fallbacks[("udmabuf", "none")].resolved is None, context

