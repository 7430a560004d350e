"""Inside a guest: the whole device — our back end driven by our own front end — on a real 6.12 kernel.

Why inside a guest: only there do real dma-buf exporters exist (the host has no udmabuf and no DRM), and only our
patched kernel (:mod:`vgpu_lab.kernel_build`) answers ``DMA_BUF_IOCTL_INFO``. So the product's primary path — the
back end asking the exporter, and telling the guest the answer in RESP_OK_MAP_INFO — can be proven end to end only
by running ``python -m vgpu`` and a front end next to each other in such a guest.

How: QEMU 10 (TCG) boots the guest kernel with the host's root shared read-only over virtio-9p
(:func:`vgpu_lab.dmabuf_guest.host_root_args`); the guest chroots into it (its own /dev, /proc, /sys, debugfs and
a scratch tmpfs bound in: :func:`vgpu_lab.dmabuf_guest.chroot_mounts`) and runs this module with the host's venv
Python. For each allocator round (udmabuf, vgem) the guest side starts
``python -m vgpu --socket-path=/dev/shm/vgpu.sock --context-types=cross-domain --allocator=NAME --log-level=info``
and drives it as a cross-domain guest (:class:`vgpu.session.CrossDomainGuest`): CTX_CREATE, a guest query-ring blob
attached to the context, INIT, GET_IMAGE_REQUIREMENTS, a HOST3D blob, MAP_BLOB. It then checks what the front end
really mapped (the dma-buf in /proc/self/maps, the bytes reaching the back end's buffer, and — on the patched
kernel, which has PTDUMP_DEBUGFS — the memory type of the front end's own PTE) and prints one
``VGPU-GUEST device <json>`` line per round, the back end's ``map blob`` log lines included. The ``scanout`` round
shows a guest blob on a display that takes dma-bufs (DMABUF_SCANOUT2 of a udmabuf of the guest's pages).

:func:`run_device_guest` boots it on the host and returns the records; ``tests/e2e/test_device_in_guest.py``
judges them. ``python -m vgpu_lab.device_guest [ROUND...]`` is the guest side.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import struct
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from vgpu.conformance.process import BackendProcess
from vgpu_lab import dmabuf_guest
from vgpu_lab.qemu import GuestRun

PREFIX = "VGPU-GUEST device "
#: The chroot's writable scratch: its /tmp is the host's own, read-only (see GUEST_SCRATCH for why).
SOCKET_DIR = Path(dmabuf_guest.GUEST_SCRATCH)
BACKEND_NAME = "vgpu"  # the back end's socket is SOCKET_DIR/vgpu.sock, its log SOCKET_DIR/vgpu.log
#: Where in the shared-memory window the blob is mapped (2 MiB aligned, like a guest driver's first mapping).
MAP_OFFSET = 0x200000
WIDTH = HEIGHT = 256
PTDUMP = "/sys/kernel/debug/page_tables/current_kernel"
#: x86 PAT index (PAT<<2 | PCD<<1 | PWT) → memory type, with the PAT table Linux programs.
PAT_TABLE = ("WB", "WC", "UC-", "UC", "WB", "WP", "UC-", "WT")
BOOT_TIMEOUT = 300.0
ALLOCATORS = ("udmabuf", "vgem")
#: How a dma-buf file is named in /proc/PID/fd links and /proc/PID/maps (``/dev/udmabuf`` is not one).
DMABUF_NAMES = ("/dmabuf:", "anon_inode:dmabuf")
#: ``map blob 1 at 0x200000 +0x40000: map_info WC (kernel: DMA_BUF_IOCTL_INFO: ...)`` (vgpu/gpu/blobs.py).
MAP_LOG = re.compile(r"map blob (\d+) at (0x[0-9a-f]+) \+(0x[0-9a-f]+): map_info (\w+) \((kernel|allocator|"
                     r"operator rule|legacy heuristic): (.*)\)$")


# ================================================================================================================
# guest side: runs inside the chroot on the guest kernel


def _start(cmd: list[str]) -> BackendProcess:
    """Our back end on SOCKET_DIR/vgpu.sock. Generous: inside an emulated guest (TCG, the host root over 9p) Python
    alone takes ~14 s to start under load; a passing run waits only as long as start-up takes."""
    return BackendProcess([*cmd, "--socket-path={sock}"], SOCKET_DIR, BACKEND_NAME, start_timeout=90).start()


def _emit(kind: str, **fields: Any) -> None:
    print(PREFIX + json.dumps({"kind": kind, **fields}, sort_keys=True), flush=True)


def pte_of(dump: str, addr: int) -> tuple[str, str] | None:
    """(memory type, caching bits) of the 4K PTE mapping ``addr`` in a ptdump text, or None when unmapped.

    Lines look like ``0x<start>-0x<end>  <size> <flags...> <level>``; only ``pte`` level entries carry PAT in bit
    7 (at the pmd level that bit is PSE), which is why the level is checked.
    """
    for line in dump.splitlines():
        m = re.match(r"^0x([0-9a-f]+)-0x([0-9a-f]+)\s+(.*)$", line)
        if not m or not int(m.group(1), 16) <= addr < int(m.group(2), 16):
            continue
        words = m.group(3).split()
        pwt, pcd = "PWT" in words, "PCD" in words
        pat = "PAT" in words and words[-1:] == ["pte"]
        bits = [name for name, on in (("PWT", pwt), ("PCD", pcd), ("PAT", pat)) if on]
        return PAT_TABLE[(pat << 2) | (pcd << 1) | pwt], ",".join(bits) or "none"
    return None


def _mapping_path(addr: int) -> str | None:
    """What /proc/self/maps says is mapped at ``addr`` (a dma-buf shows as ``/dmabuf:`` or ``anon_inode:dmabuf``)."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if start <= addr < end:
                return parts[5].strip() if len(parts) > 5 else ""
    return None


def _backend_holds(pid: int, marker: bytes) -> str | None:
    """The back end's dma-buf fd (as ``/proc/PID/fd/N -> link``) whose bytes contain ``marker``, or None.

    The fd is taken with pidfd_getfd (:func:`vgpu.blob.dmabuf.open_fd_path`; a dma-buf cannot be re-opened by path)
    and mapped read-only: this proves the front end's window and the back end's buffer are the same memory.
    """
    from vgpu.blob.dmabuf import fd_size, open_fd_path

    for name in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{name}"
        try:
            link = os.readlink(path)
        except OSError:
            continue
        if not link.startswith(DMABUF_NAMES):
            continue
        fd = open_fd_path(path)
        try:
            size = fd_size(fd)
            with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
                if m.find(marker) >= 0:
                    return f"{path} -> {link}"
        finally:
            os.close(fd)
    return None


def _round(allocator: str) -> None:
    """One allocator: start our back end, drive it with our front end through MAP_BLOB, report what happened."""
    from vgpu.protocol import CtrlType, ResourceUnmapBlob
    from vgpu.protocol import structs as s
    from vgpu.session import CROSS_DOMAIN_FEATURES, PAGE, CrossDomainGuest, Session, rtype

    sock = SOCKET_DIR / f"{BACKEND_NAME}.sock"
    with contextlib.suppress(FileNotFoundError):  # the previous round's socket: start_backend waits for a new one
        sock.unlink()
    cmd = [sys.executable, "-m", "vgpu", "--context-types=cross-domain", f"--allocator={allocator}",
           "--log-level=info"]
    record: dict[str, Any] = {"allocator": allocator, "command": [*cmd, f"--socket-path={sock}"]}
    started = time.monotonic()
    backend = _start(cmd)
    record["backend_start_s"] = round(time.monotonic() - started, 2)
    try:
        gpu = Session.open(backend.socket_path, features=CROSS_DOMAIN_FEATURES, shm=True)
        try:
            client = CrossDomainGuest(gpu)
            client.start()  # CTX_CREATE (cross-domain), query-ring GUEST blob, CTX_ATTACH_RESOURCE, INIT
            reqs: Any = client.requirements(WIDTH, HEIGHT)  # GET_IMAGE_REQUIREMENTS
            record.update(reqs_size=reqs.size, reqs_map_info=reqs.map_info, blob_id=reqs.blob_id)
            record["create_blob"] = rtype(client.create_blob(1, reqs))  # RESOURCE_CREATE_BLOB HOST3D
            raw = client.map(1, MAP_OFFSET)  # RESOURCE_MAP_BLOB
            resp = s.resp_map_info.parse(raw)
            record.update(map_resp=int(resp.hdr.type), map_info=int(resp.map_info))
            if resp.hdr.type == CtrlType.RESP_OK_MAP_INFO:
                window = gpu.fe.shm[1]
                record["shm_log"] = [[kind, m.shm_offset, m.length] for kind, m in window.log]
                marker = f"device-in-guest {allocator} {os.getpid()}".encode()
                for page in range(0, reqs.size, PAGE):  # every PTE exists before the page tables are read
                    window.write(MAP_OFFSET + page, b"\x5a")
                window.write(MAP_OFFSET + PAGE, marker)
                record["window_readback"] = window.read(MAP_OFFSET + PAGE, len(marker)) == marker
                addr = window.base + MAP_OFFSET
                record["frontend_mapping"] = _mapping_path(addr)
                try:
                    dump = Path(PTDUMP).read_text()
                except OSError as exc:
                    record["pte"], record["pte_error"] = None, f"{PTDUMP}: {exc.strerror}"
                else:
                    found = pte_of(dump, addr)
                    record["pte"], record["pte_bits"] = found if found else (None, None)
                record["backend_buffer"] = _backend_holds(backend.pid, marker)
                unmap = gpu.cmd(ResourceUnmapBlob(client.h(CtrlType.CMD_RESOURCE_UNMAP_BLOB), 1))
                record["unmap_resp"] = rtype(unmap)
        finally:
            gpu.close()
    finally:
        record["backend_exit"] = backend.stop()
    log = backend.log()
    record["map_log"] = [line for line in log.splitlines() if "map blob " in line]
    record["backend_errors"] = [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line]
    record["seconds"] = round(time.monotonic() - started, 2)
    _emit("round", **record)


def _scanout_round() -> None:
    """A guest blob on a scanout, with a display that takes dma-bufs: the back end exports the blob's guest pages
    as a udmabuf and sends DMABUF_SCANOUT2; a flush is a DMABUF_UPDATE the display answers."""
    from vgpu.protocol import BlobMem, CtrlType, Format, Rect, ResourceCreateBlob, ResourceFlush, SetScanoutBlob
    from vgpu.session import Session, hdr, make_display, pattern, rtype
    from vgpu.vhost_user.wire import GpuRequest

    sock = SOCKET_DIR / f"{BACKEND_NAME}.sock"
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    started = time.monotonic()
    backend = _start([sys.executable, "-m", "vgpu", "--log-level=info"])
    record: dict[str, Any] = {"backend_start_s": round(time.monotonic() - started, 2)}
    w, h = 64, 64
    try:
        gpu = Session.open(backend.socket_path, display=make_display())
        try:
            b = gpu.backing(w * h * 4)
            px = pattern(w, h)
            gpu.write_backing(b, px.tobytes())
            record["create"] = rtype(gpu.cmd(ResourceCreateBlob(
                hdr(CtrlType.CMD_RESOURCE_CREATE_BLOB), 1, BlobMem.BLOB_MEM_GUEST, 2, 0, w * h * 4, b.entries)))
            record["set_scanout_blob"] = rtype(gpu.cmd(SetScanoutBlob(
                hdr(CtrlType.CMD_SET_SCANOUT_BLOB), Rect(0, 0, w, h), 0, 1, w, h, Format.FORMAT_B8G8R8X8_UNORM,
                (w * 4, 0, 0, 0), (0, 0, 0, 0))))
            assert gpu.display is not None
            (ev,) = gpu.display.wait_for(GpuRequest.DMABUF_SCANOUT2)
            record["scanout_fields"] = list(struct.unpack_from("<9Ii", ev.payload))
            fd = ev.fds[0]
            info = Path(f"/proc/self/fdinfo/{fd}").read_text()
            record["exp_name"] = next((ln.split()[1] for ln in info.splitlines() if ln.startswith("exp_name:")), None)
            with mmap.mmap(fd, w * h * 4, prot=mmap.PROT_READ) as m:
                record["contents_match"] = m[:] == px.tobytes()
            record["flush"] = rtype(gpu.cmd(ResourceFlush(hdr(CtrlType.CMD_RESOURCE_FLUSH), Rect(0, 0, w, h), 1)))
            record["dmabuf_updates"] = len(gpu.display.wait_for(GpuRequest.DMABUF_UPDATE))
            record["copied_updates"] = len(gpu.display.of(GpuRequest.UPDATE))
        finally:
            gpu.close()
    finally:
        backend.stop()
    record["log"] = [ln for ln in backend.log().splitlines() if "blob 1 shown" in ln]
    _emit("scanout", **record)


def guest_main(allocators: list[str]) -> int:
    """Every round, each reported even when another failed (one broken exporter must not hide the other)."""
    started = time.monotonic()
    _emit("start", kernel=os.uname().release, uptime=float(Path("/proc/uptime").read_text().split()[0]))
    for allocator in allocators:
        try:
            if allocator == "scanout":
                _scanout_round()
                continue
            _round(allocator)
        except Exception as exc:
            _emit("exception", allocator=allocator, error=f"{type(exc).__name__}: {exc}",
                  traceback=traceback.format_exc().splitlines()[-8:])
    _emit("done", seconds=round(time.monotonic() - started, 2))
    return 0


# ================================================================================================================
# host side: boot the guest and collect the rounds


def records(lines: list[str]) -> list[dict[str, Any]]:
    """The guest's reports, in order, from its serial lines."""
    return [json.loads(line[len(PREFIX):]) for line in lines if line.startswith(PREFIX)]


def run_device_guest(*, kernel: Path, busybox: Path, qemu: Path, work: Path, rounds: tuple[str, ...] = ALLOCATORS,
                     modules_dir: Path | None = None) -> tuple[GuestRun, list[dict[str, Any]]]:
    """Boot `kernel` once with the given rounds (Debian's kernel with its `modules_dir`, or the patched one)."""
    debugfs = (f"mount -t debugfs debugfs {dmabuf_guest.GUEST_HOST_ROOT}/sys/kernel/debug || "
               'echo "VGPU-GUEST device-note no debugfs"')  # the page tables, on the patched kernel
    run = dmabuf_guest.run_python_in_chroot("vgpu_lab.device_guest", rounds, kernel=kernel, busybox=busybox,
                                            qemu=qemu, work=work, modules_dir=modules_dir, setup=[debugfs],
                                            timeout=BOOT_TIMEOUT)
    return run, records(run.guest_lines())


if __name__ == "__main__":
    sys.exit(guest_main(sys.argv[1:] or list(ALLOCATORS)))
