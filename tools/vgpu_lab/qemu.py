"""Boot the lab guest under QEMU (TCG) against a vhost-user GPU back end, and collect what happened.

Why this shape: the back end is the thing under test and may be any program (QEMU's own C ``vhost-user-gpu``,
ours, a debugging wrapper), so the caller starts it and hands over only a socket path; QEMU connects to that
socket as the vhost-user front end. KVM is unusable on this machine kind (the host runs KVM-PVM), so the guest
runs under TCG, and a hard timeout bounds every run because a wedged back end leaves the guest waiting forever.

The device string and extra arguments are free so the same runner can later drive
``vhost-user-test-device-pci`` (QEMU 11.1, host-visible window) or add ``-virtfs``; ``command_prefix`` lets a
QEMU run from a chroot, in which case every path given must exist inside that chroot —
:meth:`vgpu_lab.sid.SidQemu.config` builds such a configuration for QEMU 11.1 in a sid chroot, binding the paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from vgpu_lab.initramfs import DMESG_BEGIN, DMESG_END, END_MARKER

QEMU_SYSTEM_X86_64 = Path("/usr/bin/qemu-system-x86_64")
#: quiet + loglevel=4 keep the console (and so the boot) fast; /init dumps the full kernel log at the end.
DEFAULT_APPEND = "console=ttyS0 quiet loglevel=4 panic=-1"
CHARDEV_ID = "vgpu"
#: The device QEMU 10 offers for a vhost-user GPU back end (no host-visible window).
VHOST_USER_GPU_PCI = f"vhost-user-gpu-pci,chardev={CHARDEV_ID}"
#: ``struct virtio_gpu_config`` (events_read, events_clear, num_scanouts, num_capsets: four le32).
VIRTIO_GPU_CONFIG_SIZE = 16
#: The generic device of QEMU >= 11.1 that sizes a shared-memory BAR from the back end's GET_SHMEM_CONFIG.
#: ``config_size`` must be exactly the GPU's config size: QEMU asks the back end for ``config_size`` bytes with
#: GET_CONFIG, and a back end that follows the spec (ours, QEMU's C ``vhost-user-gpu``) refuses a read past its
#: 16 bytes; QEMU then logs "Received bad msg size", the guest reads zeros and disables KMS (num_scanouts 0).
VHOST_USER_TEST_DEVICE_GPU = (
    f"vhost-user-test-device-pci,chardev={CHARDEV_ID},virtio-id=16,num_vqs=2,config_size={VIRTIO_GPU_CONFIG_SIZE}"
)
GUEST_LINE_PREFIX = "VGPU-GUEST"

_END_RE = re.compile(rf"^{END_MARKER} rc=(\d+)", re.MULTILINE)


class LabError(RuntimeError):
    """The back end or QEMU could not be started as asked."""


# --------------------------------------------------------------------------------------------------------------
# QEMU


@dataclasses.dataclass(frozen=True)
class QemuConfig:
    """Everything about a boot except the guest image and the socket, so callers can vary one thing at a time.

    ``device`` is the ``-device`` value attached to the vhost-user chardev (``None`` for no device);
    ``command_prefix`` runs QEMU through a wrapper such as ``("chroot", DIR)``. ``display`` is the ``-display``
    value: headless by default; ``dbus,addr=ADDRESS,gl=off`` exports the consoles on a D-Bus bus, where a test can
    resize one like a viewer would (``SetUIInfo``) without host graphics.
    """

    qemu: Path = QEMU_SYSTEM_X86_64
    memory_mib: int = 512
    smp: int = 1
    append: str = DEFAULT_APPEND
    device: str | None = VHOST_USER_GPU_PCI
    extra_args: tuple[str, ...] = ()
    command_prefix: tuple[str, ...] = ()
    env: Mapping[str, str] | None = None
    display: str = "none"


def qemu_command(
    *, kernel: Path, initrd: Path, socket_path: Path | None, config: QemuConfig = QemuConfig()
) -> list[str]:
    """The QEMU command line (the shape measured to work in reference/lab.md).

    Guest RAM is a shared memfd because a vhost-user back end maps the guest's memory itself: without
    ``share=on`` the back end would write into a private copy the guest never sees. ``socket_path=None`` boots
    without any vhost-user device (useful to check the guest image alone).
    """
    mem = config.memory_mib
    cmd = [
        *config.command_prefix,
        str(config.qemu),
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        f"{mem}M",
        "-smp",
        str(config.smp),
        "-machine",
        "q35,memory-backend=mem",
        "-object",
        f"memory-backend-memfd,id=mem,size={mem}M,share=on",
        "-nodefaults",
        "-no-reboot",
        "-display",
        config.display,
        "-serial",
        "stdio",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        config.append,
    ]
    if socket_path is not None:
        cmd += ["-chardev", f"socket,id={CHARDEV_ID},path={socket_path}"]
        if config.device:
            cmd += ["-device", config.device]
    cmd += list(config.extra_args)
    return cmd


@dataclasses.dataclass(frozen=True)
class GuestRun:
    """What one boot produced: the serial console, QEMU's stderr, how it ended and how long it took."""

    command: tuple[str, ...]
    returncode: int | None
    timed_out: bool
    elapsed: float
    serial: str
    stderr: str

    @property
    def guest_status(self) -> int | None:
        """The exit status /init reported for the guest command, or None if the guest never got there."""
        match = _END_RE.search(self.serial)
        return int(match.group(1)) if match else None

    @property
    def dmesg(self) -> str:
        """The kernel log /init dumped at the end (empty if the guest did not get that far)."""
        start = self.serial.find(DMESG_BEGIN)
        end = self.serial.find(DMESG_END, start + 1)
        if start < 0 or end < 0:
            return ""
        return self.serial[start + len(DMESG_BEGIN) : end].strip("\r\n")

    def guest_lines(self, prefix: str = GUEST_LINE_PREFIX) -> list[str]:
        """Lines the guest programs printed for machines (``VGPU-GUEST <step> ok|fail ...``)."""
        return [line.strip() for line in self.serial.splitlines() if line.strip().startswith(prefix)]

    def describe(self) -> str:
        """A failure message with enough context to debug from a CI log."""
        how = "timed out" if self.timed_out else f"exited with {self.returncode}"
        return (
            f"QEMU {how} after {self.elapsed:.1f} s, guest status {self.guest_status}\n"
            f"--- command\n{shlex.join(self.command)}\n--- qemu stderr\n{self.stderr.strip()}\n"
            f"--- serial (last 60 lines)\n" + "\n".join(self.serial.splitlines()[-60:])
        )


def _kill_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """Terminate a process started in its own session, then kill it if it ignores SIGTERM."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)


def run_guest(
    *,
    kernel: Path,
    initrd: Path,
    socket_path: Path | None,
    config: QemuConfig = QemuConfig(),
    timeout: float = 120.0,
    serial_log: Path | None = None,
) -> GuestRun:
    """Boot once and wait (at most ``timeout`` seconds) for QEMU to exit.

    The serial console goes straight to a file rather than a pipe, so nothing is lost when the run is killed on
    timeout; pass ``serial_log`` to keep that file, otherwise a temporary one is used and removed.
    """
    cmd = qemu_command(kernel=kernel, initrd=initrd, socket_path=socket_path, config=config)
    return run_qemu(cmd, env=config.env, timeout=timeout, serial_log=serial_log)


def run_qemu(
    cmd: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 120.0, serial_log: Path | None = None
) -> GuestRun:
    """Run a QEMU command line whose serial console is stdout (``-serial stdio``) as :func:`run_guest` does, for
    machines other than its q35 (the arm64 guest's ``virt``)."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with contextlib.ExitStack() as stack:
        if serial_log is not None:
            serial_log.parent.mkdir(parents=True, exist_ok=True)
            serial_file: IO[bytes] = stack.enter_context(serial_log.open("w+b"))
        else:
            serial_file = stack.enter_context(tempfile.TemporaryFile(prefix="vgpu-serial-"))
        stderr_file = stack.enter_context(tempfile.TemporaryFile(prefix="vgpu-qemu-stderr-"))
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=serial_file,
                stderr=stderr_file,
                env=full_env,
                start_new_session=True,
            )
        except OSError as exc:
            raise LabError(f"cannot start {cmd[0]}: {exc}") from exc
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc, grace=5.0)
        elapsed = time.monotonic() - start
        serial_file.seek(0)
        stderr_file.seek(0)
        return GuestRun(
            command=tuple(cmd),
            returncode=None if timed_out else proc.returncode,
            timed_out=timed_out,
            elapsed=elapsed,
            serial=serial_file.read().decode("utf-8", "replace"),
            stderr=stderr_file.read().decode("utf-8", "replace"),
        )


# --------------------------------------------------------------------------------------------------------------
# back ends


def _socket_exists(path: Path) -> bool:
    """True once a socket node exists at ``path``.

    A probe connection would tell "listening" apart from "stale", but a one-shot back end would take the probe as
    *the* front end; :func:`socket_dir` gives every run a fresh directory, so a stale node cannot be there.
    """
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


class Backend:
    """A vhost-user back end subprocess, started from a command template, stopped deterministically.

    ``template`` is a shell-like string or an argument list in which ``{sock}`` is replaced by the socket
    path, e.g. ``"/usr/lib/qemu/vhost-user-gpu --socket-path={sock}"``. The back end's stdout and stderr go to
    an anonymous temporary file, readable as :attr:`output` at any time, also after :meth:`stop`.
    """

    def __init__(
        self,
        template: str | Sequence[str],
        socket_path: Path,
        *,
        ready_timeout: float = 15.0,
        env: Mapping[str, str] | None = None,
        wait_for_socket: bool = True,
    ) -> None:
        parts = shlex.split(template) if isinstance(template, str) else list(template)
        self.argv = [part.format(sock=socket_path) for part in parts]
        self.socket_path = socket_path
        self.ready_timeout = ready_timeout
        self.env = env
        self.wait_for_socket = wait_for_socket
        self.returncode: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._final_output = ""

    def start(self) -> Backend:
        """Start the process and wait until its listening socket exists (or it dies, which is an error)."""
        if self._proc is not None:
            raise LabError("back end already started")
        full_env = dict(os.environ)
        if self.env:
            full_env.update(self.env)
        # Owned by this object until the process has ended and its output is read; closed in stop().
        self._log = tempfile.TemporaryFile(prefix="vgpu-backend-")  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=full_env,
                start_new_session=True,
            )
        except OSError as exc:
            self._log.close()
            self._log = None
            raise LabError(f"cannot start back end {self.argv[0]}: {exc}") from exc
        if not self.wait_for_socket:
            return self
        deadline = time.monotonic() + self.ready_timeout
        while not _socket_exists(self.socket_path):
            if self._proc.poll() is not None:
                self.stop()
                raise LabError(
                    f"back end {shlex.join(self.argv)} exited with {self.returncode} before creating "
                    f"{self.socket_path}:\n{self.output}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise LabError(
                    f"back end {shlex.join(self.argv)} did not create {self.socket_path} within "
                    f"{self.ready_timeout:.0f} s:\n{self.output}"
                )
            time.sleep(0.01)
        return self

    def stop(self, grace: float = 5.0) -> int | None:
        """Stop the back end if still running (SIGTERM, then SIGKILL), keep its output, close the log file.

        Returns its exit status. Safe to call more than once.
        """
        if self._proc is not None and self.returncode is None:
            try:
                self._proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                _kill_group(self._proc, grace)
            self.returncode = self._proc.returncode
        if self._log is not None and self.returncode is not None:
            self._final_output = self._read_log(self._log)
            self._log.close()
            self._log = None
        return self.returncode

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @staticmethod
    def _read_log(log_file: IO[bytes]) -> str:
        # pread, not seek+read: the child shares this file description, and moving its offset while it
        # writes would make it overwrite earlier output.
        chunks = []
        offset = 0
        while chunk := os.pread(log_file.fileno(), 1 << 16, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks).decode("utf-8", "replace")

    @property
    def pid(self) -> int | None:
        """The back end's process id while it runs (tests read its /proc/PID/fd)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def output(self) -> str:
        """Everything the back end printed (so far, while it runs)."""
        if self._log is not None:
            return self._read_log(self._log)
        return self._final_output

    def close(self) -> None:
        """Stop the process and release the log file (same as :meth:`stop`, for ``contextlib.closing``)."""
        self.stop()

    def __enter__(self) -> Backend:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@contextlib.contextmanager
def socket_dir() -> Iterator[Path]:
    """A private temporary directory for the vhost-user socket, removed afterwards.

    It lives in /tmp, not under the repository, because AF_UNIX paths are limited to 107 bytes.
    """
    with tempfile.TemporaryDirectory(prefix="vgpu-lab-", dir="/tmp") as name:
        os.chmod(name, 0o700)
        yield Path(name)


@dataclasses.dataclass(frozen=True)
class BackendRun:
    """One boot against one back end: the guest's side and the back end's side."""

    guest: GuestRun
    backend_output: str
    backend_returncode: int | None


def run_with_backend(
    backend: str | Sequence[str],
    *,
    kernel: Path,
    initrd: Path,
    config: QemuConfig = QemuConfig(),
    timeout: float = 120.0,
    serial_log: Path | None = None,
    backend_env: Mapping[str, str] | None = None,
    backend_ready_timeout: float = 15.0,
) -> BackendRun:
    """Start the back end from its template, boot the guest against it, tear both down."""
    with socket_dir() as directory:
        sock = directory / "vgpu.sock"
        with Backend(backend, sock, ready_timeout=backend_ready_timeout, env=backend_env) as proc:
            guest = run_guest(
                kernel=kernel, initrd=initrd, socket_path=sock, config=config, timeout=timeout, serial_log=serial_log
            )
        return BackendRun(guest=guest, backend_output=proc.output, backend_returncode=proc.returncode)


__all__ = [
    "CHARDEV_ID",
    "DEFAULT_APPEND",
    "VHOST_USER_GPU_PCI",
    "VHOST_USER_TEST_DEVICE_GPU",
    "VIRTIO_GPU_CONFIG_SIZE",
    "Backend",
    "BackendRun",
    "GuestRun",
    "LabError",
    "QemuConfig",
    "qemu_command",
    "run_guest",
    "run_qemu",
    "run_with_backend",
    "socket_dir",
]
