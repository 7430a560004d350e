"""End to end: QEMU 10's display is resized the way a viewer resizes it, and the Linux guest on *our* back end sees the
new mode.

Route: QEMU's D-Bus display (``-display dbus`` on a private bus) and its console method
``org.qemu.Display1.Console.SetUIInfo`` — what a D-Bus display client calls when its window changes size. QEMU turns
it into ``dpy_set_ui_info`` on the virtio-gpu console: the new size goes into the layout QEMU answers
GET_DISPLAY_INFO with, EVENT_DISPLAY into QEMU's copy of the config space, and a config interrupt to the guest. The
guest's driver reads events_read (QEMU forwards the read to us as GET_CONFIG, which drops our cached layout), asks
GET_DISPLAY_INFO, and we ask QEMU over the display socket.

Why not VNC: QEMU 10's VNC server would honour SetDesktopSize (ui/vnc.c forwards it to ``dpy_set_ui_info`` whenever
the console has a ``ui_info`` hook, which virtio-gpu's has; no prior ExtendedDesktopSize announcement is checked),
but QEMU refuses to start ``-vnc`` with ``vhost-user-gpu-pci`` at all ("The console requires display DMABUF
support"): the device always declares that its back end may send dma-buf scanouts, and VNC cannot show those. The
D-Bus display can (and works with ``gl=off``, so no host GPU is needed).

Resizing also found a deadlock, fixed in the display client and covered by tests/test_gpu_display_layout.py: the
guest writes events_clear while fbcon redraws, QEMU's vCPU waits (holding its big lock) for our SET_CONFIG answer,
so QEMU's main loop stops reading the display socket on which we were blocked writing a frame.

What is checked is what each party shows: the connector's preferred mode read from sysfs inside the guest, before
(QEMU's initial size, not our default) and after; QEMU accepting the call; our log line with the layout we told the
guest, first the initial one and then the new one.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.conftest import BOOT_TIMEOUT, component
from vgpu_lab import initramfs, provision
from vgpu_lab.qemu import GUEST_LINE_PREFIX, VHOST_USER_GPU_PCI, Backend, QemuConfig, run_guest, socket_dir

#: The size QEMU starts the display at (not our back end's default, so the guest's first mode proves it came
#: from the front end) and the size the "viewer" asks for.
INITIAL = (1152, 864)
RESIZED = (1024, 768)
#: How long the guest waits for its connector's mode to change once it has reported the first one.
GUEST_WAIT_S = 90
CONSOLE = "/org/qemu/Display1/Console_0"
SET_UI_INFO = "org.qemu.Display1.Console.SetUIInfo"

# The guest's command. The connector's ``modes`` file lists the preferred mode first (drm_mode_sort);
# virtio-gpu marks the size from GET_DISPLAY_INFO preferred. After EVENT_DISPLAY the driver asks again and
# sends a hotplug event, and the fbdev client re-probes the connector, which refreshes this list.
GUEST_SCRIPT = f"""#!/bin/sh
conn=$(ls -d /sys/class/drm/card*-Virtual-1 | head -n 1)
mode() {{ head -n 1 "$conn/modes" 2>/dev/null; }}
i=0
while [ -z "$(mode)" ] && [ $i -lt 200 ]; do usleep 100000; i=$((i+1)); done
before=$(mode)
echo "{GUEST_LINE_PREFIX} modes-before $before"
i=0
while [ "$(mode)" = "$before" ] && [ $i -lt {GUEST_WAIT_S * 10} ]; do usleep 100000; i=$((i+1)); done
echo "{GUEST_LINE_PREFIX} modes-after $(mode) waited $((i*100)) ms"
echo "{GUEST_LINE_PREFIX} modes-all $(tr '\\n' ' ' < "$conn/modes")"
"""


@pytest.fixture(scope="module")
def dbus(provisioner: provision.Provisioner) -> tuple[Path, Path]:
    return component("dbus", provisioner.dbus)


def _wait_for_line(serial: Path, pattern: str, deadline: float) -> re.Match[str] | None:
    """Poll the serial log QEMU is writing until a line matches (None once the deadline passes)."""
    regex = re.compile(pattern, re.MULTILINE)
    while time.monotonic() < deadline:
        if serial.exists():
            m = regex.search(serial.read_text(errors="replace"))
            if m:
                return m
        time.sleep(0.1)
    return None


def test_guest_sees_a_resize_requested_through_qemus_dbus_display(
        lab: provision.Lab, dbus: tuple[Path, Path], tmp_path: Path) -> None:
    dbus_daemon, dbus_send = dbus
    script = tmp_path / "resize-guest"
    script.write_text(GUEST_SCRIPT)
    script.chmod(0o755)
    initrd = initramfs.build_initramfs(
        tmp_path / "initrd.gz", busybox=lab.busybox, command="/bin/resize-guest",
        modules_dir=lab.kernel.modules_dir, modules=initramfs.VIRTIO_GPU_MODULES,
        files={"/bin/resize-guest": script},
    )
    serial = tmp_path / "serial.log"
    backend = [sys.executable, "-m", "vgpu", "--socket-path={sock}", "--log-level=info"]
    # A bus of our own: nothing else on the machine sees QEMU's display, and QEMU's name cannot clash.
    bus_daemon = [str(dbus_daemon), "--session", "--nofork", "--nopidfile", "--address=unix:path={sock}"]
    call: subprocess.CompletedProcess[str] | None = None
    with socket_dir() as d:
        sock, bus = d / "vgpu.sock", d / "bus.sock"
        address = f"unix:path={bus}"
        config = QemuConfig(qemu=lab.qemu.system, device=f"{VHOST_USER_GPU_PCI},xres={INITIAL[0]},yres={INITIAL[1]}",
                            display=f"dbus,addr={address},gl=off")
        with Backend(bus_daemon, bus) as bus_proc, Backend(backend, sock) as proc, ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            boot = pool.submit(run_guest, kernel=lab.kernel.vmlinuz, initrd=initrd, socket_path=sock,
                               config=config, timeout=BOOT_TIMEOUT, serial_log=serial)
            if _wait_for_line(serial, rf"^{GUEST_LINE_PREFIX} modes-before \S+", started + BOOT_TIMEOUT):
                call = subprocess.run(
                    [str(dbus_send), f"--bus={address}", "--print-reply", "--reply-timeout=30000",
                     "--dest=org.qemu", CONSOLE, SET_UI_INFO, "uint16:0", "uint16:0", "int32:0", "int32:0",
                     f"uint32:{RESIZED[0]}", f"uint32:{RESIZED[1]}"],
                    capture_output=True, text=True, timeout=60, check=False)
            guest = boot.result()
        context = (guest.describe() + f"\n--- SetUIInfo\n{call}\n--- back end\n{proc.output}"
                   f"\n--- bus\n{bus_proc.output}")
    wall = time.monotonic() - started

    assert not guest.timed_out and guest.returncode == 0 and guest.guest_status == 0, context
    lines = "\n".join(guest.guest_lines())
    w0, h0 = INITIAL
    w1, h1 = RESIZED
    # Before: the guest's preferred mode is QEMU's initial size.
    assert re.search(rf"modes-before {w0}x{h0}$", lines, re.MULTILINE), context
    # QEMU took the request (an error reply, e.g. "SetUIInfo is not supported", makes dbus-send fail).
    assert call is not None and call.returncode == 0, context
    # After: the guest's preferred mode is the new size ...
    after = re.search(r"modes-after (\S+) waited (\d+) ms", lines)
    assert after and after.group(1) == f"{w1}x{h1}", context
    # ... because our back end answered GET_DISPLAY_INFO with it (first the initial layout, then the new one).
    told = re.findall(r"GET_DISPLAY_INFO: the guest is told scanout 0 (\d+x\d+)\+0\+0", proc.output)
    assert told[:1] == [f"{w0}x{h0}"] and told[-1:] == [f"{w1}x{h1}"], context
    print(f"guest saw {w1}x{h1} within {after.group(2)} ms of reporting {w0}x{h0} (SetUIInfo in between); "
          f"boot + resize + poweroff {wall:.2f} s wall")
