"""End to end on real Xen: the back end maps guest memory through gntdev and privcmd (VHOST_USER_PROTOCOL_F_XEN_MMAP).

What runs: QEMU 10 (TCG) boots Debian's Xen 4.17 with our dom0 kernel (:mod:`vgpu_lab.xen`); dom0 chroots into the
host's root, shared read-only over 9p, and runs *this file* with the host's venv Python in ``--guest`` mode.  There
it starts ``python -m vgpu --xen-mmap=on`` and drives it with our front end in Xen mode
(:class:`vgpu.vhost_user.xen_driver.XenSelfRam`): dom0 grants pages to itself with gntalloc and describes them to
the back end as grants (mapped whole, then on demand) or as its own machine frames (foreign, DOMID_SELF).  No second
domain runs here — one domain plays both sides (hence ``dom0_self_grants`` in the names) — but every mapping the
back end makes is a real gntdev or privcmd mapping that Xen checks and counts: a grant mapped anywhere shows
GTF_reading/GTF_writing in the granting domain's grant table, which dom0 reads back.

Each round (grant, grant on demand, foreign) draws a 2D frame and a GUEST blob through SET_SCANOUT_BLOB, both
compared pixel for pixel with what the display socket received and with our PNG pictures; then it disconnects and
checks that no Xen mapping is left in the back end (its /proc/PID/maps), no grant is mapped (the grant table) and
its fds are back to their idle count.  Then the errors: a foreign region of a domain that owns none of the frames
(every frame refused by Xen), and a backing past the grant cap — each answered clearly while the back end keeps
serving.  The guest prints ``VGPU-GUEST xen <json>`` lines; the host side asserts.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from vgpu_lab.dmabuf_guest import GUEST_SCRATCH

if TYPE_CHECKING:
    from vgpu.session import Session
    from vgpu.vhost_user.xen_driver import Mode, XenSelfRam

REPO = Path(__file__).resolve().parents[2]
PREFIX = "VGPU-GUEST xen "
SCRATCH = Path(GUEST_SCRATCH)
#: Pages dom0 shares per session; the grant cap sits between what a session maps and what the attack asks for.
PAGES = 96
MAX_GRANT_PAGES = 48
W = H = 64
BLOB_W, BLOB_H, BLOB_STRIDE = 48, 40, 256
BOOT_TIMEOUT = 600.0
XEN_MAPPING = re.compile(r"/dev/xen/(gntdev|privcmd)")


def _emit(kind: str, **fields: Any) -> None:
    print(PREFIX + json.dumps({"kind": kind, **fields}, sort_keys=True), flush=True)


# ================================================================================================================
# dom0 side: runs inside the chroot on the dom0 kernel


def _xen_maps(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return [line.strip() for line in f if XEN_MAPPING.search(line)]


def _mapped_grants(ram: XenSelfRam) -> int:
    from vgpu.vhost_user.xen_uapi import GTF_reading, GTF_writing

    return int(sum(1 for e in ram.grant_entries() if int(e["flags"]) & (GTF_reading | GTF_writing)))


def _session(sock: str, ram: XenSelfRam) -> Session:
    from vgpu.session import ALL_FEATURES, Session, make_display
    from vgpu.vhost_user.frontend import FRONTEND_PROTOCOL_FEATURES, Frontend
    from vgpu.vhost_user.wire import ProtocolFeature, bit

    fe = Frontend.connect(sock)
    fe.negotiate(device_features=ALL_FEATURES,
                 protocol_features=FRONTEND_PROTOCOL_FEATURES | bit(ProtocolFeature.XEN_MMAP))
    if not fe.has(ProtocolFeature.XEN_MMAP):
        raise AssertionError("the back end did not offer XEN_MMAP")
    fe.share_memory(ram)
    # 64 entries: every ring fits in one page, as a page-granular Xen guest lays them out.
    fe.setup_queue(0, 64)
    fe.setup_queue(1, 64)
    d = make_display()
    fe.set_display(d)
    return Session(fe, ram, d)


def _draw(gpu: Session, png_dir: Path, seed: int) -> dict[str, Any]:
    """A 2D frame, then a guest blob on the same scanout; what reached the display and the pictures."""
    import numpy as np

    from tests.conftest import scanout_blob, updates
    from vgpu.gpu import png
    from vgpu.protocol import BlobMem, CtrlType, Rect, ResourceCreateBlob
    from vgpu.session import hdr, pattern

    out: dict[str, Any] = {}
    px = pattern(W, H, seed)
    gpu.image_2d(1, W, H, pixels=px)
    gpu.show(1, 0, Rect(0, 0, W, H))
    gpu.flush(1, Rect(0, 0, W, H))
    ((_, data),) = updates(gpu, 1)
    out["frame_display"] = bool(np.array_equal(np.frombuffer(data, np.uint8).reshape(H, W, 4)[..., :3],
                                               px[..., :3]))
    out["frame_png"] = _png_matches(png_dir, px[..., [2, 1, 0]], png)

    size = BLOB_STRIDE * BLOB_H
    b = gpu.backing(size)
    gpu.ok(ResourceCreateBlob(hdr(CtrlType.CMD_RESOURCE_CREATE_BLOB), 2, BlobMem.BLOB_MEM_GUEST, 0, 0, size, b.entries))
    bpx = pattern(BLOB_W, BLOB_H, seed + 1)
    rows = np.zeros((BLOB_H, BLOB_STRIDE), np.uint8)
    rows[:, :BLOB_W * 4] = bpx.reshape(BLOB_H, BLOB_W * 4)
    gpu.write_backing(b, rows.tobytes())
    gpu.ok(scanout_blob(2, BLOB_W, BLOB_H, BLOB_STRIDE))
    gpu.flush(2, Rect(0, 0, BLOB_W, BLOB_H))
    (_, (_, blob)) = updates(gpu, 2)
    got = np.frombuffer(blob, np.uint8).reshape(BLOB_H, BLOB_W, 4)
    out["blob_display"] = bool(np.array_equal(got[..., :3], bpx[..., :3]))
    out["blob_png"] = _png_matches(png_dir, bpx[..., [2, 1, 0]], png)
    return out


def _png_matches(png_dir: Path, want: Any, png: Any) -> bool:
    """The scanout's picture equals `want` (the back end writes it on the flush, at most --png-rate a second)."""
    import numpy as np

    path = png_dir / "scanout-0.png"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if np.array_equal(png.decode(path.read_bytes()), want):
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    return False


def _round(backend: Any, png_dir: Path, mode: Mode, seed: int) -> None:
    from vgpu.procfs import fd_count
    from vgpu.vhost_user.xen_driver import XenSelfRam

    idle = fd_count(backend.pid)
    ram = XenSelfRam(PAGES, mode)
    record: dict[str, Any] = {"mode": mode, "regions": len(ram.regions()), "idle_fds": idle}
    try:
        gpu = _session(backend.socket_path, ram)
        try:
            record.update(_draw(gpu, png_dir, seed))
            record["maps_connected"] = len(_xen_maps(backend.pid))
            record["grants_mapped_connected"] = _mapped_grants(ram)
        finally:
            gpu.fe.close()
        record["fds_after"] = backend.settle_fds(idle, timeout=30)
        record["maps_after"] = _xen_maps(backend.pid)
        record["grants_mapped_after"] = _mapped_grants(ram)
    finally:
        ram.close()
    _emit("round", **record)


def _foreign_of_a_domain_without_those_frames(backend: Any) -> None:
    """A FOREIGN region naming domain 0 instead of DOMID_SELF: Xen refuses every frame (dom0 cannot map its own
    frames by its id); the region is refused with that reason and the back end serves the next front end."""
    from vgpu.procfs import fd_count
    from vgpu.vhost_user.frontend import FRONTEND_PROTOCOL_FEATURES, Frontend, FrontendError
    from vgpu.vhost_user.wire import ProtocolFeature, bit
    from vgpu.vhost_user.xen_driver import XenSelfRam

    idle = fd_count(backend.pid)
    ram = XenSelfRam(8, "foreign")
    ram.domid = 0
    record: dict[str, Any] = {}
    try:
        fe = Frontend.connect(backend.socket_path)
        try:
            fe.negotiate(protocol_features=FRONTEND_PROTOCOL_FEATURES | bit(ProtocolFeature.XEN_MMAP))
            try:
                fe.share_memory(ram)
                record["refused"] = None
            except FrontendError as e:
                record["refused"] = str(e)
        finally:
            fe.close()
        record["fds_after"] = backend.settle_fds(idle, timeout=30)
        record["idle_fds"] = idle
        record["maps_after"] = _xen_maps(backend.pid)
    finally:
        ram.close()
    _emit("foreign_refused", **record)


def _past_the_grant_cap(backend: Any) -> None:
    """On demand, a guest names the memory the back end maps: a backing past --max-grant-pages is refused with
    RESP_ERR_INVALID_PARAMETER, one under it still works, and nothing stays mapped."""
    from vgpu.procfs import fd_count
    from vgpu.protocol import CtrlType, Format, ResourceAttachBacking, ResourceCreate2D
    from vgpu.session import hdr
    from vgpu.vhost_user.xen_driver import XenSelfRam

    idle = fd_count(backend.pid)
    ram = XenSelfRam(PAGES, "grant-on-demand")
    record: dict[str, Any] = {}
    try:
        gpu = _session(backend.socket_path, ram)
        try:
            big = gpu.backing((MAX_GRANT_PAGES + 8) * 4096)
            gpu.ok(ResourceCreate2D(hdr(CtrlType.CMD_RESOURCE_CREATE_2D), 5, Format.FORMAT_B8G8R8X8_UNORM, 1024,
                                    MAX_GRANT_PAGES + 8))
            record["big"] = hex(gpu.err(ResourceAttachBacking(hdr(CtrlType.CMD_RESOURCE_ATTACH_BACKING), 5,
                                                              big.entries)))
            small = gpu.backing(4 * 4096)
            gpu.ok(ResourceAttachBacking(hdr(CtrlType.CMD_RESOURCE_ATTACH_BACKING), 5, small.entries))
            record["small"] = "ok"
            record["grants_mapped_connected"] = _mapped_grants(ram)
        finally:
            gpu.fe.close()
        record["fds_after"] = backend.settle_fds(idle, timeout=30)
        record["idle_fds"] = idle
        record["grants_mapped_after"] = _mapped_grants(ram)
    finally:
        ram.close()
    _emit("grant_cap", **record)


def guest_main() -> int:
    from tests.conftest import start_backend

    hyp = Path("/sys/hypervisor")
    _emit("start", uptime=float(Path("/proc/uptime").read_text().split()[0]), kernel=os.uname().release,
          hypervisor=(hyp / "type").read_text().strip() if (hyp / "type").exists() else None,
          xen=".".join((hyp / "version" / p).read_text().strip() for p in ("major", "minor"))
          if (hyp / "version").exists() else None)
    work = SCRATCH / "xen-e2e"
    work.mkdir(parents=True, exist_ok=True)
    png_dir = work / "png"
    backend = start_backend([sys.executable, "-m", "vgpu", "--xen-mmap=on", f"--scanout-png={png_dir}",
                             "--png-rate=1000", f"--max-grant-pages={MAX_GRANT_PAGES}", "--log-level=info"],
                            work, "vgpu")
    started = time.monotonic()
    try:
        steps: list[Callable[[], None]] = [
            lambda: _round(backend, png_dir, "grant", 10),
            lambda: _round(backend, png_dir, "grant-on-demand", 20),
            lambda: _round(backend, png_dir, "foreign", 30),
            lambda: _foreign_of_a_domain_without_those_frames(backend),
            lambda: _past_the_grant_cap(backend),
        ]
        for step in steps:
            try:
                step()
            except Exception as exc:  # report and go on: one broken round must not hide the others
                _emit("exception", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
        _emit("backend", alive=backend.alive(),
              log=[line for line in backend.log().splitlines()
                   if "refused" in line or "Xen" in line or "grant" in line][-20:])
    finally:
        backend.stop()
    _emit("done", seconds=round(time.monotonic() - started, 1))
    return 0


# ================================================================================================================
# host side: pytest


GUEST_SCRIPT = """#!/bin/sh
set -e
{mounts}
exec chroot {root} /usr/bin/env TMPDIR={scratch} PYTHONDONTWRITEBYTECODE=1 {python} {script} --guest
"""


def _records(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line[len(PREFIX):]) for line in lines if line.startswith(PREFIX)]


@pytest.mark.e2e
def test_vhost_user_on_xen_dom0_self_grants(tmp_path: Path) -> None:
    from tests.conftest import unavailable
    from vgpu.protocol import CtrlType
    from vgpu_lab import dmabuf_guest, kernel_build, provision, xen
    from vgpu_lab.shell import ProvisionError

    try:
        provisioner = provision.Provisioner()
        qemu = provisioner.qemu()
        busybox = provisioner.busybox()
        hypervisor = xen.xen_hypervisor(provisioner)
        kernel = xen.dom0_kernel(provisioner)
    except (ProvisionError, kernel_build.KernelBuildError, OSError) as exc:
        unavailable(f"Xen lab component: {exc}")

    here = Path(__file__).resolve()
    hidden = dmabuf_guest.shadowed([here, Path(sys.executable)])
    assert not hidden, f"dom0's chroot cannot show {hidden}"
    script = tmp_path / "xen-guest"
    script.write_text(GUEST_SCRIPT.format(
        mounts="\n".join(dmabuf_guest.chroot_mounts()), root=dmabuf_guest.GUEST_HOST_ROOT,
        scratch=GUEST_SCRATCH, python=sys.executable, script=here))
    script.chmod(0o755)
    initrd = xen.dom0_initramfs(tmp_path / "initrd.gz", busybox=busybox, command="/bin/xen-guest",
                                files={"/bin/xen-guest": script})
    run = xen.run_dom0(xen=hypervisor.image, kernel=kernel.bzimage, initrd=initrd, qemu=qemu.system,
                       timeout=BOOT_TIMEOUT, serial_log=tmp_path / "serial.log")
    context = run.describe()
    records = _records(run.guest_lines())
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


if __name__ == "__main__":
    if sys.argv[1:] == ["--guest"]:
        sys.path.insert(0, str(REPO))
        sys.exit(guest_main())
    sys.exit(f"usage: {sys.argv[0]} --guest (inside the Xen dom0; pytest runs the host side)")
