"""The faults a real VMM can be made to suffer at the right moment: QEMU 11.1 (sid chroot) with a guest holding a
mapped host blob, killed with SIGKILL; then a fresh QEMU, served by the same back-end process, maps a blob again.

The guest program is `blob_map` (see tests/e2e/test_host_blob.py): it maps a HOST3D blob, writes its pattern and
then waits for the host's answer, which never comes — so the blob is mapped in the guest and in QEMU's BAR when
QEMU dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

from tests.fault_scenarios import Fault, Subject, held
from vgpu.procfs import wait_until
from vgpu_lab import initramfs, provision
from vgpu_lab.qemu import qemu_command, socket_dir

BOOT_TIMEOUT = 180.0


class Qemu:
    """One QEMU 11.1 boot of `blob_map` against the subject's socket, started in the background."""

    def __init__(self, p: provision.Provisioner, work: Path, sock: Path, host_wait: int) -> None:
        q11, kernel = p.qemu11(), p.guest_kernel()
        work.mkdir(parents=True, exist_ok=True)
        initrd = initramfs.build_initramfs(
            work / "initrd.gz", busybox=p.busybox(), command=f"/bin/blob_map 256 256 {host_wait}",
            modules_dir=kernel.modules_dir, modules=initramfs.VIRTIO_GPU_MODULES,
            files={"/bin/blob_map": p.guest_programs()["blob_map"]})
        config = q11.config([sock.parent, kernel.root, work])
        self.version = q11.version
        self.serial = work / "serial.log"
        with self.serial.open("wb") as out:
            self.proc = subprocess.Popen(
                qemu_command(kernel=kernel.vmlinuz, initrd=initrd, socket_path=sock, config=config),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    def wait_for(self, marker: str, timeout: float = BOOT_TIMEOUT) -> bool:
        return wait_until(lambda: marker in self.text() or self.proc.poll() is not None, timeout, 0.02) \
            and marker in self.text()

    def kill(self) -> float:
        # The chroot wrapper execs QEMU in place: the session leader is QEMU itself.
        os.killpg(self.proc.pid, signal.SIGKILL)
        return time.monotonic()

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


def qemu_kill_with_a_blob_mapped(p: provision.Provisioner, work: Path) -> Fault:
    """SIGKILL QEMU 11.1 while its guest holds a mapped host blob; the next QEMU's guest maps one again."""
    with ExitStack() as stack:
        # AF_UNIX paths are short, and QEMU in its chroot must see the socket's directory: a fresh one in /tmp.
        d = stack.enter_context(socket_dir())
        s = Subject(d)
        stack.callback(s.close)
        version = p.qemu11().version
        f = Fault("SIGKILL of QEMU with a guest's blob mapped", f"QEMU {version} (sid chroot), SIGKILL")
        mark = s.log_mark()
        q = Qemu(p, work / "killed", Path(s.sock), host_wait=120)
        stack.callback(q.close)
        mapped = q.wait_for("VGPU-GUEST write ok") and wait_until(lambda: "map blob" in s.log_since(mark), 10)
        f.details["guest_mapped"] = mapped
        f.details["held_before"] = held(s.pid)
        if not mapped:
            f.details["serial"] = q.text()[-3000:]
            f.details["log"] = s.log_since(mark)[-3000:]
            return f
        t = q.kill()
        q.close()
        f = s.check_after(f, t, mark)
        # The next VMM is a real one too: a fresh QEMU whose guest maps, writes and unmaps its blob.
        mark_next = s.log_mark()
        t_next = time.monotonic()
        nq = Qemu(p, work / "next", Path(s.sock), host_wait=0)
        stack.callback(nq.close)
        served = wait_until(lambda: "map blob" in s.log_since(mark_next) or nq.proc.poll() is not None,
                            BOOT_TIMEOUT, 0.02) and "map blob" in s.log_since(mark_next)
        f.details["next_qemu_mapped_s"] = round(time.monotonic() - t_next, 3)
        finished = nq.wait_for(f"{initramfs.END_MARKER} rc=0")
        f.details["next_qemu_guest_ok"] = finished and "VGPU-GUEST done ok" in nq.text()
        if not (served and f.details["next_qemu_guest_ok"]):
            f.details["next_serial"] = nq.text()[-3000:]
        f.served_next = f.served_next and served and bool(f.details["next_qemu_guest_ok"])
        nq.close()
        f.details["released_after_next_qemu"] = wait_until(lambda: not held(s.pid), 10)
        f.note = (f"killed while blob_map waited with its blob mapped; a fresh QEMU's guest then mapped one "
                  f"{f.details['next_qemu_mapped_s']:.1f} s after its start and powered off cleanly: "
                  f"{f.details['next_qemu_guest_ok']}")
        return f
