"""Programs nobody here wrote, run inside a lab guest on a GPU back end, and what the VMM's console then shows.

The guest is the usual busybox initramfs under QEMU 10's ``vhost-user-gpu-pci``, with the host's root shared over
virtio-9p (:func:`vgpu_lab.dmabuf_guest.host_root_args`): a script runs in a chroot of it, so the clients are
Debian's own dynamically linked binaries, installed on the host by :func:`provision_clients` — libdrm's
``modetest`` (package ``libdrm-tests``) first.  The same script runs against any back end, ours or QEMU's C
``vhost-user-gpu``, which is how their answers are compared.

When the script prints ``VGPU-GUEST dump NAME`` the host asks QEMU, over QMP, for a ``screendump`` of the console:
what QEMU received from the back end over the display socket, the same for every back end.  The script holds the
picture still for :data:`HOLD_SECONDS` after the line so the dump sees it.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from vgpu_lab import initramfs, sid
from vgpu_lab.dmabuf_guest import GUEST_HOST_ROOT, GUEST_SCRATCH, STOCK_9P_MODULES, chroot_mounts, host_root_args
from vgpu_lab.provision import Lab, Provisioner
from vgpu_lab.qemu import GuestRun, QemuConfig, run_guest

MODETEST = Path("/usr/bin/modetest")
CLIENT_PACKAGES = ("libdrm-tests",)
#: Seconds the guest keeps a picture on screen after announcing it: a QMP round trip under TCG on a loaded host.
HOLD_SECONDS = 4
DUMP = re.compile(r"VGPU-GUEST dump (\S+)")
#: Where the guest's script finds a writable host directory (``run_clients(outbox=...)``), inside its scratch.
OUTBOX = f"{GUEST_SCRATCH}/outbox"
BOOT_TIMEOUT = 240.0


def provision_clients(p: Provisioner) -> None:
    """Debian's client programs on the host, which the guest runs from the shared root."""
    with p.locked():
        if not MODETEST.is_file():
            p.apt_install(CLIENT_PACKAGES, what="guest clients (modetest)")


# --------------------------------------------------------------------------------------------------------------
# QMP and the console's picture


class QmpError(RuntimeError):
    """QEMU's monitor refused a command or went away."""


class Qmp:
    """A minimal QMP client: one command at a time, events skipped."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"no QMP socket at {path}") from None
                time.sleep(0.05)
        self._buf = b""
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QmpError("QEMU closed its monitor")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: object) -> object:
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                raise QmpError(f"{command}: {reply['error']}")
            return reply.get("return")

    def close(self) -> None:
        self.sock.close()


def read_ppm(path: Path) -> npt.NDArray[np.uint8]:
    """(h, w, 3) R, G, B of a binary PPM (P6, maxval 255), the format QEMU's ``screendump`` writes by default."""
    data = path.read_bytes()
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:
        while data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while not data[end:end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    magic, width, height, maxval = fields[0], int(fields[1]), int(fields[2]), int(fields[3])
    if magic != b"P6" or maxval != 255:
        raise ValueError(f"{path}: not an 8-bit binary PPM ({magic!r}, maxval {maxval})")
    pixels = np.frombuffer(data, dtype=np.uint8, count=width * height * 3, offset=pos + 1)
    return pixels.reshape(height, width, 3).copy()


# --------------------------------------------------------------------------------------------------------------
# the run


@dataclass
class ClientRun:
    """The guest's run and the console pictures taken when it asked for them, by name."""

    guest: GuestRun
    dumps: dict[str, npt.NDArray[np.uint8]] = field(default_factory=dict)
    dump_errors: list[str] = field(default_factory=list)

    def lines(self, prefix: str) -> list[str]:
        return [line for line in self.guest.guest_lines() if line.startswith(prefix)]

    def describe(self) -> str:
        errors = "".join(f"\n--- dump error: {e}" for e in self.dump_errors)
        return self.guest.describe() + errors


def guest_command(script: str, outbox: bool = False) -> str:
    """The /init command: mount the host's root, then run ``script`` with sh in a chroot of it (with ``outbox``, a
    writable host directory shared as ``outbox`` is mounted at :data:`OUTBOX` first)."""
    share = [f"mkdir -p {GUEST_HOST_ROOT}{OUTBOX}",
             f"mount -t 9p -o trans=virtio,version=9p2000.L outbox {GUEST_HOST_ROOT}{OUTBOX}"] if outbox else []
    steps = [*chroot_mounts(), *share, shlex.join(["chroot", GUEST_HOST_ROOT, "/usr/bin/env", f"TMPDIR={GUEST_SCRATCH}",
                                            "/bin/sh", "-c", script])]
    return "/bin/sh -c " + shlex.quote(" && ".join(steps))


def _watch(serial: Path, qmp_path: Path, out: Path, dumps: dict[str, npt.NDArray[np.uint8]], errors: list[str],
           done: threading.Event) -> None:
    """Take a screendump for each ``VGPU-GUEST dump NAME`` line, in the order the guest prints them."""
    qmp: Qmp | None = None
    seen = 0
    try:
        while not done.is_set():
            text = serial.read_text(errors="replace") if serial.exists() else ""
            names = DUMP.findall(text)
            for name in names[seen:]:
                if qmp is None:
                    qmp = Qmp(qmp_path)
                target = out / f"{name}.ppm"
                qmp.execute("screendump", filename=str(target))
                dumps[name] = read_ppm(target)
            seen = len(names)
            time.sleep(0.05)
    except (OSError, QmpError, ValueError) as e:
        errors.append(str(e))
    finally:
        if qmp is not None:
            qmp.close()


def run_clients(lab: Lab, socket_path: Path, script: str, workdir: Path, *, memory_mib: int = 512,
                timeout: float = BOOT_TIMEOUT, outbox: Path | None = None) -> ClientRun:
    """Boot QEMU 10 with ``vhost-user-gpu-pci`` on the back end listening at ``socket_path``, run ``script`` in
    the chroot of the host's root, and take the console pictures it asks for; files the script writes under
    :data:`OUTBOX` land in ``outbox``."""
    workdir.mkdir(parents=True, exist_ok=True)
    initrd = initramfs.build_initramfs(
        workdir / "initrd.gz", busybox=lab.busybox, command=guest_command(script, outbox is not None),
        modules_dir=lab.kernel.modules_dir, modules=(*initramfs.VIRTIO_GPU_MODULES, *STOCK_9P_MODULES),
    )
    qmp_path = workdir / "qmp.sock"
    serial = workdir / "serial.log"
    config = QemuConfig(qemu=lab.qemu.system, memory_mib=memory_mib,
                        extra_args=(*host_root_args(), "-qmp", f"unix:{qmp_path},server=on,wait=off",
                                    *_outbox_args(outbox)))
    done = threading.Event()
    dumps: dict[str, npt.NDArray[np.uint8]] = {}
    errors: list[str] = []
    watcher = threading.Thread(target=_watch, args=(serial, qmp_path, workdir, dumps, errors, done), daemon=True)
    watcher.start()
    try:
        guest = run_guest(kernel=lab.kernel.vmlinuz, initrd=initrd, socket_path=socket_path, config=config,
                          timeout=timeout, serial_log=serial)
    finally:
        done.set()
        watcher.join(10)
    return ClientRun(guest, dumps, errors)


def _outbox_args(outbox: Path | None) -> tuple[str, ...]:
    if outbox is None:
        return ()
    outbox.mkdir(parents=True, exist_ok=True)
    return ("-fsdev", f"local,id=outbox,path={outbox},security_model=none",
            "-device", "virtio-9p-pci,fsdev=outbox,mount_tag=outbox")


def hold(name: str) -> str:
    """Guest shell: announce picture ``name`` and keep the screen as it is while the host dumps it."""
    return f"echo VGPU-GUEST dump {name}; sleep {HOLD_SECONDS}"


# --------------------------------------------------------------------------------------------------------------
# modetest


#: (picture name, modetest's arguments): each sets a mode and fills it with one of its own patterns.
#: (virtio-gpu's primary plane takes XRGB8888 only: modetest's AR24 is refused by the guest driver itself.)
MODETEST_PICTURES = (
    ("smpte-1024x768", "-s Virtual-1:1024x768"),
    ("tiles-800x600", "-s Virtual-1:800x600 -F tiles"),
    ("plain-640x480", "-s Virtual-1:640x480 -F plain"),
)
#: Seconds of vsynced page flipping (``-v``); modetest prints the flip rate every five seconds.
FLIP_SECONDS = 11


def _held(args: str, seconds: int) -> str:
    """modetest with ``args``, kept running ``seconds`` (it exits when its stdin ends), output kept for the log."""
    return f"(sleep {seconds} | modetest -M virtio_gpu {args} > $TMPDIR/mt.log 2>&1; echo rc=$? >> $TMPDIR/mt.log)"


def modetest_script() -> str:
    """The guest's modetest session: list the connector, show each picture, flip pages, move the cursor."""
    steps = ["modetest -M virtio_gpu -c > $TMPDIR/conn.txt 2>&1; echo VGPU-GUEST mt-list rc=$?",
             "sed -n 's/^/VGPU-GUEST mt-conn /p' $TMPDIR/conn.txt | grep -E 'connected|#[0-9]+ ' | head -40"]
    for name, args in MODETEST_PICTURES:
        # Set the mode, let it settle, hold it while the host dumps the console, then let modetest finish.
        steps += [f"{_held(args, 4 + HOLD_SECONDS + 3)} & sleep 4; {hold(name)}; wait",
                  f"sed 's/^/VGPU-GUEST mt-log {name} /' $TMPDIR/mt.log"]
    steps += [f"{_held('-s Virtual-1:1024x768 -v', FLIP_SECONDS)}",
              "sed 's/^/VGPU-GUEST mt-log flip /' $TMPDIR/mt.log",
              f"{_held('-s Virtual-1:1024x768 -C', 6)}",
              "sed 's/^/VGPU-GUEST mt-log cursor /' $TMPDIR/mt.log"]
    return "; ".join(steps)


@dataclass(frozen=True)
class ModetestReport:
    """What modetest said in the guest, and the pictures QEMU's console showed."""

    listed: bool
    connectors: list[str]
    modes: list[str]
    exits: dict[str, int]  # step -> modetest's exit status
    flip_hz: list[float]
    pictures: dict[str, npt.NDArray[np.uint8]]


_FREQ = re.compile(r"freq:\s*([0-9.]+)\s*Hz")
_MODE = re.compile(r"#\d+\s+(\d+x\d+)\s")


def modetest_report(run: ClientRun) -> ModetestReport:
    lines = run.guest.guest_lines()
    conn = [line.removeprefix("VGPU-GUEST mt-conn ") for line in lines if line.startswith("VGPU-GUEST mt-conn ")]
    exits: dict[str, int] = {}
    flips: list[float] = []
    for line in lines:
        if not line.startswith("VGPU-GUEST mt-log "):
            continue
        step, _, text = line.removeprefix("VGPU-GUEST mt-log ").partition(" ")
        if text.startswith("rc="):
            exits[step] = int(text[3:])
        if step == "flip":
            flips += [float(m) for m in _FREQ.findall(text)]
    return ModetestReport(
        listed=any(line.startswith("VGPU-GUEST mt-list rc=0") for line in lines),
        connectors=[c.split()[3] for c in conn if "connected" in c.split()[:4] and len(c.split()) > 3],
        modes=[m.group(1) for c in conn if (m := _MODE.search(c))],
        exits=exits, flip_hz=flips, pictures=dict(run.dumps))


# --------------------------------------------------------------------------------------------------------------
# IGT


#: IGT's test programs come from sid's ``igt-gpu-tools-tests`` (2.5), installed in the lab's sid chroot: this
#: machine's mirror serves no source tarball of ``intel-gpu-tools`` (bookworm's .dsc, but a 404 for its
#: .orig.tar.xz and every other version's), and sid's binary package ships the tests since 2.x.
IGT_PACKAGES = ("igt-gpu-tools-tests",)
#: Weston with its DRM back end, from sid as well: bookworm's weston 10 reaches DRM only through logind or
#: weston-launch (neither exists in a busybox guest); sid's uses libseat, which seatd serves.
WESTON_PACKAGES = ("weston", "seatd")
IGT_DIR = "/usr/libexec/igt-gpu-tools"
#: The KMS tests that apply to a virtio-gpu device with no CRC source, no connectors but virtual ones, no
#: vendor ioctls: buffer objects and framebuffers, properties and blobs, mode setting, legacy and atomic commits,
#: page flips and vblank events, the cursor ioctls.
IGT_TESTS = ("core_getversion", "core_auth", "kms_addfb_basic", "kms_getfb", "kms_rmfb", "kms_prop_blob",
             "kms_properties", "kms_invalid_mode", "kms_setmode", "kms_atomic", "kms_flip_event_leak",
             "kms_cursor_legacy", "kms_vblank", "kms_flip")
#: Seconds one IGT program may take in the guest before it is stopped (its unfinished subtests then count as
#: not run): TCG is slow and some programs loop over every mode.
IGT_TIMEOUT = 120
_SUBTEST = re.compile(r"^(?:Subtest|Dynamic subtest) (\S+): (SUCCESS|SKIP|FAIL|CRASH|TIMEOUT)")


def provision_sid_clients(p: Provisioner) -> Path:
    """sid's IGT tests, weston and seatd inside the lab's sid chroot (the QEMU 11.1 one); the chroot's root, which
    the guest enters."""
    root = p.qemu11().root
    with p.locked():
        if not (root / IGT_DIR.lstrip("/") / "kms_addfb_basic").is_file() or not (root / "usr/bin/seatd").is_file():
            sid.install_packages(root, (*IGT_PACKAGES, *WESTON_PACKAGES), what="IGT and weston (apt-get in sid)")
    return root


def enter_sid(sid_root: Path, command: str) -> str:
    """Guest shell (in the host-root chroot): run ``command`` with sh inside the sid chroot, the guest's /dev (with
    the scratch tmpfs under it), /proc and /sys bound in and a private /run and /tmp."""
    r = shlex.quote(str(sid_root))
    return "; ".join([f"mount --rbind /dev {r}/dev", f"mount --bind /proc {r}/proc", f"mount --bind /sys {r}/sys",
                      f"mount -t tmpfs tmpfs {r}/run", f"mount -t tmpfs tmpfs {r}/tmp",
                      f"chroot {r} /usr/bin/env PATH=/usr/bin:/bin:/usr/sbin:/sbin /bin/sh -c {shlex.quote(command)}"])


def igt_script(sid_root: Path, tests: Sequence[str] = IGT_TESTS, timeout: int = IGT_TIMEOUT) -> str:
    """Guest shell: run each IGT program in the sid chroot, its lines tagged.  ``IGT_FORCE_DRIVER``: IGT has no
    driver bit for virtio-gpu, so it would open no device at all (every test skips) without being told the name."""
    steps = [f"IGT_FORCE_DRIVER=virtio_gpu timeout -s KILL {timeout} {IGT_DIR}/{test} 2>&1 | "
             f"sed 's/^/VGPU-GUEST igt {test} /'; echo VGPU-GUEST igt-end {test}" for test in tests]
    return enter_sid(sid_root, "; ".join(steps))


def igt_results(run: ClientRun) -> dict[str, dict[str, str]]:
    """Program -> subtest -> SUCCESS / SKIP / FAIL / CRASH / TIMEOUT, as IGT printed them."""
    out: dict[str, dict[str, str]] = {}
    for line in run.guest.guest_lines():
        if not line.startswith("VGPU-GUEST igt "):
            continue
        test, _, text = line.removeprefix("VGPU-GUEST igt ").partition(" ")
        m = _SUBTEST.match(text)
        if m:
            out.setdefault(test, {})[m.group(1)] = m.group(2)
    return out


# --------------------------------------------------------------------------------------------------------------
# weston


#: weston's own configuration: no input devices in this guest, and weston refuses to start without one otherwise.
WESTON_INI = "[core]\\nrequire-input=false\\n"


def weston_script(sid_root: Path, client: str = "weston-flower", settle: int = 6) -> str:
    """Guest shell: seatd, then weston (DRM back end, pixman renderer, kiosk shell, ``--debug`` for its
    screenshooter) on the guest's card, one client, and weston's own screenshot of what it put on the screen —
    copied to the outbox — before the console is dumped as ``weston``.  One command per line: a background
    ``&`` cannot be followed by ``;``."""
    inner = "\n".join([
        "mkdir -p -m 0700 /run/xdg", "export XDG_RUNTIME_DIR=/run/xdg WAYLAND_DISPLAY=wayland-0",
        "seatd -g root > /tmp/seatd.log 2>&1 &", "sleep 1", "export LIBSEAT_BACKEND=seatd",
        f"printf '{WESTON_INI}' > /tmp/weston.ini",
        "weston --config=/tmp/weston.ini --backend=drm --renderer=pixman --shell=kiosk --debug --idle-time=0 "
        "--socket=wayland-0 --log=/tmp/weston.log &",
        "i=0; while [ ! -e /run/xdg/wayland-0 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done",
        "echo VGPU-GUEST weston-socket $i",
        f"{client} > /tmp/client.log 2>&1 &", f"sleep {settle}",
        "cd /tmp && weston-screenshooter; echo VGPU-GUEST weston-shot rc=$?",
        f"cp /tmp/wayland-screenshot-*.png {OUTBOX}/weston-screenshot.png",
        hold("weston"),
        "sed 's/^/VGPU-GUEST weston-log /' /tmp/weston.log | grep -iE 'error|fatal|fail' | head -20",
    ])
    return enter_sid(sid_root, inner)
