"""Debian's arm64 packages for the guest, fetched without telling the host's dpkg about arm64.

Why a private apt state: ``dpkg --add-architecture arm64`` would change the machine for every later
``apt-get update`` (twice the lists) and for every other user of it.  apt can instead be pointed at lists, a
package cache and an (empty) status file of our own under ``<cache>/arm64/apt``, with ``APT::Architectures``
set to arm64; it still reads the machine's own sources (so the mirror is never named here) and checks the
archive signatures as usual.  ``apt-get download`` then fetches any arm64 package, never installing one.

What is fetched, all of one kernel build: ``linux-image-<abi>-arm64-unsigned`` (the kernel and its modules),
``linux-headers-<abi>-arm64`` + ``linux-headers-<abi>-common`` (to build our page-table module against it), and
``linux-kbuild-<abi>`` for *amd64* from the host's lists (the headers' ``scripts`` are host programs: fixdep,
modpost), plus ``busybox-static`` for arm64.  Everything is unpacked side by side into one directory, so the
headers' relative ``scripts`` link finds the kbuild tree; the one absolute path Debian writes (the headers'
``Makefile`` including ``/usr/src/<common>/Makefile``) is rewritten to the unpacked copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from vgpu_lab.apt_sources import source_files
from vgpu_lab.shell import APT_DOWNLOAD_TIMEOUT, APT_UPDATE_TIMEOUT, EXTRACT_TIMEOUT, QUERY_TIMEOUT, ProvisionError, run

log = logging.getLogger("vgpu_lab")

ARCH = "arm64"
KERNEL_SERIES = "6.12"
#: ``linux-image-6.12.118+deb12-arm64-unsigned`` -> ABI ``6.12.118+deb12``; point releases such as ``+deb12.1``.
_IMAGE_RE = re.compile(rf"^linux-image-({re.escape(KERNEL_SERIES)}\.(\d+)\+deb(\d+)(?:\.(\d+))?)-arm64-unsigned$")
#: Bump when the record's meaning changes, so older records are redone rather than trusted.
RECORD_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Arm64Kernel:
    """One arm64 kernel build, unpacked: what QEMU boots, its modules, the headers to build against, busybox."""

    abi: str
    version: str  # the Debian version every package of this build shares
    root: Path  # everything unpacked here
    busybox_version: str

    @property
    def release(self) -> str:
        return f"{self.abi}-{ARCH}"

    @property
    def image(self) -> Path:
        """The uncompressed arm64 ``Image`` (Debian names it vmlinuz); QEMU's ``-kernel`` boots it directly."""
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    @property
    def headers(self) -> Path:
        """The tree to run ``make -C`` in for an out-of-tree module."""
        return self.root / "usr" / "src" / f"linux-headers-{self.release}"

    @property
    def busybox(self) -> Path:
        return self.root / "bin" / "busybox"


class ArmApt:
    """apt, with its lists, cache and dpkg status under ``root`` and arm64 as the only architecture."""

    def __init__(self, root: Path, etc_apt: Path = Path("/etc/apt")) -> None:
        self.root = root
        self.etc_apt = etc_apt

    def options(self) -> list[str]:
        return ["-q", "-o", f"Dir::Etc={self.etc_apt}", "-o", f"Dir::State::Lists={self.root / 'lists'}",
                "-o", f"Dir::Cache={self.root / 'cache'}", "-o", f"Dir::State::status={self.root / 'status'}",
                "-o", f"APT::Architecture={ARCH}", "-o", f"APT::Architectures::={ARCH}",
                # _apt cannot write into a root-only cache; downloading as root is what we intend here.
                "-o", "APT::Sandbox::User=root"]

    def _sources_digest(self) -> str:
        digest = hashlib.sha256()
        for path in source_files(self.etc_apt):
            digest.update(str(path).encode() + b"\0" + path.read_bytes() + b"\0")
        return digest.hexdigest()

    def update(self, *, force: bool = False) -> bool:
        """``apt-get update`` into our lists when the machine's sources changed since the last one (or forced)."""
        stamp = self.root / "update.stamp"
        digest = self._sources_digest()
        if not force and stamp.is_file() and stamp.read_text().strip() == digest:
            return False
        for directory in (self.root / "lists" / "partial", self.root / "cache" / "archives" / "partial"):
            directory.mkdir(parents=True, exist_ok=True)
        (self.root / "status").touch()
        run(["apt-get", *self.options(), "update"], timeout=APT_UPDATE_TIMEOUT, what="arm64 (apt-get update)")
        stamp.write_text(digest + "\n")
        return True

    def names(self, prefix: str) -> list[str]:
        return run(["apt-cache", *self.options(), "pkgnames", prefix], timeout=QUERY_TIMEOUT,
                   what="arm64 (apt-cache)").stdout.split()

    def version(self, package: str) -> str | None:
        return candidate_version(["apt-cache", *self.options()], package)

    def download(self, packages: Sequence[str], dest: Path) -> None:
        run(["apt-get", *self.options(), "download", *packages], timeout=APT_DOWNLOAD_TIMEOUT,
            what="arm64 (apt-get download)", cwd=dest)


def candidate_version(apt_cache: Sequence[str], package: str) -> str | None:
    """The version apt would pick for ``package`` (``apt-cache show --no-all-versions``), or None if unknown."""
    try:
        out = run([*apt_cache, "show", "--no-all-versions", package], timeout=QUERY_TIMEOUT,
                  what="arm64 (apt-cache show)").stdout
    except ProvisionError:
        return None
    match = re.search(r"^Version: (\S+)$", out, re.MULTILINE)
    return match.group(1) if match else None


def select_abi(apt: ArmApt, host_apt_cache: Sequence[str] = ("apt-cache",)) -> tuple[str, str]:
    """The newest 6.12 arm64 build whose amd64 ``linux-kbuild`` the host's apt has at the same version: (abi, version).

    Both come from the same source upload, so a mirror caught between two uploads can name an image without its
    kbuild; the newest *complete* build wins.
    """
    builds = []
    for name in apt.names(f"linux-image-{KERNEL_SERIES}."):
        match = _IMAGE_RE.match(name)
        if match:
            builds.append(((int(match.group(2)), int(match.group(3)), int(match.group(4) or 0)), match.group(1)))
    for _, abi in sorted(builds, reverse=True):
        version = apt.version(f"linux-image-{abi}-{ARCH}-unsigned")
        if version is not None and candidate_version(host_apt_cache, f"linux-kbuild-{abi}") == version:
            return abi, version
    raise ProvisionError(f"arm64: no linux-image-{KERNEL_SERIES}.*-{ARCH}-unsigned with a matching amd64 "
                         f"linux-kbuild in the apt sources ({len(builds)} images seen)")


def _record(cache: Path) -> Path:
    return cache / "arm64" / "kernel.json"


def cached_arm64_kernel(cache: Path) -> Arm64Kernel | None:
    """The build unpacked earlier, if its record and files are intact."""
    try:
        data = json.loads(_record(cache).read_text())
        if data["format"] != RECORD_FORMAT:
            return None
        kernel = Arm64Kernel(abi=data["abi"], version=data["version"], root=Path(data["root"]),
                             busybox_version=data["busybox_version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    wanted = (kernel.image, kernel.busybox, kernel.headers / "Makefile", kernel.headers / "scripts" / "mod")
    if all(p.exists() for p in wanted) and kernel.modules_dir.is_dir():
        return kernel
    return None


def _point_makefile_at(headers: Path, unpacked: Path) -> None:
    """Debian's headers ``Makefile`` includes ``/usr/src/<common>/Makefile``: name the unpacked copy instead."""
    makefile = headers / "Makefile"
    text = makefile.read_text()
    fixed = re.sub(r"^include /usr/src/", f"include {unpacked}/usr/src/", text, flags=re.MULTILINE)
    if fixed == text:
        raise ProvisionError(f"arm64: {makefile} does not include /usr/src/...: {text.strip()[:200]!r}")
    makefile.write_text(fixed)


def fetch_arm64_kernel(cache: Path, apt: ArmApt, abi: str, version: str) -> Arm64Kernel:
    """Download the build ``abi`` at ``version``, unpack it into ``<cache>/arm64/kernel/`` and record it."""
    base = cache / "arm64" / "kernel"
    base.mkdir(parents=True, exist_ok=True)
    busybox_version = apt.version("busybox-static")
    if busybox_version is None:
        raise ProvisionError("arm64: apt knows no busybox-static for arm64")
    with tempfile.TemporaryDirectory(prefix="download-", dir=base) as tmp_name:
        tmp = Path(tmp_name)
        apt.download([f"linux-image-{abi}-{ARCH}-unsigned={version}", f"linux-headers-{abi}-{ARCH}={version}",
                      f"linux-headers-{abi}-common={version}", f"busybox-static={busybox_version}"], tmp)
        # The kbuild tools run on this host: the host's own architecture, from the host's own lists.
        run(["apt-get", "-q", "download", "-o", "APT::Sandbox::User=root", f"linux-kbuild-{abi}={version}"],
            timeout=APT_DOWNLOAD_TIMEOUT, what="arm64 (apt-get download linux-kbuild)", cwd=tmp)
        debs = sorted(tmp.glob("*.deb"))
        if len(debs) != 5:
            raise ProvisionError(f"arm64: expected 5 packages, got {[d.name for d in debs]}")
        final = base / f"{abi}_{re.sub(r'[^A-Za-z0-9.+~-]', '_', version)}"
        unpack = tmp / "root"
        for deb in debs:
            run(["dpkg", "-x", str(deb), str(unpack)], timeout=EXTRACT_TIMEOUT, what=f"arm64 (dpkg -x {deb.name})")
        # Rewritten for where the tree will live, before it moves there.
        _point_makefile_at(unpack / "usr" / "src" / f"linux-headers-{abi}-{ARCH}", final)
        if final.exists():
            shutil.rmtree(final)
        unpack.replace(final)
    kernel = Arm64Kernel(abi=abi, version=version, root=final, busybox_version=busybox_version)
    if not (kernel.image.is_file() and kernel.modules_dir.is_dir() and kernel.busybox.is_file()):
        raise ProvisionError(f"arm64: {final} lacks the image, its modules or busybox")
    record = _record(cache)
    tmp_record = record.with_name(record.name + ".tmp")
    tmp_record.write_text(json.dumps({"format": RECORD_FORMAT, "abi": abi, "version": version, "root": str(final),
                                      "busybox_version": busybox_version}, indent=2) + "\n")
    tmp_record.replace(record)
    log.info("arm64: kernel %s (%s) and busybox %s unpacked in %s", abi, version, busybox_version, final)
    return kernel
