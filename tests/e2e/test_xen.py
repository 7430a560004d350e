"""End to end on real Xen: the back end maps guest memory through gntdev and privcmd (VHOST_USER_PROTOCOL_F_XEN_MMAP).

QEMU 10 (TCG) boots Debian's Xen 4.17 with our dom0 kernel; in dom0 :mod:`vgpu_lab.xen_guest` runs our back end
with ``--xen-mmap=on`` and drives it with our front end in Xen mode (dom0 grants pages to itself, or names its own
frames), three rounds and two attacks; see that module for what each round does. This side judges its records:
exact pixels on the display and in the pictures, real Xen mappings while connected and none after, grants
unmapped, fds back to idle, and the errors answered clearly while the back end keeps serving.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vgpu_lab.xen_guest import MAX_GRANT_PAGES, PAGES, run_xen_guest


@pytest.mark.e2e
def test_vhost_user_on_xen_dom0_self_grants(tmp_path: Path) -> None:
    from tests.conftest import unavailable
    from vgpu.protocol import CtrlType
    from vgpu_lab import kernel_build, provision, xen
    from vgpu_lab.shell import ProvisionError

    try:
        provisioner = provision.Provisioner()
        qemu = provisioner.qemu()
        busybox = provisioner.busybox()
        hypervisor = xen.xen_hypervisor(provisioner)
        kernel = xen.dom0_kernel(provisioner)
    except (ProvisionError, kernel_build.KernelBuildError, OSError) as exc:
        unavailable(f"Xen lab component: {exc}")

    run, records = run_xen_guest(hypervisor=hypervisor.image, kernel=kernel.bzimage, busybox=busybox,
                                 qemu=qemu.system, work=tmp_path)
    context = run.describe()
    print(f"Xen run: {run.elapsed:.1f} s wall")
    for r in records:
        print(json.dumps(r, sort_keys=True))
    assert not run.timed_out and run.guest_status == 0, context
    assert not [r for r in records if r["kind"] == "exception"], context
    assert records and records[-1]["kind"] == "done", context
    start = next(r for r in records if r["kind"] == "start")
    assert start["hypervisor"] == "xen" and start["xen"] == "4.17", start

    rounds = {r["mode"]: r for r in records if r["kind"] == "round"}
    assert set(rounds) == {"grant", "grant-on-demand", "foreign"}, context
    for mode, r in rounds.items():
        # A 2D frame and a guest blob through SET_SCANOUT_BLOB, both exact on the display and in the picture.
        assert (r["frame_display"], r["frame_png"], r["blob_display"], r["blob_png"]) == (True,) * 4, r
        # While connected the back end held real Xen mappings; after the disconnect none, and its idle fds.
        assert r["maps_connected"] > 0, r
        assert r["maps_after"] == [] and r["fds_after"] == r["idle_fds"], r
        if mode == "foreign":
            assert r["grants_mapped_connected"] == 0, r  # privcmd maps frames, not grants
        else:
            assert r["grants_mapped_connected"] > 0 and r["grants_mapped_after"] == 0, r
    # Whole-region grants map every shared page; on demand only rings, command buffers in flight and backings.
    assert rounds["grant"]["grants_mapped_connected"] == PAGES, rounds["grant"]
    assert 0 < rounds["grant-on-demand"]["grants_mapped_connected"] < PAGES, rounds["grant-on-demand"]

    refused = next(r for r in records if r["kind"] == "foreign_refused")
    assert refused["refused"] and "ADD_MEM_REG" in refused["refused"], refused
    assert refused["maps_after"] == [] and refused["fds_after"] == refused["idle_fds"], refused
    cap = next(r for r in records if r["kind"] == "grant_cap")
    assert cap["big"] == hex(CtrlType.RESP_ERR_INVALID_PARAMETER) and cap["small"] == "ok", cap
    assert cap["grants_mapped_after"] == 0 and cap["fds_after"] == cap["idle_fds"], cap
    backend = next(r for r in records if r["kind"] == "backend")
    assert backend["alive"], backend
    log = "\n".join(backend["log"])
    assert "frames of domain 0 not mapped" in log, log
    assert f"cap of {MAX_GRANT_PAGES}" in log, log
