"""Faults a VMM inflicts on its back end, and what the back end must do about each: survive, free everything the
connection held, say in its log what it dropped, and serve the next VMM.

Each scenario returns a :class:`Fault` row (the same rows make ``benchmarks/results/faults.json`` and the checks of
``tests/test_faults.py``). Where a real QEMU cannot be stopped at the moment a fault needs (a SHMEM_MAP whose ack is
pending, a batch of transfers in progress), the VMM is our front end in a child process (``tests.fault_frontend``),
killed or stopped at that moment; the scenario's name says which VMM it used. The QEMU scenarios are in
``tests.fault_qemu``.
"""

from __future__ import annotations

import mmap
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from tests.conftest import REPO, VGPU, host_blob_options, start_backend
from vgpu.conformance.process import BackendProcess
from vgpu.procfs import fd_count, rss_kib, settled_fd_count, wait_until
from vgpu.protocol import CtrlType, ResourceUnmapBlob
from vgpu.session import CROSS_DOMAIN_FEATURES, CrossDomainGuest, Session, hdr, make_display, rtype
from vgpu.vhost_user.driver import GuestRam
from vgpu.vhost_user.frontend import Frontend
from vgpu.vhost_user.message import Channel
from vgpu.vhost_user.wire import FrontendRequest

E = CtrlType
#: A connection's guest memory (ours "vgpu-guest-ram", QEMU's "mem") and host buffers ("vgpu-blob") are memfds in
#: /proc/PID/fd and /proc/PID/maps; an idle back end holds none.
HELD = re.compile(r"/memfd:")
DROPPED = re.compile(r"front end gone: dropped (\d+) resources, (\d+) mapped blobs, (\d+) contexts "
                     r"\((\d+) bytes of host memory\)")
RELEASE_TIMEOUT = 15.0


@dataclass
class Fault:
    """One fault and what the back end did about it (a row of the table)."""

    fault: str
    vmm: str
    survived: bool = False
    released: bool = False
    served_next: bool = False
    fds_before: int = 0
    fds_after: int = 0
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    held_after: list[str] = field(default_factory=list)  # memfd fds and mappings still there after the fault
    dropped: str = ""  # the back end's own line about what the connection left behind
    release_s: float = 0.0  # fault -> the back end back to its idle fds
    next_vmm_s: float = 0.0  # fault -> the next VMM's blob mapped (MAP_BLOB answered)
    note: str = ""  # what else a reader of the table should know about this fault
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.survived and self.released and self.served_next and not self.held_after

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def held(pid: int) -> list[str]:
    """Guest memory and host buffers the process still has open or mapped."""
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue
        if HELD.search(target):
            out.append(f"fd {name} -> {target}")
    with open(f"/proc/{pid}/maps", encoding="ascii", errors="replace") as f:
        out += [f"map {line.split()[0]} {line.split()[-2]}" for line in f if HELD.search(line)]
    return out


def next_vmm(sock: str) -> None:
    """A whole ordinary session: set-up, a cross-domain context, a host blob mapped and unmapped, goodbye."""
    g = Session.open(sock, features=CROSS_DOMAIN_FEATURES)
    try:
        g.fe.reserve_shm()
        c = CrossDomainGuest(g)
        c.start()
        reqs = c.requirements(64, 64)
        if rtype(c.create_blob(1, reqs)) != E.RESP_OK_NODATA or rtype(c.map(1, 0)) != E.RESP_OK_MAP_INFO:
            raise RuntimeError("the next VMM's blob was not mapped")
        g.ok(ResourceUnmapBlob(hdr(E.CMD_RESOURCE_UNMAP_BLOB, ctx_id=1), 1))
    finally:
        g.close()


class Subject:
    """Our back end under test: one process that every VMM of a run connects to in turn."""

    def __init__(self, work: Path, extra: tuple[str, ...] = ()) -> None:
        self.work = work
        self.b: BackendProcess = start_backend([*VGPU, *host_blob_options(), *extra], work, "vgpu")
        # The idle baseline is taken after one whole session: what a back end holds between VMMs, with every
        # module a session imports already loaded (the first session's imports are not a leak).
        gone = len(DROPPED.findall(self.b.log()))
        next_vmm(self.b.socket_path)
        wait_until(lambda: len(DROPPED.findall(self.b.log())) > gone, RELEASE_TIMEOUT)
        self.idle_fds = settled_fd_count(self.pid)
        self.idle_rss = rss_kib(self.pid)

    @property
    def pid(self) -> int:
        return self.b.pid

    @property
    def sock(self) -> str:
        return self.b.socket_path

    def log_mark(self) -> int:
        return len(self.b.log())

    def log_since(self, mark: int) -> str:
        return self.b.log()[mark:]

    def check_after(self, f: Fault, t_fault: float, mark: int, serve_next: bool = True) -> Fault:
        """Everything a fault must leave behind: a live process at its idle fds, no guest memory or host buffer
        held, a line saying what was dropped, and a next VMM served."""
        f.fds_before, f.rss_before_kib = self.idle_fds, self.idle_rss
        f.released = wait_until(lambda: fd_count(self.pid) == self.idle_fds, RELEASE_TIMEOUT)
        f.release_s = round(time.monotonic() - t_fault, 3)
        f.survived = self.b.alive()
        if not f.survived:
            f.details["log"] = self.log_since(mark)[-2000:]
            return f
        f.fds_after = fd_count(self.pid)
        f.held_after = held(self.pid)
        f.rss_after_kib = rss_kib(self.pid)
        text = self.log_since(mark)
        m = DROPPED.search(text)
        f.dropped = m.group(0) if m else ""
        if "Traceback" in text:
            f.details["traceback"] = text[text.index("Traceback"):][:1500]
        if serve_next:
            try:
                self.serve_next()
                f.served_next = True
            except Exception as e:  # the row records why; the caller's assertion shows it
                f.details["next_vmm_error"] = f"{type(e).__name__}: {e}"
            f.next_vmm_s = round(time.monotonic() - t_fault, 3)
        return f

    def serve_next(self) -> None:
        """A next VMM's whole session; returns once the back end has torn it down (logged, back at idle fds), so
        that what the next fault's scenario reads in the log is its own."""
        gone = len(DROPPED.findall(self.b.log()))
        next_vmm(self.sock)
        wait_until(lambda: len(DROPPED.findall(self.b.log())) > gone and fd_count(self.pid) == self.idle_fds,
                   RELEASE_TIMEOUT)

    def close(self) -> None:
        self.b.stop()


# --- a VMM in a child process -------------------------------------------------------------------------------


class ChildVmm:
    """``tests.fault_frontend SCENARIO`` against the subject; read its stage lines, then strike."""

    def __init__(self, scenario: str, sock: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fault_frontend", scenario, sock], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[str] = []

    def expect(self, stage: str, timeout: float = 30.0) -> dict[str, str]:
        """Wait for the stage line; its key=value words."""
        out = self.proc.stdout
        assert out is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([out], [], [], max(0.0, remaining))
            line = out.readline() if ready else ""
            if not line:
                if ready or remaining <= 0:
                    raise RuntimeError(f"no {stage!r} from the child VMM; it said {self.lines}; "
                                       f"stderr: {self._stderr()}")
                continue
            self.lines.append(line.strip())
            words = line.split()
            if words and words[0] == stage:
                return dict(w.split("=", 1) for w in words[1:] if "=" in w)

    def _stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return "(still running)"
        return self.proc.stderr.read()[-2000:]

    def kill(self, sig: int = signal.SIGKILL) -> float:
        os.kill(self.proc.pid, sig)
        return time.monotonic()

    def state(self) -> str:
        with open(f"/proc/{self.proc.pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for s in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if s is not None:
                s.close()


CHILD = "our front end in a child process"


def kill_with_blobs_mapped(s: Subject) -> Fault:
    f = Fault("SIGKILL with 2 blobs mapped", f"{CHILD} (SIGKILL)")
    mark = s.log_mark()
    child = ChildVmm("mapped", s.sock)
    try:
        child.expect("mapped")
        f.details["held_before"] = held(s.pid)
        t = child.kill()
        child.proc.wait(10)
    finally:
        child.close()
    f.note = "2 x 256 KiB memfd blobs mapped in the VMM's window when it died"
    return s.check_after(f, t, mark)


def kill_map_ack_pending(s: Subject) -> Fault:
    f = Fault("SIGKILL in MAP_BLOB, SHMEM_MAP ack pending", f"{CHILD} (SIGKILL; QEMU cannot be stopped there)")
    mark = s.log_mark()
    child = ChildVmm("map-pending", s.sock)
    try:
        child.expect("map-pending")
        t = child.kill()
        child.proc.wait(10)
    finally:
        child.close()
    f = s.check_after(f, t, mark)
    f.details["map_failed_logged"] = "SHMEM_MAP of blob 1 failed" in s.log_since(mark)
    f.note = "the pending map failed with RESP_ERR_UNSPEC (channel closed), logged"
    return f


def main_socket_closed_map_pending(s: Subject) -> Fault:
    """The VMM closes the main socket while a SHMEM_MAP waits, the back-end channel still open (a VMM tearing the
    device down): the map fails like any channel failure, no traceback."""
    f = Fault("main socket closed in MAP_BLOB, SHMEM_MAP ack pending", f"{CHILD} (shutdown of the main socket)")
    mark = s.log_mark()
    child = ChildVmm("main-closed", s.sock)
    try:
        child.expect("main-closed")
        t = time.monotonic()
        wait_until(lambda: DROPPED.search(s.log_since(mark)), RELEASE_TIMEOUT)
        child.kill()
        child.proc.wait(10)
    finally:
        child.close()
    f = s.check_after(f, t, mark)
    f.details["map_failed_logged"] = "failed: front end gone while waiting" in s.log_since(mark)
    f.note = "the pending map failed (front end gone while waiting), no traceback; the session ended"
    return f


def kill_mid_transfer(s: Subject) -> Fault:
    f = Fault("SIGKILL during 120 x TRANSFER_TO_HOST_2D of 2048x2048", f"{CHILD} (SIGKILL)")
    mark = s.log_mark()
    child = ChildVmm("transfer", s.sock)
    try:
        info = child.expect("kicked")
        # Hold the child's guest RAM: the back end's progress is its used ring, which we can read after the kill.
        ram_fd = os.open(f"/proc/{child.proc.pid}/fd/{info['ram_fd']}", os.O_RDWR)
        try:
            ram = mmap.mmap(ram_fd, 0, mmap.MAP_SHARED)
        finally:
            os.close(ram_fd)
        used = int(info["used_gpa"]) + 2
        start, count = int(info["used_start"]), int(info["count"])

        def done() -> int:
            return (int.from_bytes(ram[used:used + 2], "little") - start) & 0xFFFF

        wait_until(lambda: done() >= 1, 30, 0.001)
        t = child.kill()
        at_kill = done()
        child.proc.wait(10)
    finally:
        child.close()
    try:
        f = s.check_after(f, t, mark)
        after = done() - at_kill
        f.details.update(transfers=count, completed_at_kill=at_kill, completed_for_the_dead_vmm=after,
                         mid_batch=0 < at_kill < count)
        f.note = (f"killed after {at_kill} of {count} transfers; the back end completed {after} more into the dead "
                  f"VMM's memory before it saw the disconnect (a batch runs to its end)")
    finally:
        ram.close()
    return f


def sigstop_during_map(s: Subject, map_timeout: float = 1.0) -> Fault:
    """SIGSTOP the VMM while a SHMEM_MAP waits for its ack; the map times out, the guest gets an error; after SIGCONT
    the late ack is answered with SHMEM_UNMAP and the same offset maps again."""
    f = Fault("SIGSTOP in MAP_BLOB, SHMEM_MAP ack pending; SIGCONT later", f"{CHILD} (SIGSTOP, SIGCONT)")
    mark = s.log_mark()
    child = ChildVmm("stopped-map", s.sock)
    try:
        child.expect("map-pending")
        t = child.kill(signal.SIGSTOP)
        timed_out = wait_until(lambda: "SHMEM_MAP of blob 1 failed: no reply" in s.log_since(mark), map_timeout + 10)
        f.details.update(map_timed_out_s=round(time.monotonic() - t, 3), stopped_throughout=child.state() == "T")
        assert child.proc.stdin is not None
        child.proc.stdin.write("go\n")  # let the ack leave once the process runs again
        child.proc.stdin.flush()
        child.kill(signal.SIGCONT)
        answers = {stage: child.expect(stage) for stage in ("map-response", "window-after", "map-again", "unmap")}
        child.expect("done")
        f.details.update(map_timed_out=timed_out, guest_saw={k: v.get("type", "") for k, v in answers.items()},
                         vmm_window_after_late_ack=answers["window-after"],
                         late_ack_undone="unmapping that range again" in s.log_since(mark))
        t_end = time.monotonic()
        child.proc.wait(10)
    finally:
        child.close()
    f = s.check_after(f, t_end, mark)
    f.survived = f.survived and timed_out
    f.note = (f"map timed out {f.details['map_timed_out_s']:.1f} s into the stop (--map-timeout {map_timeout:g}); "
              f"after SIGCONT the guest saw {f.details['guest_saw']['map-response']}, the late ack was undone with "
              f"SHMEM_UNMAP ({f.details['vmm_window_after_late_ack']['mappings']} mappings left in the VMM) and the "
              f"same offset mapped again ({f.details['guest_saw']['map-again']})")
    return f


def sigstop_during_frames(s: Subject) -> Fault:
    """SIGSTOP the VMM while frames go to its display socket: the back end must not block in sendmsg until the VMM
    runs again; it drops the display after SEND_TIMEOUT and the guest's flushes are still answered."""
    from vgpu.vhost_user.gpu_display import SEND_TIMEOUT

    f = Fault("SIGSTOP while frames go to the display socket; SIGCONT later", f"{CHILD} (SIGSTOP, SIGCONT)")
    mark = s.log_mark()
    child = ChildVmm("display-stopped", s.sock)
    try:
        child.expect("display-blocked")
        t = child.kill(signal.SIGSTOP)
        # Bounded by a few send timeouts (see SEND_TIMEOUT); without one, the back end would wait for the VMM.
        dropped = wait_until(lambda: "took no bytes within" in s.log_since(mark), 4 * SEND_TIMEOUT + 10)
        f.details.update(display_dropped=dropped, display_dropped_s=round(time.monotonic() - t, 3),
                         stopped_throughout=child.state() == "T")
        assert child.proc.stdin is not None
        child.proc.stdin.write("go\n")  # the display reads again once the process runs
        child.proc.stdin.flush()
        child.kill(signal.SIGCONT)
        f.details["after_sigcont"] = child.expect("after")
        t_end = child.kill()
        child.proc.wait(10)
    finally:
        child.close()
    f = s.check_after(f, t_end, mark)
    f.survived = f.survived and dropped and f.details["after_sigcont"].get("answered") == "3"
    f.note = (f"the display was dropped {f.details['display_dropped_s']:.1f} s into the stop (it took no byte for "
              f"{SEND_TIMEOUT:g} s while the back end kept serving the front end); after SIGCONT "
              f"the guest's flushes were answered ({f.details['after_sigcont'].get('answered')} of 3); then SIGKILL")
    return f


# --- disconnects during set-up ------------------------------------------------------------------------------


class Cut(Exception):
    """The front end left right after sending the message it was cut at."""


class CuttingChannel(Channel):
    """A front-end channel that records what it sends and leaves after the `cut_after`-th message."""

    def __init__(self, sock: socket.socket, cut_after: int | None = None) -> None:
        super().__init__(sock)
        self.cut_after = cut_after
        self.sent: list[str] = []

    def send(self, request: int, flags: int, payload: Any = b"", fds: list[int] | None = None,
             wait_writable: Callable[[], None] | None = None) -> None:
        super().send(request, flags, payload, fds, wait_writable)
        self.sent.append(FrontendRequest(request).name)
        if self.cut_after is not None and len(self.sent) >= self.cut_after:
            self.close()  # no reply awaited: the back end answers into a closed socket
            raise Cut(self.sent[-1])


def setup_session(sock: str, cut_after: int | None = None) -> list[str]:
    """QEMU's set-up order, as our front end plays it (Session.connect plus the config read, the shared-memory query and
    the display socket); returns the requests sent, stopping after `cut_after` of them."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.connect(sock)
    fe = Frontend(s)
    channel = fe.channel = CuttingChannel(s, cut_after)
    ram = GuestRam(16 << 20)
    try:
        fe.negotiate(device_features=CROSS_DOMAIN_FEATURES)
        fe.get_config(0, 16)
        fe.reserve_shm()
        fe.share_memory(ram)
        fe.setup_queue(0, 64)
        fe.setup_queue(1, 64)
        fe.set_display(make_display())
    except Cut:
        pass
    finally:
        fe.close()
        ram.close()
    return channel.sent


def disconnects_during_setup(s: Subject, rounds: int = 1) -> Fault:
    """Cut the set-up after each of its messages in turn (`rounds` times over); after each cut the back end is alive
    and back at its idle fds, and its RSS does not grow from cut to cut."""
    sequence = setup_session(s.sock)  # the recording: one whole set-up
    s.b.settle_fds(s.idle_fds)
    n = len(sequence)
    f = Fault(f"disconnect after set-up message k, k = 1..{n}" + (f" ({rounds} rounds)" if rounds > 1 else ""),
              "our front end (close after message k)")
    mark = s.log_mark()
    rss: list[int] = []
    bad: list[str] = []
    t0 = t = time.monotonic()
    for k in [k for _ in range(rounds) for k in range(1, n + 1)]:
        t = time.monotonic()
        setup_session(s.sock, k)
        if not wait_until(lambda: fd_count(s.pid) == s.idle_fds or not s.b.alive(), RELEASE_TIMEOUT):
            bad.append(f"after {sequence[k - 1]} (k={k}): {fd_count(s.pid)} fds")
        if not s.b.alive():
            bad.append(f"died after {sequence[k - 1]} (k={k})")
            break
        rss.append(rss_kib(s.pid))
    dropped = len(DROPPED.findall(s.log_since(mark)))  # one line per cut session (before the next VMM's own)
    f = s.check_after(f, t, mark)
    f.details.update(sequence=sequence, rss_kib_per_cut=rss, problems=bad,
                     rss_growth_kib=(rss[-1] - rss[0]) if rss else None, total_s=round(time.monotonic() - t0, 2),
                     sessions_dropped=dropped)
    f.released = f.released and not bad
    f.note = (f"{len(rss)} cuts, each followed by a return to the idle fds; RSS {rss[0] if rss else 0:,} -> "
              f"{rss[-1] if rss else 0:,} KiB from the first cut to the last")
    return f


FRONTEND_FAULTS = (kill_with_blobs_mapped, kill_map_ack_pending, main_socket_closed_map_pending, kill_mid_transfer,
                   sigstop_during_map, sigstop_during_frames, disconnects_during_setup)


def write_log(fault: Fault, out: IO[str]) -> None:
    verdict = "ok" if fault.ok else "FAILED"
    out.write(f"{verdict:6} {fault.fault}: fds {fault.fds_before}->{fault.fds_after}, RSS {fault.rss_before_kib}->"
              f"{fault.rss_after_kib} KiB, released in {fault.release_s:.2f} s, next VMM served "
              f"{fault.next_vmm_s:.2f} s after the fault\n")
