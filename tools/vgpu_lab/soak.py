"""Soak: one back-end process serves real guests one after another; after each, its fds and RSS are read back.

Why one process for many guests: an operator's back end outlives its VMs (a VM reboots, migrates, is replaced),
so whatever one guest leaves behind — an fd, a mapping, a cache that only grows — accumulates. Here every guest
is a real QEMU with a real Linux guest: QEMU 11.1 with the generic vhost-user device (the guest maps host-visible
blobs with ``blob_map`` and draws a KMS frame through guest blobs) or QEMU 10 with ``vhost-user-gpu-pci`` (fbcon
and a KMS frame through 2D resources and the display socket). Each guest's own check decides pass or fail; the
host adds what it sees: the frame the guest drew among our scanout pictures, pixel for pixel, and how many blobs
our log says were mapped.

The idle baseline is taken after the first guest: a back end lazily imports what a session needs (the first
session's imports are not a leak), and allocators keep freed arenas. ``fds`` must equal the baseline exactly
after every guest; RSS is compared with it within :data:`RSS_SLACK_KIB` and its trend over the run is reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from vgpu.gpu import png
from vgpu.procfs import fd_count, rss_kib, settled_fd_count, wait_until

from . import initramfs, patterns
from .provision import Provisioner
from .qemu import Backend, QemuConfig, run_guest, socket_dir

BOOT_TIMEOUT = 180.0
#: How far above the baseline RSS may be after a guest and still count as back: CPython's allocator keeps some
#: freed arenas and the kernel counts page-cache pages of files we read; a leak shows as a trend, not a step.
RSS_SLACK_KIB = 2048
#: How long to wait for the back end to say a front end is gone, after QEMU exited.
RELEASE_TIMEOUT = 20.0
MARK = "VGPU-SOAK-FBCON"
GONE = re.compile(r"front end gone: dropped (\d+) resources, (\d+) mapped blobs, (\d+) contexts")
MAP_BLOB = re.compile(r"map blob \d+ at ")
KMS_STEPS = ("open", "resources", "connector", "crtc", "dumb", "addfb", "modeset", "dirtyfb", "done")
#: blob_map's steps when the host does not answer (host_wait 0 skips the "host" step).
BLOB_STEPS = ("params", "context", "ring", "init", "reqs", "blob", "mmap", "write", "done")
#: The blobs each QEMU 11.1 guest maps (width, height of an XRGB8888 image): a small and a frame-sized one.
BLOB_SIZES = ((256, 256), (1024, 768))


@dataclass(frozen=True)
class Kind:
    """One way of running guests: the VMM, the back end's options, the guest's command and what it must print."""

    name: str
    vmm: str
    config: QemuConfig
    command: str
    backend_args: tuple[str, ...]
    steps: tuple[str, ...]  # guest steps that must print "ok", in order, counted per guest
    maps: int  # blobs our log must say were mapped per guest


@dataclass
class GuestRecord:
    """One guest of the soak, as the host saw it."""

    index: int
    seconds: float
    guest_ok: bool
    failure: str  # why not, when not
    fds_after: int
    rss_after_kib: int
    fds_peak: int
    rss_peak_kib: int
    maps: int
    frame_ok: bool
    dropped: str  # the back end's own line about what the guest's VMM left behind

    def back_at(self, fds: int, rss_kib: int) -> bool:
        return self.fds_after == fds and self.rss_after_kib <= rss_kib + RSS_SLACK_KIB


@dataclass
class SoakRun:
    """A back end and the guests it served, in order."""

    kind: str
    vmm: str
    idle_fds_cold: int  # before any guest
    idle_rss_cold_kib: int
    records: list[GuestRecord] = field(default_factory=list)
    backend_alive: bool = True
    backend_tail: str = ""

    @property
    def baseline_fds(self) -> int:
        return self.records[0].fds_after if self.records else self.idle_fds_cold

    @property
    def baseline_rss_kib(self) -> int:
        return self.records[0].rss_after_kib if self.records else self.idle_rss_cold_kib

    @property
    def failures(self) -> list[str]:
        """Every way the run fell short, one line each (empty: the soak held)."""
        out = [] if self.backend_alive else ["the back end died"]
        for r in self.records:
            if not r.guest_ok:
                out.append(f"guest {r.index}: {r.failure}")
            if not r.frame_ok:
                out.append(f"guest {r.index}: the guest's frame is not among our pictures")
            if r.index and not r.back_at(self.baseline_fds, self.baseline_rss_kib):
                out.append(f"guest {r.index}: {r.fds_after} fds, {r.rss_after_kib} KiB after it; baseline "
                           f"{self.baseline_fds} fds, {self.baseline_rss_kib} KiB")
        if self.records and self.records[0].fds_after != self.idle_fds_cold:
            out.append(f"after the first guest {self.records[0].fds_after} fds, {self.idle_fds_cold} before it")
        return out

    def rss_slope_kib(self) -> float:
        """Least-squares growth of RSS per guest after the first (a leak's signature; noise averages out)."""
        ys = [r.rss_after_kib for r in self.records[1:]]
        if len(ys) < 2:
            return 0.0
        return float(np.polyfit(np.arange(len(ys), dtype=float), np.asarray(ys, dtype=float), 1)[0])

    def summary(self) -> dict[str, object]:
        secs = [r.seconds for r in self.records]
        after = [r.rss_after_kib for r in self.records[1:]]
        return {
            "kind": self.kind, "vmm": self.vmm, "guests": len(self.records),
            "guests_ok": sum(r.guest_ok and r.frame_ok for r in self.records),
            "idle_fds_cold": self.idle_fds_cold, "idle_rss_cold_kib": self.idle_rss_cold_kib,
            "baseline_fds": self.baseline_fds, "baseline_rss_kib": self.baseline_rss_kib,
            "fds_after_max": max((r.fds_after for r in self.records), default=0),
            "rss_after_max_kib": max(after, default=self.baseline_rss_kib),
            "rss_after_last_kib": after[-1] if after else self.baseline_rss_kib,
            "rss_slope_kib_per_guest": round(self.rss_slope_kib(), 2),
            "fds_peak_max": max((r.fds_peak for r in self.records), default=0),
            "rss_peak_max_kib": max((r.rss_peak_kib for r in self.records), default=0),
            "seconds_median": round(float(np.median(secs)), 2) if secs else 0.0,
            "seconds_total": round(sum(secs), 1),
            "backend_alive": self.backend_alive, "failures": self.failures,
        }


def kind_of(p: Provisioner, name: str, pictures: Path, binds: list[Path]) -> Kind:
    """``qemu11``: host-visible blobs + a KMS frame on guest blobs; ``qemu10``: fbcon + a KMS frame on 2D
    resources. `binds` are the directories QEMU 11.1 must see inside its chroot."""
    png_args = (f"--scanout-png={pictures}", "--png-rate=10", "--png-history")
    if name == "qemu10":
        q10 = p.qemu()
        return Kind(name, f"QEMU {q10.package_version}, vhost-user-gpu-pci", QemuConfig(qemu=q10.system),
                    f"/bin/sh -c 'echo {MARK} > /dev/tty0; /bin/kms_pattern 500'", png_args, KMS_STEPS, 0)
    if name == "qemu11":
        q11 = p.qemu11()
        blobs = " && ".join(f"/bin/blob_map {w} {h} 0" for w, h in BLOB_SIZES)
        return Kind(name, f"QEMU {q11.version} (sid chroot), vhost-user-test-device-pci", q11.config(binds),
                    f"/bin/sh -c '{blobs} && /bin/kms_pattern 500'", ("--context-types=cross-domain", *png_args),
                    BLOB_STEPS * len(BLOB_SIZES) + KMS_STEPS, len(BLOB_SIZES))
    raise ValueError(f"no soak kind {name!r} (qemu10, qemu11)")


KINDS = ("qemu11", "qemu10")


def _steps_failure(lines: list[str], steps: tuple[str, ...]) -> str:
    """'' when every expected step printed ok, in order; else the first one missing (or its failure line)."""
    oks = [m.group(1) for line in lines if (m := re.match(r"VGPU-GUEST (\S+) ok\b", line))]
    pos = 0
    for step in steps:
        try:
            pos = oks.index(step, pos) + 1
        except ValueError:
            fail = next((line for line in lines if " fail" in line), "")
            return f"step {step!r} missing" + (f" ({fail})" if fail else "")
    return ""


def _rgb(xrgb: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint8]:
    """(h, w) XRGB words as our PNGs hold them: (h, w, 3) R, G, B."""
    return np.stack([(xrgb >> s) & 0xFF for s in (16, 8, 0)], axis=-1).astype(np.uint8)


def frame_seen(pictures: Path, lines: list[str]) -> bool:
    """Whether one of our scanout pictures is exactly the frame kms_pattern drew (at the mode it set)."""
    m = re.search(r"VGPU-GUEST modeset ok (\d+)x(\d+)", "\n".join(lines))
    if not m:
        return False
    want = _rgb(patterns.frame_pixels(int(m.group(1)), int(m.group(2))))
    for path in sorted(pictures.glob("scanout-0-*.png"), reverse=True):
        with contextlib.suppress(ValueError, OSError):
            got = png.decode(path.read_bytes())
            if got.shape == want.shape and np.array_equal(got, want):
                return True
    return False


class _Sampler:
    """Peak fds and RSS of a process while a guest runs (sampled: a short spike between samples is missed)."""

    def __init__(self, pid: int, step: float = 0.1) -> None:
        self.pid, self.step = pid, step
        self.fds = self.rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.fds = max(self.fds, fd_count(self.pid))
            self.rss = max(self.rss, rss_kib(self.pid))
            self._stop.wait(self.step)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def _backend(kind: Kind, sock: Path) -> Iterator[Backend]:
    argv = [sys.executable, "-m", "vgpu", "--socket-path={sock}", "--log-level=info", *kind.backend_args]
    with Backend(argv, sock) as proc:
        yield proc


def soak(p: Provisioner, kind_name: str, guests: int, work: Path,
         progress: Callable[[SoakRun, GuestRecord], None] | None = None) -> SoakRun:
    """Serve `guests` guests of `kind_name` one after another with one back-end process; record each."""
    kernel, programs = p.guest_kernel(), p.guest_programs()
    work.mkdir(parents=True, exist_ok=True)
    pictures = work / "pictures"
    with socket_dir() as d:
        sock = d / "vgpu.sock"
        kind = kind_of(p, kind_name, pictures, [d, kernel.root, work])
        initrd = initramfs.build_initramfs(
            work / f"{kind.name}-initrd.gz", busybox=p.busybox(), command=kind.command,
            modules_dir=kernel.modules_dir, modules=initramfs.VIRTIO_GPU_MODULES,
            files={"/bin/kms_pattern": programs["kms_pattern"], "/bin/blob_map": programs["blob_map"]})
        with _backend(kind, sock) as proc:
            assert proc.pid is not None
            pid = proc.pid
            run = SoakRun(kind.name, kind.vmm, settled_fd_count(pid), rss_kib(pid))
            for i in range(guests):
                record = _one_guest(kind, i, proc, pid, initrd, kernel.vmlinuz, sock, pictures, work)
                run.records.append(record)
                if progress is not None:
                    progress(run, record)
                if not proc.running:
                    run.backend_alive = False
                    break
            run.backend_alive = run.backend_alive and proc.running
        run.backend_tail = "\n".join(proc.output.splitlines()[-40:])
    return run


def _one_guest(kind: Kind, index: int, proc: Backend, pid: int, initrd: Path, vmlinuz: Path, sock: Path,
               pictures: Path, work: Path) -> GuestRecord:
    for old in pictures.glob("*.png"):
        old.unlink()
    mark = len(proc.output)
    gone_before = len(GONE.findall(proc.output))
    started = time.monotonic()
    with _Sampler(pid) as peak:
        guest = run_guest(kernel=vmlinuz, initrd=initrd, socket_path=sock, config=kind.config,
                          timeout=BOOT_TIMEOUT, serial_log=work / "serial.log")
        # QEMU has exited; the back end frees the connection once it reads the hang-up.
        wait_until(lambda: len(GONE.findall(proc.output)) > gone_before or not proc.running, RELEASE_TIMEOUT, 0.02)
    seconds = time.monotonic() - started
    fds = settled_fd_count(pid, reads=5, step=0.02)
    log = proc.output[mark:]
    lines = guest.guest_lines()
    failure = ""
    if guest.timed_out or guest.returncode != 0 or guest.guest_status != 0:
        failure = (f"QEMU {'timed out' if guest.timed_out else f'exited {guest.returncode}'}, guest status "
                   f"{guest.guest_status}")
    failure = failure or _steps_failure(lines, kind.steps)
    maps = len(MAP_BLOB.findall(log))
    if not failure and maps < kind.maps:
        failure = f"{maps} blobs mapped in our log, {kind.maps} expected"
    gone = GONE.search(log)
    if failure:
        (work / f"failed-{kind.name}-{index}.log").write_text(guest.describe() + "\n--- back end\n" + log)
    return GuestRecord(index, round(seconds, 2), not failure, failure, fds, rss_kib(pid), peak.fds, peak.rss, maps,
                       frame_seen(pictures, lines), gone.group(0) if gone else "")


def record_row(r: GuestRecord) -> dict[str, object]:
    return dataclasses.asdict(r)
