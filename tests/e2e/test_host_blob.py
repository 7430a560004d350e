"""End to end, the main job: a real Linux guest maps a host-visible blob from our back end.

QEMU 11.1 (sid chroot, generic vhost-user device with a shared-memory BAR sized by our GET_SHMEM_CONFIG) boots the
6.12 guest; `blob_map` uses the cross-domain context to get a host buffer, creates a HOST3D blob, maps it, and
writes a pattern the host then finds in our buffer; the host writes one back that the guest reads.  The guest
kernel's PAT list shows the memory type it used for our map_info: write-back for CACHED, write-combining for WC.
Run once with each: CACHED from the memfd allocator's knowledge, WC from an operator override (no exporter on
this host maps write-combined, so an override is the honest way to make the guest take its WC path).  While the
guest holds the mapping, `vgpu-status --json` must show it as the guest was told it and as the log explains it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vgpu_lab import provision
from vgpu_lab.hostblob import PAT_TYPE, HostBlobRun, run_host_blob

STEPS = ("params", "context", "ring", "init", "reqs", "blob", "mmap", "pat", "write", "host", "done")


# The boots provision through the provisioner; these make a missing component a clear failure or skip first.
pytestmark = pytest.mark.usefixtures("lab", "qemu11")


def check(run: HostBlobRun, map_info: int, provenance: str) -> None:
    context = run.describe()
    assert not run.guest.timed_out and run.guest.returncode == 0 and run.guest.guest_status == 0, context
    features = re.search(r"\[drm\] features: (.*)", run.guest.dmesg)
    assert features and "+resource_blob" in features.group(1) and "+host_visible" in features.group(1), context
    steps = run.steps
    for step in STEPS:
        assert steps.get(step, "").startswith("ok"), f"{step}: {steps.get(step)}\n{context}"
    # The guest was told the attribute up front (image requirements) and again by MAP_BLOB.
    assert f"map_info={map_info}" in steps["reqs"], context
    m = run.map_log
    assert m is not None, context
    offset, length = int(m.group(2), 16), int(m.group(3), 16)
    assert m.group(4) == {1: "CACHED", 2: "UNCACHED", 3: "WC"}[map_info] and m.group(5).startswith(provenance), m[0]
    # The guest kernel mapped the window range with the memory type our map_info asked for.
    window = run.window
    assert window is not None and window[0] >= 1 << 32, context  # a 1 GiB BAR lies above 4 GiB: MTRRs stay out
    start = window[0] + offset
    types = {t for a, b, t in run.pat if a <= start and start + length <= b}
    assert types == {PAT_TYPE[map_info]}, f"PAT for [{start:#x}, +{length:#x}): {run.pat}\n{context}"
    # Bytes went both ways through the same memory: our buffer held the guest's pattern, the guest read ours.
    assert run.host.saw_guest_pattern and not run.host.error, f"{run.host}\n{context}"
    assert "unmapped blob" in run.backend_output, context
    assert run.released, context
    check_status(run, map_info, provenance)


def check_status(run: HostBlobRun, map_info: int, provenance: str) -> None:
    """What the status query showed while the guest held the mapping matches the guest, the log and /proc."""
    doc, m = run.host.status, run.map_log
    assert doc is not None and m is not None, run.host.status_error or run.describe()
    assert (doc["state"], doc["allocator"]) == ("connected", "memfd"), doc
    sm = run.status_mapping
    assert sm is not None, doc["device"]
    assert (sm["offset"], sm["length"], sm["map_info"], sm["map_info_name"]) == \
        (int(m[2], 16), int(m[3], 16), map_info, m[4]), sm
    # Provenance and detail are the ones the MAP_BLOB log line gave, e.g. "allocator: memfd: shmem pages ...".
    assert f"{sm['provenance']}: {sm['detail']}" == m[5] and m[5].startswith(provenance), (sm, m[5])
    # The guest printed the same map_info (image requirements) and the host found its pattern in this very fd.
    assert f"map_info={sm['map_info']}" in run.steps["reqs"]
    assert sm["buffer"]["fd"] == run.host.buffer_fd and sm["buffer"]["allocator"] == "memfd", (sm, run.host)
    (res,) = [r for r in doc["device"]["resources"] if r["id"] == sm["resource_id"]]
    assert res["kind"] == "host_blob" and res["mapped"], res
    assert doc["quotas"]["host_memory_bytes"]["used"] >= sm["buffer"]["size"]


def test_cached_blob_from_the_allocators_knowledge(provisioner: provision.Provisioner, tmp_path: Path) -> None:
    run = run_host_blob(provisioner, tmp_path, backend_args=("--allocator=memfd",))
    print(f"CACHED run: {run.wall:.2f} s; {run.map_log[0] if run.map_log else ''}")
    check(run, 1, "allocator: memfd")


def test_wc_blob_from_an_operator_override(provisioner: provision.Provisioner, tmp_path: Path) -> None:
    rules = tmp_path / "cache.toml"
    rules.write_text('[allocator_overrides]\nmemfd = "wc"\n')
    run = run_host_blob(provisioner, tmp_path, backend_args=("--allocator=memfd", f"--cache-rules={rules}"))
    print(f"WC run: {run.wall:.2f} s; {run.map_log[0] if run.map_log else ''}")
    check(run, 3, "operator rule: rule allocator_overrides.memfd = wc")
