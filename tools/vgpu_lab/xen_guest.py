"""Inside a Xen dom0: our back end mapping guest memory through gntdev and privcmd (VHOST_USER_PROTOCOL_F_XEN_MMAP).

The dom0 side of the Xen end-to-end run. QEMU 10 (TCG) boots Debian's Xen 4.17 with our dom0 kernel
(:mod:`vgpu_lab.xen`); dom0 chroots into the host's root, shared read-only over 9p, and runs
``python -m vgpu_lab.xen_guest`` with the host's venv Python. It starts ``python -m vgpu --xen-mmap=on`` and drives
it with our front end in Xen mode (:class:`vgpu.vhost_user.xen_driver.XenSelfRam`): dom0 grants pages to itself with
gntalloc and describes them to the back end as grants (mapped whole, then on demand) or as its own machine frames
(foreign, DOMID_SELF). No second domain runs here -- one domain plays both sides -- but every mapping the back end
makes is a real gntdev or privcmd mapping that Xen checks and counts: a grant mapped anywhere shows
GTF_reading/GTF_writing in the granting domain's grant table, which dom0 reads back.

Each round (grant, grant on demand, foreign) draws a 2D frame and a GUEST blob through SET_SCANOUT_BLOB, both
compared pixel for pixel with what the display socket received and with our PNG pictures; then it disconnects and
records the Xen mappings left in the back end (its /proc/PID/maps), the grants still mapped (the grant table) and
its fds. Then the errors: a foreign region of a domain that owns none of the frames, and a backing past the grant
cap. Every step prints one ``VGPU-GUEST xen <json>`` line; :func:`run_xen_guest` boots it and returns them, and
``tests/e2e/test_xen.py`` judges them.
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

from vgpu.conformance.process import BackendProcess
from vgpu_lab import dmabuf_guest, xen
from vgpu_lab.qemu import GuestRun

if TYPE_CHECKING:
    from vgpu.session import Session
    from vgpu.vhost_user.xen_driver import Mode, XenSelfRam

PREFIX = "VGPU-GUEST xen "
SCRATCH = Path(dmabuf_guest.GUEST_SCRATCH)
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

    from vgpu.gpu import png
    from vgpu.protocol import BlobMem, CtrlType, Rect, ResourceCreateBlob
    from vgpu.session import hdr, pattern, scanout_blob, updates

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


def _round(backend: BackendProcess, png_dir: Path, mode: Mode, seed: int) -> None:
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


def _foreign_of_a_domain_without_those_frames(backend: BackendProcess) -> None:
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


def _past_the_grant_cap(backend: BackendProcess) -> None:
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
    hyp = Path("/sys/hypervisor")
    _emit("start", uptime=float(Path("/proc/uptime").read_text().split()[0]), kernel=os.uname().release,
          hypervisor=(hyp / "type").read_text().strip() if (hyp / "type").exists() else None,
          xen=".".join((hyp / "version" / p).read_text().strip() for p in ("major", "minor"))
          if (hyp / "version").exists() else None)
    work = SCRATCH / "xen-e2e"
    work.mkdir(parents=True, exist_ok=True)
    png_dir = work / "png"
    backend = BackendProcess([sys.executable, "-m", "vgpu", "--xen-mmap=on", f"--scanout-png={png_dir}",
                              "--png-rate=1000", f"--max-grant-pages={MAX_GRANT_PAGES}", "--log-level=info",
                              "--socket-path={sock}"], work, "vgpu", start_timeout=90).start()
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
# host side: boot Xen and dom0, collect the records

GUEST_SCRIPT = """#!/bin/sh
set -e
{mounts}
exec chroot {root} /usr/bin/env TMPDIR={scratch} PYTHONDONTWRITEBYTECODE=1 {python} -m vgpu_lab.xen_guest
"""


def records(lines: list[str]) -> list[dict[str, Any]]:
    """dom0's reports, in order, from its serial lines."""
    return [json.loads(line[len(PREFIX):]) for line in lines if line.startswith(PREFIX)]


def run_xen_guest(*, hypervisor: Path, kernel: Path, busybox: Path, qemu: Path,
                  work: Path) -> tuple[GuestRun, list[dict[str, Any]]]:
    """Boot Xen with `kernel` as dom0 once, run the dom0 side in the host's root, and return its records."""
    hidden = dmabuf_guest.shadowed([Path(__file__).resolve(), Path(sys.executable)])
    if hidden:
        raise ValueError(f"dom0's chroot cannot show {hidden} (its own /dev, /proc, /sys cover them)")
    script = work / "xen-guest"
    script.write_text(GUEST_SCRIPT.format(
        mounts="\n".join(dmabuf_guest.chroot_mounts()), root=dmabuf_guest.GUEST_HOST_ROOT,
        scratch=dmabuf_guest.GUEST_SCRATCH, python=sys.executable))
    script.chmod(0o755)
    initrd = xen.dom0_initramfs(work / "initrd.gz", busybox=busybox, command="/bin/xen-guest",
                                files={"/bin/xen-guest": script})
    run = xen.run_dom0(xen=hypervisor, kernel=kernel, initrd=initrd, qemu=qemu, timeout=BOOT_TIMEOUT,
                       serial_log=work / "serial.log")
    return run, records(run.guest_lines())


if __name__ == "__main__":
    sys.exit(guest_main())
