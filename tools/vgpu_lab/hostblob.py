"""One boot that maps a host-visible blob end to end: the main job of vgpu, shown and checked.

QEMU 11.1 (its generic vhost-user device sizes the host-visible BAR from our GET_SHMEM_CONFIG) boots the 6.12
guest against our back end with a cross-domain context.  The guest program `blob_map` gets image requirements,
creates a HOST3D blob, maps it, and writes a pattern; meanwhile this module, on the host, finds that pattern in
the back end's own buffer (through /proc/PID/fd) and writes one back for the guest to find.  What the guest
kernel did with our map_info is read from its PAT list; why we chose that map_info, from our log.  While the guest
holds the mapping (waiting for the host's pattern), the host also asks the back end's status socket what it
holds (`vgpu-status --json`), as an operator would.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from vgpu.procfs import fd_count, settled_fd_count, wait_until

from . import initramfs
from .provision import Provisioner
from .qemu import Backend, GuestRun, run_guest, socket_dir

GUEST_MAGIC = 0x56475055
HOST_MAGIC = 0x484F5354
#: What the x86 guest kernel's PAT list calls the memory type each map_info asks for.
PAT_TYPE = {1: "write-back", 2: "uncached-minus", 3: "write-combining"}
MAP_LINE = re.compile(r"map blob (\d+) at (0x[0-9a-f]+) \+(0x[0-9a-f]+): map_info (\w+) \((.*)\)")


def guest_pattern(words: int) -> npt.NDArray[np.uint32]:
    """What blob_map writes into the first half of the buffer (uint32 arithmetic wraps as C's does)."""
    i = np.arange(words, dtype=np.uint32)
    return np.uint32(GUEST_MAGIC) ^ (i * np.uint32(2654435761))


def host_pattern(words: int) -> npt.NDArray[np.uint32]:
    """What blob_map waits for in the second half."""
    i = np.arange(words, dtype=np.uint32)
    return np.uint32(HOST_MAGIC) ^ (i * np.uint32(40503))


@dataclass
class HostSide:
    """What the host did while the guest ran."""

    saw_guest_pattern: bool = False
    buffer: str = ""  # what /proc/PID/fd/N of the back end's buffer points to
    buffer_fd: int = -1  # N
    error: str = ""
    # What `vgpu-status --json` said while the guest held the mapping (None: see status_error).
    status: dict[str, Any] | None = None
    status_error: str = ""


@dataclass
class HostBlobRun:
    guest: GuestRun
    backend_output: str
    wall: float
    idle_fds: int
    released: bool
    host: HostSide
    lines: list[str] = field(default_factory=list)

    @property
    def steps(self) -> dict[str, str]:
        """blob_map's result per step: the text after 'ok' (or 'fail ...')."""
        out: dict[str, str] = {}
        for line in self.lines:
            m = re.match(r"VGPU-GUEST (\S+) ((?:ok|fail)\b.*)", line)
            if m and m.group(1) not in out:
                out[m.group(1)] = m.group(2)
        return out

    @property
    def pat(self) -> list[tuple[int, int, str]]:
        return [(int(a, 16), int(b, 16), t) for a, b, t in
                re.findall(r"VGPU-GUEST pat (0x[0-9a-f]+)-(0x[0-9a-f]+) (\S+)", "\n".join(self.lines))]

    @property
    def map_log(self) -> re.Match[str] | None:
        return MAP_LINE.search(self.backend_output)

    @property
    def status_mapping(self) -> dict[str, Any] | None:
        """The mapping of the blob the log says was mapped, as the status query reported it."""
        m, doc = self.map_log, self.host.status
        if m is None or doc is None or not doc.get("device"):
            return None
        return next((x for x in doc["device"]["mappings"] if x["resource_id"] == int(m[1])), None)

    @property
    def window(self) -> tuple[int, int] | None:
        m = re.search(r"Host memory window: (0x[0-9a-f]+) \+(0x[0-9a-f]+)", self.guest.dmesg)
        return (int(m.group(1), 16), int(m.group(2), 16)) if m else None

    def describe(self) -> str:
        return self.guest.describe() + f"\n--- back end\n{self.backend_output}"


def _find_buffer(pid: int, first_words: bytes) -> str | None:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            target = os.readlink(path)
            if not (target.startswith("/memfd:") or target.startswith("/dmabuf:")):
                continue
            with open(path, "rb") as f:
                if f.read(len(first_words)) == first_words:
                    return path
        except OSError:
            continue
    return None


def _buffers_seen(pid: int) -> str:
    seen = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            target = os.readlink(path)
            if target.startswith(("/memfd:", "/dmabuf:")):
                with open(path, "rb") as f:
                    seen.append(f"{fd}->{target} starts {f.read(16).hex()}")
        except OSError as e:
            seen.append(f"{fd}: {e}")
    return "; ".join(seen) or "none"


def status_command() -> list[str]:
    """`vgpu-status` as installed next to this interpreter (tools/venv.sh installs it), else the same entry point
    through -m, so a checkout whose venv predates the script still runs."""
    script = Path(sys.executable).with_name("vgpu-status")
    return [str(script)] if script.exists() else [sys.executable, "-m", "vgpu.status"]


def _ask_status(run: HostSide, status_socket: Path) -> None:
    try:
        out = subprocess.run([*status_command(), "--json", str(status_socket)], capture_output=True, text=True,
                             timeout=60)
        if out.returncode:
            run.status_error = f"vgpu-status exited {out.returncode}: {out.stderr.strip()}"
        else:
            run.status = json.loads(out.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError) as e:
        run.status_error = f"vgpu-status: {e}"


def _play_host(run: HostSide, pid: int, serial: Path, deadline: float, status_socket: Path) -> None:
    """Wait for the guest's 'write ok', check its pattern in our buffer, ask the back end's status while the guest
    waits with the blob mapped, then answer with the host pattern."""
    try:
        size = 0
        while time.monotonic() < deadline:
            text = serial.read_text(errors="replace") if serial.exists() else ""
            m = re.search(r"VGPU-GUEST mmap ok size=(\d+)", text)
            if m:
                size = int(m.group(1))
            if "VGPU-GUEST write ok" in text or "VGPU-LAB-END" in text:
                break
            time.sleep(0.02)
        if not size:
            run.error = "the guest never mapped the blob"
            return
        words = size // 4
        half = words // 2
        want = guest_pattern(half).tobytes()
        path = None
        while path is None and time.monotonic() < deadline:
            path = _find_buffer(pid, want[:64])
            if path is None:
                time.sleep(0.05)
        if path is None:
            run.error = "no buffer of the back end holds the guest's pattern: " + _buffers_seen(pid)
            return
        run.buffer = os.readlink(path)
        run.buffer_fd = int(Path(path).name)
        fd = os.open(path, os.O_RDWR)
        try:
            run.saw_guest_pattern = os.pread(fd, len(want), 0) == want
            # The guest keeps the blob mapped until our pattern arrives: the status shows the live mapping.
            _ask_status(run, status_socket)
            os.pwrite(fd, host_pattern(words - half).tobytes(), half * 4)
        finally:
            os.close(fd)
    except OSError as e:
        run.error = str(e)


def run_host_blob(provisioner: Provisioner, work: Path, *, backend_args: tuple[str, ...] = (),
                  width: int = 256, height: int = 256, timeout: float = 180.0) -> HostBlobRun:
    """Boot once; return what the guest, the host and the back end each saw."""
    q11 = provisioner.qemu11()
    kernel = provisioner.guest_kernel()
    programs = provisioner.guest_programs()
    initrd = initramfs.build_initramfs(
        work / "initrd.gz", busybox=provisioner.busybox(), command=f"/bin/blob_map {width} {height} 30",
        modules_dir=kernel.modules_dir, modules=initramfs.VIRTIO_GPU_MODULES,
        files={"/bin/blob_map": programs["blob_map"]})
    serial = work / "serial.log"
    with socket_dir() as d:
        sock = d / "vgpu.sock"
        status_socket = d / "status.sock"
        backend = [sys.executable, "-m", "vgpu", "--socket-path={sock}", f"--status-socket={status_socket}",
                   "--context-types=cross-domain", "--log-level=info", *backend_args]
        config = q11.config([d, kernel.root, work])
        with Backend(backend, sock) as proc:
            assert proc.pid is not None
            pid = proc.pid
            idle = settled_fd_count(pid)
            started = time.monotonic()
            host = HostSide()
            player = threading.Thread(target=_play_host, daemon=True,
                                      args=(host, pid, serial, started + timeout, status_socket))
            player.start()
            guest = run_guest(kernel=kernel.vmlinuz, initrd=initrd, socket_path=sock, config=config,
                              timeout=timeout, serial_log=serial)
            player.join(5)
            wall = time.monotonic() - started
            released = wait_until(lambda: fd_count(pid) == idle, 10, 0.02)
        return HostBlobRun(guest, proc.output, wall, idle, released, host, guest.guest_lines())
