"""Running the lab's commands: one helper that logs each command and turns any failure into a
:class:`ProvisionError` naming the component, and the bounds that keep a hung mirror from hanging CI."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger("vgpu_lab")

# Generous bounds: they only stop a hung mirror from hanging CI forever.
APT_UPDATE_TIMEOUT = 600.0
APT_INSTALL_TIMEOUT = 1200.0
APT_DOWNLOAD_TIMEOUT = 1200.0
QUERY_TIMEOUT = 60.0
EXTRACT_TIMEOUT = 600.0


class ProvisionError(RuntimeError):
    """A lab component cannot be provisioned; the message names the component and the reason."""


def run(
    cmd: Sequence[str],
    *,
    timeout: float,
    what: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, logging it; any failure or timeout becomes a :class:`ProvisionError` naming ``what``."""
    log.info("%s: $ %s", what, " ".join(cmd))
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
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
