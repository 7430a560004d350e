"""One arm64 boot, several of our back ends: each serves one GPU on the guest's PCI bus, each configured to answer
a different map_info, and the guest maps a host blob on every one of them.

Why several devices in one boot: a TCG arm64 boot costs seconds, and one back end resolves one attribute per
allocator; QEMU's generic vhost-user device can be given any number of times (each with its own chardev and its
own 1 GiB BAR in ``virt``'s 64-bit PCI window), so one boot checks every map_info.  Device ``i`` sits in PCI
slot ``i + 1``, and the guest names the slot of each card before it runs ``blob_map`` on it, so each card's lines
are paired with their back end by address, not by probe order.

On each card ``blob_map`` (cross-built, see :mod:`vgpu_lab.guest`) gets image requirements, creates and maps a
HOST3D blob, asks ``vgpu_pte.ko`` for the page-table entry of the mapping (AttrIndx decoded through MAIR_EL1:
the memory type the guest kernel really used), writes a pattern that this module finds in *that* back end's
buffer, waits for the one written back, and tries a plain unaligned ``memcpy`` into the mapping in a child.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vgpu.procfs import fd_count, settled_fd_count, wait_until
from vgpu.status import StatusError, query
from vgpu_lab import initramfs
from vgpu_lab.hostblob import MAP_LINE, guest_pattern, host_pattern
from vgpu_lab.qemu import Backend, GuestRun, run_qemu, socket_dir

from .lab import Arm64Lab

#: What an arm64 Linux guest makes of each map_info (virtio_gpu_vram_mmap: default pgprot, pgprot_noncached,
#: pgprot_writecombine), as MAIR_EL1's attribute bytes name them.
MEMORY_TYPE = {1: "Normal-WB", 2: "Device-nGnRnE", 3: "Normal-NC"}
#: ``quiet loglevel=4`` keep the console (and so the boot) fast; /init dumps the whole kernel log at the end.
APPEND = "console=ttyAMA0 quiet loglevel=4 panic=-1"
MEMORY_MIB = 512
PTE_MODULE_IN_GUEST = "/lib/vgpu_pte.ko"
#: Where the PCI address of a guest card's device appears: ``VGPU-GUEST card 2 0000:00:03.0``.
_CARD_RE = re.compile(r"VGPU-GUEST card (\d+) (\S+)")
_PTE_RE = re.compile(r"va=0x([0-9a-f]+) level=(\d) entry=0x([0-9a-f]+) attrindx=(\d) mair=0x([0-9a-f]+) type=(\S+)")
_WINDOW_RE = re.compile(r"virtio-gpu-pci detected at (\S+)\s*\n.*?Host memory window: (0x[0-9a-f]+) \+(0x[0-9a-f]+)",
                        re.DOTALL)


@dataclass(frozen=True)
class BlobDevice:
    """One GPU of the boot: a name for messages and the options of the back end that serves it."""

    name: str
    backend_args: tuple[str, ...]


def map_info_devices(rules_dir: Path) -> list[tuple[BlobDevice, int, str]]:
    """The four GPUs that make our back end send every map_info to an arm64 guest, with the map_info each must
    send and the provenance its MAP_BLOB log line starts with: CACHED (the memfd allocator's knowledge), WC (an
    operator override), UNCACHED (an override, the guest declared x86_64: what a back end that does not know its
    guest sends) and UNCACHED again with ``--guest-arch=aarch64``, which sends WC.  Rules files go to ``rules_dir``.
    """
    rules = {}
    for attr in ("wc", "uncached"):
        rules[attr] = rules_dir / f"{attr}.toml"
        rules[attr].write_text(f'[allocator_overrides]\nmemfd = "{attr}"\n')
    memfd = "--allocator=memfd"
    uncached = (memfd, f"--cache-rules={rules['uncached']}")
    return [
        (BlobDevice("cached", (memfd,)), 1, "allocator: memfd"),
        (BlobDevice("wc", (memfd, f"--cache-rules={rules['wc']}")), 3, "operator rule"),
        (BlobDevice("uncached, guest declared x86_64", (*uncached, "--guest-arch=x86_64")), 2, "operator rule"),
        (BlobDevice("uncached, --guest-arch=aarch64", (*uncached, "--guest-arch=aarch64")), 3, "operator rule"),
    ]


@dataclass(frozen=True)
class Pte:
    """What ``vgpu_pte.ko`` read from the guest's page table for the first page of a mapping."""

    va: int
    level: int
    entry: int
    attrindx: int
    mair: int
    memory_type: str

    def __str__(self) -> str:
        return (f"{self.memory_type} (AttrIndx {self.attrindx}, MAIR_EL1 byte {self.mair:#04x}, level-{self.level} "
                f"entry {self.entry:#x} at {self.va:#x})")

    @property
    def output_address(self) -> int:
        """The physical address the entry maps, below 2**50 (bits 49:12 of a 4 KiB page descriptor; with LPA2,
        address bits 51:50 sit in entry bits 9:8, which are the shareability field without it: left out, since
        ``virt`` puts its 64-bit PCI window far below)."""
        return self.entry & 0x0003_FFFF_FFFF_F000


@dataclass
class DeviceRun:
    """One device's part of the boot: its back end's log and buffers, and its card's lines in the guest."""

    device: BlobDevice
    slot: str  # PCI address, e.g. 0000:00:01.0
    backend_output: str = ""
    idle_fds: int = 0
    released: bool = False
    saw_guest_pattern: bool = False
    host_error: str = ""
    lines: list[str] = field(default_factory=list)

    @property
    def steps(self) -> dict[str, str]:
        """blob_map's result per step on this card: the text after the step name ('ok ...' or 'fail ...')."""
        out: dict[str, str] = {}
        for line in self.lines:
            m = re.match(r"VGPU-GUEST (\S+) ((?:ok|fail)\b.*)", line)
            if m and m.group(1) not in out:
                out[m.group(1)] = m.group(2)
        return out

    @property
    def guest_map_info(self) -> int | None:
        """The map_info the guest was told in the image requirements."""
        m = re.search(r"map_info=(\d+)", self.steps.get("reqs", ""))
        return int(m.group(1)) if m else None

    @property
    def pte(self) -> Pte | None:
        m = _PTE_RE.search(self.steps.get("pte", ""))
        if m is None:
            return None
        return Pte(int(m[1], 16), int(m[2]), int(m[3], 16), int(m[4]), int(m[5], 16), m[6])

    @property
    def unaligned_signal(self) -> int | None:
        m = re.search(r"signal=(\d+)", self.steps.get("unaligned", ""))
        return int(m.group(1)) if m else None

    @property
    def map_log(self) -> re.Match[str] | None:
        """The back end's MAP_BLOB line: blob, offset, length, map_info name, provenance and detail."""
        return MAP_LINE.search(self.backend_output)


@dataclass
class Arm64BlobRun:
    guest: GuestRun
    devices: list[DeviceRun]
    wall: float

    def windows(self) -> dict[str, tuple[int, int]]:
        """PCI address -> (base, size) of each device's host-visible window, from the guest's kernel log."""
        return {m[1]: (int(m[2], 16), int(m[3], 16)) for m in _WINDOW_RE.finditer(self.guest.dmesg)}

    def describe(self) -> str:
        parts = [self.guest.describe()]
        for d in self.devices:
            parts.append(f"--- back end {d.device.name} ({d.slot}): host {d.host_error or 'ok'}\n{d.backend_output}")
        return "\n".join(parts)


def qemu_command(lab: Arm64Lab, binds: Sequence[Path], *, initrd: Path, sockets: Sequence[Path]) -> list[str]:
    """``qemu-system-aarch64 -M virt -cpu max`` (TCG) in the sid chroot, one generic vhost-user GPU per socket.

    Guest RAM is a shared memfd, as for the x86 guest: the back ends map it themselves.
    """
    cmd = [
        *lab.qemu.command_prefix(binds), str(lab.qemu.system_aarch64),
        "-M", "virt,memory-backend=mem", "-cpu", "max", "-accel", "tcg", "-smp", "1", "-m", f"{MEMORY_MIB}M",
        "-object", f"memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on",
        "-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio",
        "-kernel", str(lab.kernel.image), "-initrd", str(initrd), "-append", APPEND,
    ]
    for i, sock in enumerate(sockets):
        cmd += ["-chardev", f"socket,id=vgpu{i},path={sock}",
                "-device", f"vhost-user-test-device-pci,chardev=vgpu{i},virtio-id=16,num_vqs=2,config_size=16,"
                           f"addr={i + 1:#x}"]
    return cmd


def guest_command(cards: int, width: int, height: int, host_wait_s: int) -> str:
    """Load the page-table module, then run blob_map on every card, naming each card's PCI address first."""
    loop = (f"for c in {' '.join(map(str, range(cards)))}; do "
            'echo "VGPU-GUEST card $c $(basename $(readlink /sys/class/drm/card$c/device))"; '
            f"/bin/blob_map {width} {height} {host_wait_s} /dev/dri/card$c || bad=1; done")
    return f"bad=0; insmod {PTE_MODULE_IN_GUEST} && {loop}; [ $bad -eq 0 ]"


def _mapped_buffer(backend: Backend, status_socket: Path, deadline: float) -> str | None:
    """``/proc/PID/fd/N`` of the buffer this back end mapped, as its status query names it.

    Not "any buffer holding the pattern": QEMU announces every mapped blob to *every* vhost-user back end as a new
    memory region (ADD_MEM_REG with the blob's fd), so each back end also holds the others' blobs.
    """
    while time.monotonic() < deadline:
        if MAP_LINE.search(backend.output):
            try:
                device = query(str(status_socket))["device"]
            except StatusError:
                device = None
            if device and device["mappings"]:
                return f"/proc/{backend.pid}/fd/{device['mappings'][0]['buffer']['fd']}"
        time.sleep(0.05)
    return None


def _play_host(run: DeviceRun, backend: Backend, status_socket: Path, size: int, deadline: float) -> None:
    """Wait for the guest's pattern in this back end's mapped buffer, then write the host's into its second half."""
    half = size // 8
    want = guest_pattern(half).tobytes()
    try:
        path = _mapped_buffer(backend, status_socket, deadline)
        if path is None:
            run.host_error = "the back end never mapped a blob"
            return
        fd = os.open(path, os.O_RDWR)
        try:
            while time.monotonic() < deadline and os.pread(fd, len(want), 0) != want:
                time.sleep(0.05)
            run.saw_guest_pattern = os.pread(fd, len(want), 0) == want
            if not run.saw_guest_pattern:
                run.host_error = f"the guest's pattern never appeared in {os.readlink(path)}"
                return
            os.pwrite(fd, host_pattern(size // 4 - half).tobytes(), half * 4)
        finally:
            os.close(fd)
    except OSError as e:
        run.host_error = str(e)


def run_blob_devices(lab: Arm64Lab, work: Path, devices: Sequence[BlobDevice], *, width: int = 64,
                     height: int = 64, timeout: float = 240.0) -> Arm64BlobRun:
    """Boot once with one back end per device; return what the guest, the back ends and the host saw."""
    host_wait_s = 30
    initrd = initramfs.build_initramfs(
        work / "initrd.gz", busybox=lab.kernel.busybox, applets=lab.applets,
        command=guest_command(len(devices), width, height, host_wait_s),
        modules_dir=lab.kernel.modules_dir, modules=initramfs.VIRTIO_GPU_MODULES,
        files={"/bin/blob_map": lab.programs["blob_map"], PTE_MODULE_IN_GUEST: lab.pte_module},
        wait_for=f"/dev/dri/card{len(devices) - 1}")
    runs = [DeviceRun(d, f"0000:00:{i + 1:02x}.0") for i, d in enumerate(devices)]
    with socket_dir() as sockets:
        paths = [sockets / f"vgpu{i}.sock" for i in range(len(devices))]
        status = [sockets / f"status{i}.sock" for i in range(len(devices))]
        backends = [Backend([sys.executable, "-m", "vgpu", "--socket-path={sock}", f"--status-socket={st}",
                             "--context-types=cross-domain", "--log-level=info", *d.backend_args], p)
                    for d, p, st in zip(devices, paths, status, strict=True)]
        try:
            for b, r in zip(backends, runs, strict=True):
                b.start()
                assert b.pid is not None
                r.idle_fds = settled_fd_count(b.pid)
            started = time.monotonic()
            players = []
            for b, r, st in zip(backends, runs, status, strict=True):
                t = threading.Thread(target=_play_host, args=(r, b, st, width * height * 4, started + timeout),
                                     daemon=True)
                t.start()
                players.append(t)
            cmd = qemu_command(lab, [sockets, lab.kernel.root, work], initrd=initrd, sockets=paths)
            guest = run_qemu(cmd, timeout=timeout, serial_log=work / "serial.log")
            for t in players:
                t.join(5)
            wall = time.monotonic() - started
            for b, r in zip(backends, runs, strict=True):
                pid, idle = b.pid, r.idle_fds
                assert pid is not None
                r.released = wait_until(lambda: fd_count(pid) == idle, 10, 0.02)  # noqa: B023 (called right here)
        finally:
            for b in backends:
                b.stop()
    for b, r in zip(backends, runs, strict=True):
        r.backend_output = b.output
    _split_lines(guest.guest_lines(), runs)
    return Arm64BlobRun(guest, runs, wall)


def _split_lines(lines: Sequence[str], runs: Sequence[DeviceRun]) -> None:
    """Give each device the guest lines printed between its card's marker and the next."""
    by_slot = {r.slot: r for r in runs}
    current: DeviceRun | None = None
    for line in lines:
        m = _CARD_RE.match(line)
        if m:
            current = by_slot.get(m.group(2))
            continue
        if current is not None:
            current.lines.append(line)
