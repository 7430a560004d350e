"""Running the lab's commands: one helper that logs each command and turns any failure into a
:class:`ProvisionError` naming the component, the bounds that keep a hung mirror from hanging CI, and the meters
that turn a long command's output into progress (:mod:`vgpu_lab.progress`): apt's status lines, or lines counted."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from vgpu_lab.progress import Progress

log = logging.getLogger("vgpu_lab")

# Generous bounds: they only stop a hung mirror from hanging CI forever.
APT_UPDATE_TIMEOUT = 600.0
APT_INSTALL_TIMEOUT = 1200.0
APT_DOWNLOAD_TIMEOUT = 1200.0
QUERY_TIMEOUT = 60.0
EXTRACT_TIMEOUT = 600.0


#: apt's machine-readable progress (``-o APT::Status-Fd=1``): ``dlstatus:N:PERCENT:what`` while downloading,
#: ``pmstatus:PACKAGE:PERCENT:what`` while dpkg unpacks and configures.
APT_PROGRESS = ("-o", "APT::Status-Fd=1")
_APT_STATUS = re.compile(r"^(dlstatus|pmstatus):[^:]*:([0-9.]+):(.*)$")


class ProvisionError(RuntimeError):
    """A lab component cannot be provisioned; the message names the component and the reason."""


def log_to_stderr(quiet: bool) -> None:
    """A lab command's log: ``vgpu-lab: ...`` lines on stderr, only warnings and errors when `quiet` (progress is
    shown either way)."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="vgpu-lab: %(message)s",
                        stream=sys.stderr)


def report(summary: Mapping[str, object], as_json: bool) -> None:
    """A lab command's result: JSON on stdout for tools, or a log line per item for a person."""
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            log.info("%s: %s", key, value)


#: What a meter does with one line of a command's output: advance the progress (or not).
Meter = Callable[[str, Progress], None]


def apt_meter(line: str, p: Progress) -> None:
    """apt's status lines as one 0-100 scale: downloading is the first half, dpkg's work the second."""
    m = _APT_STATUS.match(line)
    if m:
        percent = float(m.group(2))
        p.update(percent / 2 if m.group(1) == "dlstatus" else 50 + percent / 2, m.group(3))


def line_meter(pattern: str = "") -> Meter:
    """Each line matching `pattern` (every non-empty line by default) is one step, shown as the detail."""
    regex = re.compile(pattern) if pattern else None

    def meter(line: str, p: Progress) -> None:
        if line.strip() and (regex is None or regex.search(line)):
            p.advance(1, line)
    return meter


def run(
    cmd: Sequence[str],
    *,
    timeout: float,
    what: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    meter: Meter | None = None,
    total: float | None = None,
    output: IO[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, logging it; any failure or timeout becomes a :class:`ProvisionError` naming ``what``.

    With a `meter` the command's output (stdout and stderr together) is read as it comes and shown as the progress
    of ``what`` (out of `total` when known; apt's meter counts to 100), and also copied to `output` if given."""
    log.info("%s: $ %s", what, " ".join(cmd))
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    if meter is not None:
        return _run_metered(cmd, timeout=timeout, what=what, cwd=cwd, env=full_env, meter=meter, total=total,
                            output=output)
    try:
        proc = subprocess.run(
            list(cmd),
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ProvisionError(f"{what}: {cmd[0]} did not finish within {timeout:.0f} s") from exc
    except OSError as exc:
        raise ProvisionError(f"{what}: cannot run {cmd[0]}: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise ProvisionError(f"{what}: {' '.join(cmd)} exited with {proc.returncode}:\n{tail}")
    return proc


def _run_metered(cmd: Sequence[str], *, timeout: float, what: str, cwd: Path | None, env: Mapping[str, str],
                 meter: Meter, total: float | None, output: IO[str] | None) -> subprocess.CompletedProcess[str]:
    tail: deque[str] = deque(maxlen=25)
    try:
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
    except OSError as exc:
        raise ProvisionError(f"{what}: cannot run {cmd[0]}: {exc}") from exc
    # A watchdog instead of a read timeout: the command may print nothing for minutes and still be working.
    expired = threading.Event()

    def kill() -> None:
        expired.set()
        proc.kill()

    watchdog = threading.Timer(timeout, kill)
    watchdog.start()
    assert proc.stdout is not None
    with Progress(what, total) as progress:
        try:
            for line in proc.stdout:
                tail.append(line.rstrip("\n"))
                if output is not None:
                    output.write(line)
                meter(line.rstrip("\n"), progress)
            returncode = proc.wait()
        finally:
            watchdog.cancel()
            proc.stdout.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if expired.is_set():
            progress.finish("timed out")
            raise ProvisionError(f"{what}: {cmd[0]} did not finish within {timeout:.0f} s")
        if returncode != 0:
            progress.finish(f"failed (exit {returncode})")
            raise ProvisionError(f"{what}: {' '.join(cmd)} exited with {returncode}:\n" + "\n".join(tail))
    return subprocess.CompletedProcess(list(cmd), returncode, "\n".join(tail), "")
