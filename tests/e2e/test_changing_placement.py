"""End to end: buffers whose cache attribute can change, and buffers that need cache maintenance, inside a real guest.

Why: an answer the exporter gives at MAP_BLOB describes the buffer only until it moves (Christian König's objection
to the ioctl: TTM drivers move buffers between VRAM and system memory and change the pgprot of CPU mappings as they
go), and a buffer whose CPU access needs ``DMA_BUF_IOCTL_SYNC`` cannot be kept coherent through a guest's mapping
(Rob Clark's suggestion: refuse it). Our kernel patch lets the exporter say both, and gives vgem test exporters that
really do it (``/sys/module/vgem/parameters/test_exporter``: a "moving" buffer moves between write-combined and
write-back pages when ``test_move`` is written, tearing CPU mappings down as a TTM move does; an "incoherent" one
answers NEEDS_SYNC).

How: a boot like :mod:`vgpu_lab.device_guest`'s (QEMU 10 TCG, the patched 6.12 kernel, the host's root over 9p)
runs :mod:`vgpu_lab.changing_guest`'s rounds: each selects a test exporter, starts ``python -m vgpu
--allocator=vgem`` (whose dumb buffers then come from it) and drives it with our front end through MAP_BLOB:

- ``moving-refused``: the default refuses, and the log says why;
- ``moving-opted-in``: ``--map-changing-placement`` maps it WC; the front end's own PTE of the window (its mapping
  stands for the VMM's) is read from the kernel's page-table dump before, between and after two moves — it really
  goes write-combined → write-back → write-combined, the bytes survive, and map_info stays the WC that is safe in
  both; after a third move (write-back now) the blob is unmapped and mapped again: the back end asks the kernel
  afresh and its log names the new answer;
- ``incoherent``: refused even with the opt-in.
"""

from __future__ import annotations

from pathlib import Path

from tests.e2e.conftest import Rig
from vgpu.protocol import CtrlType
from vgpu_lab.changing_guest import ROUNDS, run_changing_guest
from vgpu_lab.device_guest import MAP_LOG


def test_changing_and_incoherent_exporters_in_the_patched_guest(rig: Rig, tmp_path: Path) -> None:
    run, records = run_changing_guest(kernel=rig.patched.bzimage, busybox=rig.busybox, qemu=rig.qemu.system,
                                      work=tmp_path)
    context = run.describe()
    assert not run.timed_out and run.returncode == 0 and run.guest_status == 0, context
    assert not [r for r in records if r["kind"] == "exception"], f"{records}\n{context}"
    rounds = {r["allocator"]: r for r in records if r["kind"] == "round"}
    assert set(rounds) == set(ROUNDS), context
    elapsed = run.elapsed
    print(f"patched kernel, rounds {list(ROUNDS)}: {elapsed:.2f} s wall")

    refused = rounds["moving-refused"]
    where = f"{refused}\n{context}"
    assert refused["create_blob"] == CtrlType.RESP_OK_NODATA, where
    assert refused["map_resp"] == CtrlType.RESP_ERR_UNSPEC and refused["map_log"] == [], where
    (line,) = refused["refused_log"]
    print(f"default  : {line}")
    assert "exporter 'vgem-test'" in line and "may change while the buffer is mapped" in line, where
    assert "DMA_BUF_IOCTL_INFO: WC (for now: the exporter may move the buffer)" in line, where
    assert "--map-changing-placement maps such buffers WC" in line, where

    mapped = rounds["moving-opted-in"]
    where = f"{mapped}\n{context}"
    assert mapped["map_resp"] == CtrlType.RESP_OK_MAP_INFO and mapped["map_info"] == 3, where  # WC
    assert (mapped["frontend_mapping"] or "").startswith(("/dmabuf:", "anon_inode:dmabuf")), where
    # Page-table truth: the placement really changed under the mapping, and WC is what the guest was told in all.
    print(f"opted in : map_info WC; front end's PTE across two moves {mapped['ptes']}, then "
          f"{mapped['pte_before_remap']}; bytes kept {mapped['marker_kept']}")
    assert mapped["ptes"] == ["WC", "WB", "WC"] and mapped["marker_kept"] is True, where
    assert mapped["pte_before_remap"] == "WB", where
    first, second = (MAP_LOG.search(line) for line in mapped["map_log"])
    assert first is not None and second is not None, where
    for m in (first, second):
        assert (m.group(4), m.group(5)) == ("WC", "operator rule"), where
        assert m.group(6).startswith("--map-changing-placement: mapped WC"), where
    # Asked afresh at the second MAP_BLOB: the kernel's answer is the placement of now.
    assert "kernel: DMA_BUF_IOCTL_INFO: WC (for now" in first.group(6), where
    assert "kernel: DMA_BUF_IOCTL_INFO: CACHED (for now" in second.group(6), where
    print(f"remapped : {second.group(0)}")
    assert mapped["unmap_resp"] == CtrlType.RESP_OK_NODATA, where
    assert (mapped["remap_resp"], mapped["remap_info"]) == (CtrlType.RESP_OK_MAP_INFO, 3), where
    assert mapped["remap_pte"] == "WB" and mapped["remap_marker_kept"] is True, where

    incoherent = rounds["incoherent"]
    where = f"{incoherent}\n{context}"
    assert incoherent["map_resp"] == CtrlType.RESP_ERR_UNSPEC and incoherent["map_log"] == [], where
    (line,) = incoherent["refused_log"]
    print(f"incoherent: {line}")
    assert "needs cache maintenance (DMA_BUF_IOCTL_SYNC)" in line, where
    assert "DMA_BUF_IOCTL_INFO: CACHED+fixed+sync" in line, where
    for r in rounds.values():
        assert r["backend_errors"] == [], f"{r}\n{context}"

