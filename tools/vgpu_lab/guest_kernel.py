"""The guest kernel: the newest Debian 6.12 image apt knows, downloaded and unpacked (never installed) into the
lab's cache, with a record so a warm run finds it again."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from vgpu_lab.shell import (
    APT_DOWNLOAD_TIMEOUT,
    APT_PROGRESS,
    EXTRACT_TIMEOUT,
    QUERY_TIMEOUT,
    ProvisionError,
    apt_meter,
    line_meter,
    run,
)

log = logging.getLogger("vgpu_lab")

#: Environment variable that pins the guest kernel package name instead of picking the newest 6.12 image.
ENV_KERNEL_PACKAGE = "VGPU_LAB_KERNEL_PACKAGE"
#: The guest kernel family: 6.12 has udmabuf and the system dma-heap built in, virtio-gpu and vgem as modules.
KERNEL_SERIES = "6.12"


@dataclasses.dataclass(frozen=True)
class GuestKernel:
    """A Debian kernel package unpacked into the cache: what QEMU boots and where its modules are."""

    package: str
    package_version: str
    release: str
    root: Path
    vmlinuz: Path

    @property
    def modules_dir(self) -> Path:
        """``<root>/lib/modules/<release>``: the tree the initramfs builder takes modules from."""
        return self.root / "lib" / "modules" / self.release


def _record(cache: Path) -> Path:
    return cache / "kernel" / "kernel.json"


def cached_kernel(cache: Path) -> GuestKernel | None:
    """The kernel unpacked earlier, if its record and files are intact (and it is the pinned package)."""
    record = _record(cache)
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
        kernel = GuestKernel(
            package=data["package"],
            package_version=data["package_version"],
            release=data["release"],
            root=Path(data["root"]),
            vmlinuz=Path(data["vmlinuz"]),
        )
    except (ValueError, KeyError, TypeError):
        log.warning("kernel: ignoring unreadable %s", record)
        return None
    pinned = os.environ.get(ENV_KERNEL_PACKAGE)
    if pinned and pinned != kernel.package:
        return None
    if kernel.vmlinuz.is_file() and kernel.modules_dir.is_dir():
        return kernel
    return None

def select_kernel_package(backports_suite: str) -> str:
    """The newest ``linux-image-6.12.*-amd64`` apt knows, preferring the unsigned image.

    The unsigned package holds the same kernel and modules without the signed-shim plumbing. Both
    bookworm-backports and bookworm-security carry Debian's 6.12 for bookworm (same config: udmabuf and the
    system heap built in, virtio-gpu and vgem as modules); the newest wins, which is also the version
    ``linux-source-6.12`` builds a patched kernel from. ``$VGPU_LAB_KERNEL_PACKAGE`` pins a name instead.
    """
    pinned = os.environ.get(ENV_KERNEL_PACKAGE)
    if pinned:
        return pinned
    series = re.escape(KERNEL_SERIES)
    pattern = re.compile(rf"^linux-image-{series}\.(\d+)(?:\+deb\d+)?(?:-(\d+))?-amd64(-unsigned)?$")
    names = run(
        ["apt-cache", "pkgnames", f"linux-image-{KERNEL_SERIES}."],
        timeout=QUERY_TIMEOUT,
        what="kernel",
    ).stdout.split()
    candidates: list[tuple[tuple[int, int, int], str]] = []
    for name in names:
        match = pattern.match(name)
        if match:
            rank = (int(match.group(1)), int(match.group(2) or 0), 1 if match.group(3) else 0)
            candidates.append((rank, name))
    if not candidates:
        raise ProvisionError(
            f"kernel: apt knows no linux-image-{KERNEL_SERIES}.*-amd64 package "
            f"(is {backports_suite} in the apt sources?)"
        )
    return max(candidates)[1]

def fetch_kernel(cache: Path, package: str) -> GuestKernel:
    """Download ``package`` with apt, unpack it into ``<cache>/kernel`` and record it."""
    kernel_dir = cache / "kernel"
    kernel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="download-", dir=kernel_dir) as tmp_name:
        tmp = Path(tmp_name)
        # _apt cannot write into a root-only cache; downloading as root is what we intend here.
        run(
            ["apt-get", "-q", "download", "-o", "APT::Sandbox::User=root", *APT_PROGRESS, package],
            timeout=APT_DOWNLOAD_TIMEOUT,
            what=f"kernel: download {package}",
            cwd=tmp,
            meter=apt_meter,
            total=100,
        )
        debs = sorted(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise ProvisionError(f"kernel: expected one .deb from apt-get download {package}, got {debs}")
        version = run(
            ["dpkg-deb", "-f", str(debs[0]), "Version"], timeout=QUERY_TIMEOUT, what="kernel"
        ).stdout.strip()
        unpack = tmp / "root"
        # --vextract names each file as it goes: the count of files unpacked is the progress.
        run(["dpkg-deb", "--vextract", str(debs[0]), str(unpack)], timeout=EXTRACT_TIMEOUT,
            what=f"kernel: unpack {debs[0].name} (files)", meter=line_meter())
        releases = sorted(p.name for p in (unpack / "lib" / "modules").glob("*") if p.is_dir())
        if len(releases) != 1:
            raise ProvisionError(f"kernel: {package} holds {len(releases)} module trees, expected one")
        release = releases[0]
        if not (unpack / "boot" / f"vmlinuz-{release}").is_file():
            raise ProvisionError(f"kernel: {package} has no boot/vmlinuz-{release}")
        safe_version = re.sub(r"[^A-Za-z0-9.+~-]", "_", version)
        final = kernel_dir / f"{package}_{safe_version}"
        if final.exists():
            shutil.rmtree(final)
        unpack.replace(final)
    kernel = GuestKernel(
        package=package,
        package_version=version,
        release=release,
        root=final,
        vmlinuz=final / "boot" / f"vmlinuz-{release}",
    )
    record = _record(cache)
    tmp_record = record.with_name(record.name + ".tmp")
    tmp_record.write_text(
        json.dumps(
            {
                "package": kernel.package,
                "package_version": kernel.package_version,
                "release": kernel.release,
                "root": str(kernel.root),
                "vmlinuz": str(kernel.vmlinuz),
            },
            indent=2,
        )
        + "\n"
    )
    tmp_record.replace(record)
    log.info("kernel: %s %s (release %s) unpacked in %s", package, version, release, final)
    return kernel
