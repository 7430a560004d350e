"""What the arm64 guest runs that we build: the guest programs (cross-compiled, static) and ``vgpu_pte.ko``.

``vgpu_pte.ko`` is built against the unpacked Debian headers of the very kernel the guest boots (same vermagic,
same ``Module.symvers``), so the stock kernel loads it; it is unsigned, which only taints a kernel that does not
enforce signatures (Debian's does not, without Secure Boot lockdown).  A build is keyed by a hash of the source,
the kernel build and the compiler, and lands in ``<cache>/arm64/guest/`` under a temporary name first, so an
unchanged module is never rebuilt and a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from vgpu_lab import guest
from vgpu_lab.initramfs import modinfo
from vgpu_lab.shell import QUERY_TIMEOUT, ProvisionError, run

from .packages import Arm64Kernel

log = logging.getLogger("vgpu_lab")

CROSS_PREFIX = "aarch64-linux-gnu-"
CROSS_GCC = f"{CROSS_PREFIX}gcc"
MODULE_SOURCE = Path(__file__).resolve().parent / "vgpu_pte.c"
MODULE_BUILD_TIMEOUT = 600.0


def guest_dir(cache: Path) -> Path:
    """Where arm64 builds live: apart from the x86 ones, which the guest program builder prunes by name."""
    return cache / "arm64"


def guest_program(name: str, cache: Path, gcc: Path) -> Path:
    """A static arm64 build of ``tools/vgpu_lab/guest/<name>.c``."""
    try:
        return guest.build_program(name, guest_dir(cache), gcc=gcc)
    except guest.GuestBuildError as exc:
        raise ProvisionError(f"arm64 guest programs: {exc}") from exc


def pte_module(cache: Path, kernel: Arm64Kernel, gcc: Path) -> Path:
    """``vgpu_pte.ko`` for ``kernel``, built once."""
    compiler = run([str(gcc), "--version"], timeout=QUERY_TIMEOUT, what="arm64 (gcc --version)").stdout
    digest = hashlib.sha256()
    for part in (MODULE_SOURCE.read_bytes(), kernel.release.encode(), kernel.version.encode(), compiler.encode()):
        digest.update(part + b"\0")
    out_dir = guest_dir(cache) / "guest"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"vgpu_pte-{digest.hexdigest()[:16]}.ko"
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="vgpu_pte-", dir=out_dir) as tmp_name:
        build = Path(tmp_name)
        shutil.copy(MODULE_SOURCE, build / MODULE_SOURCE.name)
        (build / "Kbuild").write_text("obj-m := vgpu_pte.o\n")
        cross = str(gcc)[: -len("gcc")] if str(gcc).endswith("gcc") else CROSS_PREFIX
        # BTF for modules needs pahole and the vmlinux BTF; a test module does without.
        run(["nice", "-n", "10", "make", "-s", "-C", str(kernel.headers), f"M={build}", "ARCH=arm64",
             f"CROSS_COMPILE={cross}", "CONFIG_DEBUG_INFO_BTF_MODULES=", "modules"],
            timeout=MODULE_BUILD_TIMEOUT, what="arm64 (build vgpu_pte.ko)")
        built = build / "vgpu_pte.ko"
        vermagic = modinfo(built.read_bytes()).get("vermagic", [""])[0]
        if not vermagic.startswith(kernel.release + " "):
            raise ProvisionError(f"arm64: vgpu_pte.ko has vermagic {vermagic!r}, the kernel is {kernel.release}")
        fd, partial = tempfile.mkstemp(prefix=".vgpu_pte-", dir=out_dir)
        os.close(fd)
        shutil.copy(built, partial)
        Path(partial).replace(target)
    for stale in out_dir.glob("vgpu_pte-*.ko"):
        if stale != target:
            stale.unlink(missing_ok=True)
    log.info("arm64: built %s", target)
    return target
