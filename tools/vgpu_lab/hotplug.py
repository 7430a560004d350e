"""Memory hot-plug under a real guest: QEMU plugs two pc-dimms (shared memfd backends) while the guest draws,
then is asked to unplug both while the guest holds its frame.

The guest onlines the first DIMM as kernel memory (ZONE_NORMAL), where the virtio-gpu driver's buffers land —
drm_gem_shmem allocates GFP_HIGHUSER, never from ZONE_MOVABLE, because its pages stay pinned while the device
uses them — and the second as movable memory, where they never land. So one unplug asks for memory that backs
live resources and the other for memory that backs none: what QEMU sends us in each case is what
spec/memory-hotplug.md records. QMP (a JSON socket) drives QEMU as a management layer would; our back end runs
at debug level, so its log has every vhost-user request in order and each resource's backing range.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vgpu.procfs import fd_count, settled_fd_count, wait_until

from . import initramfs
from .provision import Provisioner
from .qemu import Backend, QemuConfig, qemu_command, socket_dir

BOOT_TIMEOUT = 180.0
DIMM_BYTES = 256 << 20
#: Where the q35 machine puts hot-plugged memory (the first DIMM; the next follows it), and the guest's memory
#: block size: the guest script names blocks 32-33 (DIMM 0, kernel) and 34-35 (DIMM 1, movable) by these.
HOTPLUG_BASE = 0x1_0000_0000
BLOCK_BYTES = 128 << 20
DIMMS = (("dimm0", "online_kernel"), ("dimm1", "online_movable"))
#: ACPI _OST status codes QEMU reports in ACPI_DEVICE_OST events (ACPI 6.5, table 6.xx "_OST Status Codes").
OST = {0: "success", 0x80: "ejection not supported", 0x81: "device in use", 0x82: "device busy",
       0x83: "dependency busy", 0x84: "ejection in progress"}
REGION_LINE = re.compile(r"memory region (added|removed): gpa (0x[0-9a-f]+) \+(0x[0-9a-f]+)")
BACKING_LINE = re.compile(r"resource (\d+) backing: \d+ entries, \d+ bytes, gpa \[(0x[0-9a-f]+), (0x[0-9a-f]+)\)")
REQUEST_LINE = re.compile(r"<- (\w+) flags")


class Qmp:
    """The smallest QMP client: one command at a time, events kept in arrival order."""

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        self.events: list[dict[str, Any]] = []
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise ConnectionError("QMP closed")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, **arguments: Any) -> dict[str, Any]:
        self.file.write(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        self.file.flush()
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
            else:
                return msg

    def poll_events(self) -> None:
        """Read events that arrived without a command (a cheap query flushes them in)."""
        self.execute("query-status")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def guest_script(hold_ms: int) -> str:
    """/init's command: wait for both DIMMs, online them (kernel, movable), draw and hold, draw again."""
    first = HOTPLUG_BASE // BLOCK_BYTES
    per = DIMM_BYTES // BLOCK_BYTES
    online = []
    for i, (_, how) in enumerate(DIMMS):
        for b in range(first + i * per, first + (i + 1) * per):
            online.append(f"echo {how} > /sys/devices/system/memory/memory{b}/state || echo VGPU-HP online-failed {b}")
    last = first + len(DIMMS) * per - 1
    up = "$(cut -d' ' -f1 /proc/uptime)"
    return "\n".join([
        f'echo "VGPU-HP ready {up}"',
        f"t=0; while [ ! -e /sys/devices/system/memory/memory{last} ] && [ $t -lt 900 ]; do usleep 100000; "
        "t=$((t+1)); done",
        *online,
        f"for b in $(seq {first} {last}); do m=/sys/devices/system/memory/memory$b; "
        'echo "VGPU-HP block $b $(cat $m/state) $(cat $m/valid_zones)"; done',
        f'echo "VGPU-HP plugged {up}"',
        f"/bin/kms_pattern {hold_ms} &",
        "k=$!",
        "sleep 2",
        f'echo "VGPU-HP holding {up}"',
        "wait $k",
        f'echo "VGPU-HP released rc=$? {up}"',
        "sleep 3",
        f"for b in $(seq {first} {last}); do m=/sys/devices/system/memory/memory$b; "
        '[ -e $m ] && echo "VGPU-HP after $b $(cat $m/state)" || echo "VGPU-HP after $b gone"; done',
        "dmesg | grep -E 'Offline failed|offlin' | sed 's/^/VGPU-HP dmesg /'",
        "/bin/kms_pattern 300",
        f'echo "VGPU-HP redraw rc=$? {up}"',
        "",
    ])


@dataclass
class HotplugRun:
    serial: str
    backend_output: str
    events: list[dict[str, Any]]
    idle_fds: int
    fds_with_dimms: int
    fds_after_unplug: int
    released: bool  # back at idle fds after QEMU exited
    dimm_addrs: dict[str, int] = field(default_factory=dict)
    remaining: list[str] = field(default_factory=list)  # DIMMs QEMU still had after the unplug requests
    error: str = ""
    returncode: int | None = None

    def lines(self, prefix: str = "VGPU-HP") -> list[str]:
        return [line.strip() for line in self.serial.splitlines() if line.strip().startswith(prefix)]

    @property
    def requests(self) -> list[str]:
        """Every vhost-user request our back end received, in order."""
        return REQUEST_LINE.findall(self.backend_output)

    @property
    def regions(self) -> list[tuple[str, int, int]]:
        return [(m[0], int(m[1], 16), int(m[2], 16)) for m in REGION_LINE.findall(self.backend_output)]

    @property
    def backings(self) -> dict[int, tuple[int, int]]:
        """Each resource's backing span, as the back end logged it (the last one per id)."""
        return {int(m[0]): (int(m[1], 16), int(m[2], 16)) for m in BACKING_LINE.findall(self.backend_output)}

    def ost(self, dimm: str) -> list[int]:
        return [e["data"]["info"]["status"] for e in self.events
                if e["event"] == "ACPI_DEVICE_OST" and e["data"]["info"].get("device") == dimm]

    def deleted(self, dimm: str) -> bool:
        return any(e["event"] == "DEVICE_DELETED" and e["data"].get("device") == dimm for e in self.events)

    def describe(self) -> str:
        return (f"error: {self.error}\nevents: {json.dumps(self.events)}\n--- serial (tail)\n"
                + "\n".join(self.serial.splitlines()[-80:]) + "\n--- back end (filtered)\n"
                + "\n".join(line for line in self.backend_output.splitlines() if "kick on" not in line)[-12000:])


def _wait_serial(serial: Path, marker: str, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    def seen() -> bool:
        return serial.exists() and marker in serial.read_text(errors="replace")

    return wait_until(lambda: seen() or proc.poll() is not None, timeout, 0.05) and seen()


def run_hotplug(p: Provisioner, work: Path, *, qemu11: bool = True, hold_ms: int = 9000,
                backend_args: tuple[str, ...] = ()) -> HotplugRun:
    """Boot, plug both DIMMs, ask for both back while the guest holds its frame, let it redraw, power off."""
    kernel, programs = p.guest_kernel(), p.guest_programs()
    work.mkdir(parents=True, exist_ok=True)
    script = guest_script(hold_ms)
    initrd = initramfs.build_initramfs(
        work / "hotplug-initrd.gz", busybox=p.busybox(), command="/bin/sh /hotplug.sh",
        modules_dir=kernel.modules_dir, modules=initramfs.VIRTIO_GPU_MODULES,
        files={"/bin/kms_pattern": programs["kms_pattern"], "/hotplug.sh": script.encode()})
    with socket_dir() as d:
        sock, qmp_path, serial = d / "vgpu.sock", d / "qmp.sock", work / "serial.log"
        append = f"{QemuConfig().append} memhp_default_state=offline"
        extra = ("-qmp", f"unix:{qmp_path},server=on,wait=off")
        if qemu11:
            config = dataclasses.replace(p.qemu11().config([d, kernel.root, work], extra_args=extra), append=append)
            backend_args = ("--context-types=cross-domain", *backend_args)
        else:
            config = QemuConfig(qemu=p.qemu().system, append=append, extra_args=extra)
        cmd = qemu_command(kernel=kernel.vmlinuz, initrd=initrd, socket_path=sock, config=config)
        # Room for hot-plugged memory: slots and a maximum above the boot size.
        cmd[cmd.index("-m") + 1] = f"{config.memory_mib}M,slots=4,maxmem=2G"
        argv = [sys.executable, "-m", "vgpu", "--socket-path={sock}", "--log-level=debug", *backend_args]
        with Backend(argv, sock) as backend:
            assert backend.pid is not None
            pid = backend.pid
            idle = settled_fd_count(pid)
            run = HotplugRun("", "", [], idle, 0, 0, False)
            with serial.open("wb") as out:
                qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            qmp: Qmp | None = None
            try:
                qmp = _drive(run, qemu, qmp_path, serial, pid, hold_ms)
            except (OSError, ValueError, KeyError) as e:
                run.error = f"{type(e).__name__}: {e}"
            finally:
                try:
                    qemu.wait(BOOT_TIMEOUT)
                except subprocess.TimeoutExpired:
                    run.error = run.error or "QEMU did not power off"
                    qemu.kill()
                    qemu.wait()
                run.returncode = qemu.returncode
                if qmp is not None:
                    qmp.close()
            run.released = wait_until(lambda: fd_count(pid) == idle, 15, 0.05)
            run.backend_output = backend.output
        run.serial = serial.read_text(errors="replace")
    return run


def _drive(run: HotplugRun, qemu: subprocess.Popen[bytes], qmp_path: Path, serial: Path, pid: int,
           hold_ms: int) -> Qmp:
    if not wait_until(lambda: qmp_path.exists() or qemu.poll() is not None, 60, 0.05):
        raise OSError("QEMU never opened its QMP socket")
    qmp = Qmp(qmp_path)

    def check(reply: dict[str, Any], what: str) -> None:
        if "error" in reply:
            raise ValueError(f"{what}: {reply['error']}")

    def step(marker: str, timeout: float = BOOT_TIMEOUT) -> None:
        if not _wait_serial(serial, marker, qemu, timeout):
            raise ValueError(f"the guest never printed {marker!r}")

    step("VGPU-HP ready")
    for dimm, _ in DIMMS:
        check(qmp.execute("object-add", **{"qom-type": "memory-backend-memfd", "id": f"{dimm}-mem",
                                          "size": DIMM_BYTES, "share": True}), f"object-add {dimm}")
        check(qmp.execute("device_add", driver="pc-dimm", id=dimm, memdev=f"{dimm}-mem"), f"device_add {dimm}")
    devices = qmp.execute("query-memory-devices")["return"]
    run.dimm_addrs = {dev["data"]["id"]: dev["data"]["addr"] for dev in devices}
    step("VGPU-HP holding")
    run.fds_with_dimms = fd_count(pid)
    for dimm, _ in DIMMS:
        check(qmp.execute("device_del", id=dimm), f"device_del {dimm}")
    # The guest answers each eject request (ACPI _OST) once its hot-plug worker has tried to offline the DIMM.
    def answered() -> bool:
        qmp.poll_events()
        run.events = qmp.events
        return all(run.deleted(d) or any(s in (0x80, 0x81, 0x82, 0x83) for s in run.ost(d)) for d, _ in DIMMS)

    wait_until(answered, hold_ms / 1000 + 60, 0.5)
    step("VGPU-HP released")
    run.fds_after_unplug = settled_fd_count(pid)
    run.remaining = [dev["data"]["id"] for dev in qmp.execute("query-memory-devices")["return"]]
    run.events = qmp.events
    step("VGPU-HP redraw")
    run.events = qmp.events
    return qmp
