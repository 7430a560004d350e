"""Static C programs that run inside the lab guest, built on the host into the lab cache.

Why C and static: the guest's userland is only busybox, so a test program must carry its own libc; and the
ioctls it exercises are the driver's real user ABI, which is best driven the way real clients drive it. Each
``<name>.c`` in this directory is one program; the headers here (``*.h``) are shared, and so are the checkout's
``spec/*.h`` (the proposed ``DMA_BUF_IOCTL_INFO`` UAPI, ``spec/dma-buf-info.h``: one copy, which the layout checks
read too). A build is keyed by a hash of every source file and the compiler command, so an unchanged program is
never rebuilt and a changed header rebuilds everything.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from vgpu_lab import paths

log = logging.getLogger("vgpu_lab")

SOURCE_DIR = Path(__file__).resolve().parent
CFLAGS = ("-static", "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror")
BUILD_TIMEOUT = 300.0


class GuestBuildError(RuntimeError):
    """A guest program failed to compile; the message carries the compiler's diagnostics."""


def program_names() -> list[str]:
    """Every guest program, by the name of its ``.c`` file."""
    return sorted(p.stem for p in SOURCE_DIR.glob("*.c"))


def include_dirs() -> list[Path]:
    """Where the programs' headers are: beside them, and the checkout's ``spec/``."""
    return [SOURCE_DIR, paths.project_root() / "spec"]


def source_digest(name: str, gcc: Path) -> str:
    """Hash of the program's source, all shared headers and the exact compiler command."""
    digest = hashlib.sha256()
    digest.update(" ".join((str(gcc), *CFLAGS)).encode() + b"\0")
    headers = sorted((h for d in include_dirs() for h in d.glob("*.h")), key=lambda h: h.name)
    for path in [SOURCE_DIR / f"{name}.c", *headers]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_program(name: str, cache: Path, *, gcc: Path | None = None) -> Path:
    """Compile ``<name>.c`` with ``gcc -static -O2`` into ``<cache>/guest/<name>-<hash>`` unless already there.

    The binary is written under a temporary name and renamed, so a concurrent reader never sees half a file.
    """
    source = SOURCE_DIR / f"{name}.c"
    if not source.is_file():
        raise GuestBuildError(f"guest program {name!r}: no {source}")
    compiler = gcc or Path(shutil.which("gcc") or "gcc")
    out_dir = cache / "guest"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}-{source_digest(name, compiler)}"
    if target.is_file():
        return target
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}-", dir=out_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        includes = [word for d in include_dirs() for word in ("-I", str(d))]
        cmd = [str(compiler), *CFLAGS, *includes, "-o", str(tmp), str(source)]
        log.info("guest: $ %s", " ".join(cmd))
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False, stdin=subprocess.DEVNULL
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise GuestBuildError(f"guest program {name!r}: cannot run {compiler}: {exc}") from exc
        if proc.returncode != 0:
            raise GuestBuildError(f"guest program {name!r} failed to compile:\n{proc.stderr.strip()}")
        tmp.chmod(0o755)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    # Other versions stay: checkouts with other sources share this cache and use theirs at the same time (deleting
    # them failed another checkout's boot mid-test). Each is about 1 MB.
    return target
