"""End to end: the whole device — our back end driven by our own front end — inside a real 6.12 guest.

Why inside a guest: only there do real dma-buf exporters exist (this host has no udmabuf and no DRM), and only
our patched kernel (:mod:`vgpu_lab.kernel_build`) answers ``DMA_BUF_IOCTL_INFO``. So the product's primary path
— the back end asking the exporter, and telling the guest the answer in RESP_OK_MAP_INFO — can be proven end to
end only by running ``python -m vgpu`` and a front end next to each other in such a guest.

How: QEMU 10 (TCG) boots the guest kernel with the host's root shared read-only over virtio-9p
(:func:`vgpu_lab.dmabuf_guest.host_root_args`); the guest chroots into it (its own /dev, /proc, /sys, debugfs and
a scratch tmpfs bound in: :func:`vgpu_lab.dmabuf_guest.chroot_mounts`) and runs *this file* with the host's venv
Python in ``--guest`` mode. For each allocator (udmabuf, then vgem) the guest side starts
``python -m vgpu --socket-path=/dev/shm/vgpu.sock --context-types=cross-domain --allocator=NAME --log-level=info``
and drives it with :class:`vgpu.vhost_user.frontend.Frontend` through the same cross-domain ``Client`` the host
tests use (:mod:`tests.test_gpu_host_blob`): CTX_CREATE, a guest query-ring blob attached to the context, INIT,
GET_IMAGE_REQUIREMENTS, a HOST3D blob, MAP_BLOB. It then checks what the front end really mapped (the dma-buf in
/proc/self/maps, the bytes reaching the back end's buffer, and — on the patched kernel, which has
PTDUMP_DEBUGFS — the memory type of the front end's own PTE) and prints one ``VGPU-GUEST device <json>`` line
per round, the back end's ``map blob`` log lines included. The host side parses and asserts.

The same boot on Debian's stock 6.12 kernel must give the same map_info through the allocator's knowledge, with
the kernel's ENOTTY in the detail. A third kind of boot shows the resolver's fallbacks on the exporter that has no
hook (virtio-gpu's PRIME export answers ENOSYS on the patched kernel): :mod:`vgpu_lab.dmabuf_probe` runs the
resolver on the real fd with an operator rule, with the legacy heuristic, and with neither.

In CI (``CI=true``) every component must be there (the patched kernel is built if the cache lacks it, about 6
minutes); elsewhere a component that cannot be provisioned skips the test, naming it.
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
from typing import TYPE_CHECKING, Any

import pytest

from vgpu_lab.dmabuf_guest import GUEST_SCRATCH

if TYPE_CHECKING:
    from tests.test_e2e_kernel_ioctl import Rig
    from vgpu_lab.dmabuf_guest import FallbackReport

REPO = Path(__file__).resolve().parent.parent
PREFIX = "VGPU-GUEST device "
#: The chroot's writable scratch: its /tmp is the host's own, read-only (see GUEST_SCRATCH for why).
SOCKET_DIR = Path(GUEST_SCRATCH)
BACKEND_NAME = "vgpu"  # start_backend makes SOCKET_DIR/vgpu.sock and logs to SOCKET_DIR/vgpu.log
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


# ================================================================================================================
# guest side: runs inside the chroot on the guest kernel


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
    from tests.conftest import start_backend, stop_backend
    from tests.gpu_helpers import PAGE, Gpu, resp_type
    from tests.test_gpu_host_blob import FEATURES, Client, h
    from vgpu.protocol import CtrlType, ResourceUnmapBlob
    from vgpu.protocol import structs as s

    sock = SOCKET_DIR / f"{BACKEND_NAME}.sock"
    with contextlib.suppress(FileNotFoundError):  # the previous round's socket: start_backend waits for a new one
        sock.unlink()
    cmd = [sys.executable, "-m", "vgpu", "--context-types=cross-domain", f"--allocator={allocator}",
           "--log-level=info"]
    record: dict[str, Any] = {"allocator": allocator, "command": [*cmd, f"--socket-path={sock}"]}
    started = time.monotonic()
    backend = start_backend(cmd, SOCKET_DIR, BACKEND_NAME)
    record["backend_start_s"] = round(time.monotonic() - started, 2)
    try:
        gpu = Gpu.connect(backend.socket_path, features=FEATURES)
        try:
            gpu.fe.reserve_shm()
            client = Client(gpu)
            client.start()  # CTX_CREATE (cross-domain), query-ring GUEST blob, CTX_ATTACH_RESOURCE, INIT
            reqs: Any = client.requirements(WIDTH, HEIGHT)  # GET_IMAGE_REQUIREMENTS
            record.update(reqs_size=reqs.size, reqs_map_info=reqs.map_info, blob_id=reqs.blob_id)
            record["create_blob"] = resp_type(client.blob(1, reqs))  # RESOURCE_CREATE_BLOB HOST3D
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
                unmap = gpu.cmd(ResourceUnmapBlob(h(CtrlType.CMD_RESOURCE_UNMAP_BLOB), 1))
                record["unmap_resp"] = resp_type(unmap)
        finally:
            gpu.close()
    finally:
        stop_backend(backend)
    log = backend.log()
    record["backend_exit"] = backend.proc.returncode
    record["map_log"] = [line for line in log.splitlines() if "map blob " in line]
    record["backend_errors"] = [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line]
    record["seconds"] = round(time.monotonic() - started, 2)
    _emit("round", **record)


def _scanout_round() -> None:
    """A guest blob on a scanout, with a display that takes dma-bufs: the back end exports the blob's guest pages
    as a udmabuf and sends DMABUF_SCANOUT2; a flush is a DMABUF_UPDATE the display answers."""
    from tests.conftest import start_backend, stop_backend
    from tests.gpu_helpers import Gpu, hdr, pattern, resp_type
    from tests.test_gpu_2d import display
    from vgpu.protocol import BlobMem, CtrlType, Format, Rect, ResourceCreateBlob, ResourceFlush, SetScanoutBlob
    from vgpu.vhost_user.wire import GpuRequest

    sock = SOCKET_DIR / f"{BACKEND_NAME}.sock"
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    started = time.monotonic()
    backend = start_backend([sys.executable, "-m", "vgpu", "--log-level=info"], SOCKET_DIR, BACKEND_NAME)
    record: dict[str, Any] = {"backend_start_s": round(time.monotonic() - started, 2)}
    w, h = 64, 64
    try:
        gpu = Gpu.connect(backend.socket_path, display=display())
        try:
            b = gpu.backing(w * h * 4)
            px = pattern(w, h)
            gpu.write_backing(b, px.tobytes())
            record["create"] = resp_type(gpu.cmd(ResourceCreateBlob(
                hdr(CtrlType.CMD_RESOURCE_CREATE_BLOB), 1, BlobMem.BLOB_MEM_GUEST, 2, 0, w * h * 4, b.entries)))
            record["set_scanout_blob"] = resp_type(gpu.cmd(SetScanoutBlob(
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
            record["flush"] = resp_type(gpu.cmd(ResourceFlush(hdr(CtrlType.CMD_RESOURCE_FLUSH), Rect(0, 0, w, h), 1)))
            record["dmabuf_updates"] = len(gpu.display.wait_for(GpuRequest.DMABUF_UPDATE))
            record["copied_updates"] = len(gpu.display.of(GpuRequest.UPDATE))
        finally:
            gpu.close()
    finally:
        stop_backend(backend)
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
# host side: pytest

GUEST_SCRIPT = """#!/bin/sh
set -e
{mounts}
mount -t debugfs debugfs {root}/sys/kernel/debug || echo "VGPU-GUEST device-note no debugfs"
echo "VGPU-GUEST device-chroot uptime=$(cut -d' ' -f1 /proc/uptime)"
exec chroot {root} /usr/bin/env PYTHONPATH={repo} PYTHONDONTWRITEBYTECODE=1 TMPDIR={scratch} {python} -B {script} \\
    --guest {allocators}
"""

#: ``map blob 1 at 0x200000 +0x40000: map_info WC (kernel: DMA_BUF_IOCTL_INFO: ...)`` (vgpu/gpu/blobs.py).
MAP_LOG = re.compile(r"map blob (\d+) at (0x[0-9a-f]+) \+(0x[0-9a-f]+): map_info (\w+) \((kernel|allocator|"
                     r"operator rule|legacy heuristic): (.*)\)$")
#: map_info the guest must see (virtio_gpu.h: CACHED 1, UNCACHED 2, WC 3) and the PTE type it stands for.
MAP_INFO = {"CACHED": 1, "UNCACHED": 2, "WC": 3}
PTE_OF_ATTR = {"CACHED": "WB", "WC": "WC"}


@pytest.fixture(scope="module")
def rig() -> Rig:
    """The lab parts (QEMU, busybox, the dmabuf_info program, patched and stock kernels), provisioned once."""
    from tests.test_e2e_kernel_ioctl import Rig

    return Rig()


def _records(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line[len(PREFIX):]) for line in lines if line.startswith(PREFIX)]


def _boot_device(rig: Rig, tmp_path: Path, *, patched: bool, rounds: tuple[str, ...] = ALLOCATORS,
                 script_file: Path | None = None) -> tuple[dict[str, dict[str, Any]], str, float]:
    """Boot one kernel with the given rounds; returns (allocator → round record, failure context, seconds).

    ``script_file`` is the module whose ``--guest`` mode runs the rounds (default: this one), so other e2e modules
    can run rounds of their own in the same guest set-up."""
    from vgpu_lab import dmabuf_guest, initramfs
    from vgpu_lab.qemu import QemuConfig, run_guest

    here = (script_file or Path(__file__)).resolve()
    hidden = dmabuf_guest.shadowed([REPO, here, Path(sys.executable)])
    assert not hidden, f"the guest's chroot cannot show {hidden} (its own /dev, /proc, /sys cover them)"
    script = tmp_path / "device-guest"
    script.write_text(GUEST_SCRIPT.format(
        mounts="\n".join(dmabuf_guest.chroot_mounts()), root=dmabuf_guest.GUEST_HOST_ROOT,
        scratch=dmabuf_guest.GUEST_SCRATCH, repo=REPO, python=sys.executable, script=here,
        allocators=" ".join(rounds),
    ))
    script.chmod(0o755)
    modules: tuple[str, ...] = ()
    if patched:
        kernel, modules_dir = rig.patched.bzimage, None
    else:
        kernel, modules_dir = rig.stock.vmlinuz, rig.stock.modules_dir
        modules = (*initramfs.EXTRA_MODULE_SETS["vgem"], *initramfs.EXTRA_MODULE_SETS["9p"])
    initrd = initramfs.build_initramfs(
        tmp_path / "initrd.gz", busybox=rig.busybox, command="/bin/device-guest", modules_dir=modules_dir,
        modules=modules, files={"/bin/device-guest": script},
        wait_for="/dev/dri/card0",  # vgem's node: no GPU device is attached, the back end under test is in here
    )
    config = QemuConfig(qemu=rig.qemu.system, device=None, extra_args=dmabuf_guest.host_root_args())
    run = run_guest(kernel=kernel, initrd=initrd, socket_path=None, config=config, timeout=BOOT_TIMEOUT,
                    serial_log=tmp_path / "serial.log")
    context = run.describe()
    records = _records(run.guest_lines())
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


def test_pte_decoding() -> None:
    """The guest's ground-truth reader: PWT alone is WC, no bits is WB, bit 7 counts as PAT only at pte level."""
    dump = "\n".join([
        "---[ User Space ]---",
        "0x00007f0000000000-0x00007f0000200000           2M     USR RW         PSE PAT         NX pmd",
        "0x00007f1000000000-0x00007f1000040000         256K     USR RW PWT                     NX pte",
        "0x00007f2000000000-0x00007f2000040000         256K     USR RW                         NX pte",
        "0x00007f3000000000-0x00007f3000001000           4K     USR RW     PCD     PAT         NX pte",
    ])
    assert pte_of(dump, 0x7F1000001000) == ("WC", "PWT")
    assert pte_of(dump, 0x7F2000000000) == ("WB", "none")
    assert pte_of(dump, 0x7F0000100000) == ("WB", "none")  # a pmd's bit 7 is PSE, not PAT
    assert pte_of(dump, 0x7F3000000000) == ("UC-", "PCD,PAT")
    assert pte_of(dump, 0x7F2000040000) is None


def test_map_log_pattern() -> None:
    """The back end's map line as vgpu/gpu/blobs.py writes it, with a provenance that has a space in it."""
    line = ("2026-11-22 04:31:00,211 vgpu.gpu.blobs INFO map blob 12 at 0x200000 +0x40000: map_info WC "
            "(operator rule: rule exporters.drm = wc in /etc/vgpu/cache.toml; kernel: DMA_BUF_IOCTL_INFO: ENOTTY)")
    m = MAP_LOG.search(line)
    assert m is not None
    assert m.groups() == ("12", "0x200000", "0x40000", "WC", "operator rule",
                          "rule exporters.drm = wc in /etc/vgpu/cache.toml; kernel: DMA_BUF_IOCTL_INFO: ENOTTY")
    assert MAP_LOG.search(line.replace("operator rule", "a guess")) is None


def _check_round(r: dict[str, Any], context: str, *, attr: str, provenance: str, detail: str) -> re.Match[str]:
    """The flow every round must complete, and the map_info / provenance it must end in."""
    from vgpu.protocol import CtrlType

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


@pytest.mark.e2e
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


@pytest.mark.e2e
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
    """The dmabuf_info program + our probe on the same fds (the boot of tests/test_e2e_kernel_ioctl.py)."""
    from vgpu_lab import dmabuf_guest

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


@pytest.mark.e2e
def test_a_guest_blob_is_shown_as_a_udmabuf(rig: Rig, tmp_path: Path) -> None:
    """Where the kernel has udmabuf, a guest blob on a scanout reaches the display as a dma-buf of its own guest
    pages (DMABUF_SCANOUT2), holding exactly what the guest drew; a flush is a DMABUF_UPDATE, no pixels copied."""
    from vgpu.protocol import CtrlType

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


@pytest.mark.e2e
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


if __name__ == "__main__":
    if sys.argv[1:2] == ["--guest"]:
        sys.path.insert(0, str(REPO))
        sys.exit(guest_main(sys.argv[2:] or list(ALLOCATORS)))
    sys.exit(f"usage: {sys.argv[0]} --guest [ALLOCATOR...] (inside the lab guest; pytest runs the host side)")
