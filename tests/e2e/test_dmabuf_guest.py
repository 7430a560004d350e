"""End to end: our dma-buf layer, allocators and resolver against the *real* exporters of a 6.12 Linux guest
(:mod:`vgpu_lab.exporters_guest` runs there; see it for why and how): Debian's kernel, so the real ENOTTY for the
proposed ioctl, and the allocators' knowledge, rules and the legacy heuristic behind it.
"""

from __future__ import annotations

import json
from pathlib import Path

from vgpu_lab import provision
from vgpu_lab.exporters_guest import RULES, SIZE, run_exporters_guest


def test_real_exporters_in_a_guest(lab: provision.Lab, tmp_path: Path) -> None:
    guest, records = run_exporters_guest(kernel=lab.kernel, busybox=lab.busybox, qemu=lab.qemu.system,
                                         work=tmp_path)
    context = guest.describe()
    print(f"guest run: {guest.elapsed:.2f} s wall")
    for r in records:
        print(json.dumps(r, sort_keys=True))
    assert not guest.timed_out and guest.guest_status == 0, context
    assert not [r for r in records if r["kind"] == "exception"], context
    assert records and records[-1]["kind"] == "done", context
    start = next(r for r in records if r["kind"] == "start")
    assert start["kernel"].startswith("6.12."), context

    buffers = {r["allocator"]: r for r in records if r["kind"] == "buffer"}
    expect = {
        # allocator: (exp_name, DRM driver, resolved attribute)
        "udmabuf": ("udmabuf", None, "CACHED"),
        "dma-heap": ("system", None, "CACHED"),
        "vgem": ("drm", "vgem", "WC"),
        "memfd": (None, None, "CACHED"),
    }
    for name, (exporter, driver, attr) in expect.items():
        b = buffers[name]
        assert b["available"], (name, b["reason"])
        assert (b["exporter"], b["fdinfo_exporter"], b["drm_driver"]) == (exporter, exporter, driver), b
        assert b["size"] == b["lseek_size"] == SIZE, b
        if exporter is not None:
            assert b["fdinfo_size"] == SIZE and f"exp_name:\t{exporter}" in b["raw_fdinfo"], b
            assert b["sync"] == "ok", b
        else:
            assert b["sync"] == "Inappropriate ioctl for device", b
        assert b["mmap_roundtrip"] is True, b
        # A stock kernel: the real ENOTTY for the proposed ioctl, whatever the param.
        assert (b["kernel"], b["kernel_kind"], b["kernel_param99"]) == ("ENOTTY", "ENOTTY", "ENOTTY"), b
        assert (b["attr"], b["provenance"]) == (attr, "allocator"), b
        assert f"{name}: " in b["detail"] and "kernel: DMA_BUF_IOCTL_INFO: ENOTTY" in b["detail"], b
        assert b["fd_leak"] == 0, b

        ext = b["external"]
        assert "unresolved" in ext["plain"] and "ENOTTY" in ext["plain"]["unresolved"], ext
        if exporter is None:  # a memfd from outside: nobody can vouch for it, and the heuristic does not guess
            assert "unresolved" in ext["heuristic"] and "unresolved" in ext["rules"], ext
            continue
        # The legacy heuristic keys on the name: "drm" and "udmabuf" and "system" are all "not i915" → WC.
        assert (ext["heuristic"]["attr"], ext["heuristic"]["provenance"]) == ("WC", "legacy heuristic"), ext
        assert "ENOTTY" in ext["heuristic"]["detail"], ext
        if exporter == "drm":
            assert (ext["rules"]["attr"], ext["rules"]["provenance"]) == ("UNCACHED", "operator rule"), ext
            assert f"rule exporters.drm = uncached in {RULES}" in ext["rules"]["detail"], ext
        else:
            assert ext["rules"]["provenance"] == "legacy heuristic", ext

    errors = next(r for r in records if r["kind"] == "errors")
    assert "UDMABUF_CREATE of 134217728 bytes: Invalid argument" in errors["udmabuf_128M"], errors
    assert "over the cap" in errors["vgem_over_cap"], errors
    assert errors["fd_leak"] == 0, errors

    misc = next(r for r in records if r["kind"] == "misc")
    assert misc["vgem_node"] == "/dev/dri/card0" and misc["drm_version"]["name"] == "vgem", misc
    assert misc["auto"] == "udmabuf", misc

    cli = next(r for r in records if r["kind"] == "cli")
    assert cli["own_status"] == 0 and cli["own"]["exporter"] == "system", cli
    assert cli["own"]["resolution"]["provenance"] == "allocator" and cli["own"]["resolution"]["map_info"] == 1, cli
    peer = cli["peer"]
    assert cli["peer_status"] == 0 and peer["exporter"] == "drm" and peer["kernel"]["answer"] == "ENOTTY", cli
    assert peer["resolution"]["attr"] == "WC" and peer["resolution"]["provenance"] == "legacy heuristic", cli
    assert peer["resolution"]["map_info"] == 3, cli
