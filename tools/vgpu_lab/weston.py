"""A real Wayland compositor for the tests and benchmarks: Debian's weston, headless, started privately.

Why weston 10 (bookworm) and these flags (measured in ../shared/reference/wayland-lab.md): the headless back end
needs no GPU, seat or DRM node; its default renderer draws nothing, so ``--use-pixman``; capture goes through
weston's own ``weston_screenshooter`` protocol, which weston 11 replaced, and which weston serves only with
``--debug``.  Every compositor gets its own XDG_RUNTIME_DIR (mode 0700, in a temporary directory), so tests never
meet the user's session or each other, and a config with no panel, animations, fades or locking, and a solid
background, so a capture shows exactly the windows.

Provisioning: ``apt-get install weston`` from the machine's own mirror (the bookworm suite: backports has
weston 14, without the screenshooter), as root, through the lab's provisioner.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import IO, Final, Protocol

from vgpu_lab.shell import QUERY_TIMEOUT, ProvisionError, run

WESTON = Path("/usr/bin/weston")
WESTON_PACKAGES: Final = ("weston",)
HEADLESS_BACKEND: Final = Path("/usr/lib/x86_64-linux-gnu/libweston-10/headless-backend.so")
#: The last weston with the weston_screenshooter protocol our capture client speaks.
WESTON_MAX_MAJOR: Final = 10
#: 0xAARRGGBB: a background no pattern pixel of the guest programs has (their alpha is 0xff, this blue is odd).
BACKGROUND: Final = 0xFF336699
START_TIMEOUT: Final = 20.0


class Provisioner(Protocol):
    """What installing weston needs of :class:`vgpu_lab.provision.Provisioner` (which builds on this module, so
    the dependency is named by shape, not imported)."""

    def locked(self) -> AbstractContextManager[None]: ...

    def installed_versions(self, packages: Sequence[str]) -> dict[str, str]: ...

    def apt_install(self, packages: Sequence[str], *, what: str, target_release: str | None = None) -> None: ...


@dataclasses.dataclass(frozen=True)
class Weston:
    path: Path
    version: str


def weston_version(path: Path = WESTON) -> str:
    out = run([str(path), "--version"], timeout=QUERY_TIMEOUT, what="weston").stdout
    match = re.search(r"weston (\d+\.\d+\.\d+)", out)
    if not match:
        raise ProvisionError(f"weston: cannot read a version in {out!r}")
    return match.group(1)


def provision_weston(p: Provisioner) -> Weston:
    """weston from the machine's Debian suite, installed once (idempotent: a dpkg query when present)."""
    with p.locked():
        if "weston" not in p.installed_versions(WESTON_PACKAGES) or not WESTON.is_file():
            p.apt_install(WESTON_PACKAGES, what="weston")
        for path in (WESTON, HEADLESS_BACKEND):
            if not path.is_file():
                raise ProvisionError(f"weston: {path} is missing after installing weston")
        version = weston_version()
        if int(version.split(".")[0]) > WESTON_MAX_MAJOR:
            raise ProvisionError(f"weston: {version} has no weston_screenshooter (gone after {WESTON_MAX_MAJOR})")
        return Weston(WESTON, version)


def config_text(repaint_window: int | None = None) -> str:
    core = f"repaint-window={repaint_window}\n" if repaint_window is not None else ""
    return (
        "[core]\nidle-time=0\n" + core
        + f"[shell]\nbackground-color={BACKGROUND:#010x}\npanel-position=none\nlocking=false\n"
        "animation=none\nclose-animation=none\nstartup-animation=none\nfocus-animation=none\n"
    )


class HeadlessWeston:
    """weston --backend=headless-backend.so --use-pixman --debug on a private socket, stopped deterministically.

    ``env`` is what a client needs to find it (XDG_RUNTIME_DIR, WAYLAND_DISPLAY)."""

    def __init__(self, weston: Path = WESTON, *, width: int = 1920, height: int = 1080,
                 repaint_window: int | None = None, name: str = "wl-vgpu") -> None:
        self.weston = weston
        self.width, self.height = width, height
        self.name = name
        self._tmp = tempfile.TemporaryDirectory(prefix="vgpu-weston-")
        self.runtime_dir = Path(self._tmp.name)
        os.chmod(self.runtime_dir, 0o700)
        self.config = self.runtime_dir / "weston.ini"
        self.config.write_text(config_text(repaint_window))
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.output_log = ""

    @property
    def socket_path(self) -> Path:
        return self.runtime_dir / self.name

    @property
    def env(self) -> dict[str, str]:
        return {"XDG_RUNTIME_DIR": str(self.runtime_dir), "WAYLAND_DISPLAY": self.name}

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def start(self) -> HeadlessWeston:
        self._log = tempfile.TemporaryFile(prefix="vgpu-weston-log-")  # noqa: SIM115 (closed in stop)
        env = {**os.environ, **self.env}
        env.pop("DISPLAY", None)
        self._proc = subprocess.Popen(
            [str(self.weston), "--backend=headless-backend.so", "--use-pixman", "--debug", "--idle-time=0",
             f"--socket={self.name}", f"--width={self.width}", f"--height={self.height}",
             f"--config={self.config}"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ProvisionError(f"weston did not start:\n{self.output_log}")
            time.sleep(0.02)
        return self

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.socket_path))
            except OSError:
                return False
        return True

    def output(self) -> str:
        if self._log is None:
            return self.output_log
        return os.pread(self._log.fileno(), 1 << 20, 0).decode("utf-8", "replace")

    def pause(self) -> None:
        """SIGSTOP: a compositor that accepts connections and never answers (the hang a client must survive)."""
        os.killpg(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._log is not None:
            self.output_log = self.output()
            self._log.close()
            self._log = None
        self._tmp.cleanup()

    def __enter__(self) -> HeadlessWeston:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
