"""Idempotent provisioning of everything the end-to-end lab needs, on a fresh Debian 12 machine.

Why this exists: CI starts from a machine on which nothing of the lab is installed, and the only network is the
Debian mirror named by the machine's own apt sources. Bookworm's QEMU 7.2 refuses vhost-user-gpu under TCG, so QEMU
must come from bookworm-backports (10.0.x); the guest kernel is the bookworm-backports 6.12 package, unpacked
(never installed) into a cache owned by the project. Every step first checks whether its result is already there,
so a warm run costs a few ``dpkg-query`` calls and file checks.

The mirror URI is read from the machine's apt sources at run time (deb822 ``debian.sources`` or a one-line
``sources.list``) and never written into the project.

Use as a library (``provision_qemu()``, ``provision_guest_kernel()``, ... return paths) or as a command::

    python -m vgpu_lab.provision [all|apt|qemu|busybox|toolchain|kernel|guest|qemu11 ...] [--cache DIR] [--json]

``qemu11`` (QEMU 11.1 in a sid chroot, see :mod:`vgpu_lab.sid`) is not part of ``all``: it costs about 50 s and
about 1 GB, and only the tests of the host-visible window need it; nor is ``arm64`` (the arm64 guest, see
:mod:`vgpu_lab.arm64`: the cross compiler, Debian's arm64 kernel and headers, about 40 s cold).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from vgpu_lab import guest, paths, sid
from vgpu_lab import weston as weston_lab
from vgpu_lab.apt_sources import debian_mirror, debian_mirror_uri, os_codename, read_apt_sources, source_files
from vgpu_lab.arm64.lab import Arm64Lab, provision_arm64
from vgpu_lab.guest_kernel import GuestKernel, cached_kernel, fetch_kernel, select_kernel_package
from vgpu_lab.shell import (
    APT_INSTALL_TIMEOUT,
    APT_PROGRESS,
    APT_UPDATE_TIMEOUT,
    QUERY_TIMEOUT,
    ProvisionError,
    apt_meter,
    log_to_stderr,
    report,
    run,
)

log = logging.getLogger("vgpu_lab")


QEMU_PACKAGES = ("qemu-system-x86", "qemu-system-gui", "qemu-system-common", "qemu-system-data")
#: QEMU 7.2 (bookworm) refuses vhost-user-gpu under TCG ("requires kvm"); 10.0 (backports) works.
QEMU_MIN_MAJOR = 10
QEMU_SYSTEM_X86_64 = Path("/usr/bin/qemu-system-x86_64")
#: QEMU's own C back end, shipped by qemu-system-gui: the reference peer our back end is compared with.
VHOST_USER_GPU = Path("/usr/lib/qemu/vhost-user-gpu")
BUSYBOX = Path("/bin/busybox")
TOOLCHAIN_PACKAGES = ("gcc", "libc6-dev", "linux-libc-dev")
#: A private D-Bus bus for ``-display dbus`` (QEMU 10's VNC cannot show a vhost-user-gpu console: it lacks the
#: dma-buf support QEMU demands of every display of that device) and ``dbus-send`` to call QEMU's console on it.
DBUS_PACKAGES = ("dbus-daemon", "dbus-bin")
DBUS_DAEMON = Path("/usr/bin/dbus-daemon")
DBUS_SEND = Path("/usr/bin/dbus-send")

DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
BACKPORTS_FILE_NAME = "vgpu-lab-backports.sources"
APT_LISTS = Path("/var/lib/apt/lists")

# --------------------------------------------------------------------------------------------------------------
# results


@dataclasses.dataclass(frozen=True)
class Qemu:
    """An installed QEMU able to run ``vhost-user-gpu-pci`` under TCG, and QEMU's own GPU back end."""

    system: Path
    vhost_user_gpu: Path
    package_version: str


@dataclasses.dataclass(frozen=True)
class Lab:
    """Everything a boot needs, as returned by :func:`provision_all`."""

    qemu: Qemu
    kernel: GuestKernel
    busybox: Path
    guest_programs: Mapping[str, Path]


# --------------------------------------------------------------------------------------------------------------
# helpers


def _version_major(version: str) -> int:
    """Major number of a Debian version string such as ``1:10.0.2+ds-1~bpo12+1``."""
    upstream = version.split(":", 1)[-1]
    match = re.match(r"\d+", upstream)
    return int(match.group()) if match else 0


def _ensure_cache_dir(path: Path) -> Path:
    """Create the cache with a ``.gitignore`` of ``*`` so its hundreds of MB can never be committed."""
    path.mkdir(parents=True, exist_ok=True)
    ignore = path / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# created by vgpu_lab.provision: everything here is a download or a build\n*\n")
    return path


# --------------------------------------------------------------------------------------------------------------
# the provisioner


class Provisioner:
    """Brings lab components into existence, each step idempotent and cheap when already done.

    One instance holds the cache location and the apt configuration paths (so tests can point it elsewhere);
    a file lock in the cache serialises concurrent provisioning runs (e.g. parallel test workers).
    """

    def __init__(
        self,
        cache: Path | None = None,
        *,
        etc_apt: Path = Path("/etc/apt"),
        apt_lists: Path = APT_LISTS,
    ) -> None:
        self.cache = _ensure_cache_dir(cache or paths.cache_dir())
        self.etc_apt = etc_apt
        self.apt_lists = apt_lists
        self._lock_depth = 0
        self._lock_fd: int | None = None
        self._updated_this_run = False

    # -- locking ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the cache lock; re-entrant within this object because flock is per open file."""
        if self._lock_depth == 0:
            fd = os.open(self.cache / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            self._lock_fd = fd
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    # -- apt ---------------------------------------------------------------------------------------------------

    def _require_root(self, what: str) -> None:
        if os.geteuid() != 0:
            raise ProvisionError(f"{what}: installing needs root (apt-get), and this process is not root")

    def backports_suite(self) -> str:
        return f"{os_codename()}-backports"

    def ensure_backports_source(self) -> Path | None:
        """Add a ``<codename>-backports`` source on the machine's own mirror unless one exists.

        Returns the file written, or ``None`` when an existing entry already names the suite.
        """
        suite = self.backports_suite()
        sources = read_apt_sources(self.etc_apt)
        if any(suite in s.suites and "deb" in s.types for s in sources):
            return None
        mirror = debian_mirror(sources, os_codename())
        signed_by = mirror.signed_by if mirror.signed_by and "\n" not in mirror.signed_by else DEBIAN_KEYRING
        self._require_root("apt sources")
        target = self.etc_apt / "sources.list.d" / BACKPORTS_FILE_NAME
        text = (
            "# Added by vgpu_lab.provision: QEMU 10 and the 6.12 guest kernel come from backports.\n"
            "Types: deb\n"
            f"URIs: {mirror.uris[0]}\n"
            f"Suites: {suite}\n"
            "Components: main\n"
            f"Signed-By: {signed_by}\n"
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(target)
        log.info("apt sources: wrote %s (%s %s main)", target, mirror.uris[0], suite)
        return target

    def _sources_digest(self) -> str:
        digest = hashlib.sha256()
        for path in source_files(self.etc_apt):
            digest.update(str(path).encode() + b"\0" + path.read_bytes() + b"\0")
        return digest.hexdigest()

    def _backports_lists_present(self) -> bool:
        suite = self.backports_suite()
        return any(self.apt_lists.glob(f"*_dists_{suite}_*Packages*"))

    def apt_update(self, *, force: bool = False) -> bool:
        """Run ``apt-get update`` when the sources changed since the last one or backports lists are missing.

        A stamp in the cache records the digest of the sources apt read, so repeated runs do not touch the
        network. Returns whether an update ran.
        """
        with self.locked():
            stamp = self.cache / "apt-update.stamp"
            digest = self._sources_digest()
            fresh = stamp.is_file() and stamp.read_text().strip() == digest and self._backports_lists_present()
            if fresh and not force:
                return False
            if force and self._updated_this_run:
                return False
            self._require_root("apt-get update")
            run(
                ["apt-get", "-q", "update", "-o", "DPkg::Lock::Timeout=300", *APT_PROGRESS],
                timeout=APT_UPDATE_TIMEOUT,
                what="apt-get update",
                meter=apt_meter,
                total=100,
            )
            stamp.write_text(digest + "\n")
            self._updated_this_run = True
            return True

    def ensure_apt(self) -> None:
        """Backports source present and package lists current."""
        with self.locked():
            self.ensure_backports_source()
            self.apt_update()

    def installed_versions(self, packages: Sequence[str]) -> dict[str, str]:
        """Versions of the given packages that dpkg reports fully installed (others are absent)."""
        try:
            proc = subprocess.run(
                ["dpkg-query", "-W", "-f=${Package}\t${db:Status-Abbrev}\t${Version}\n", *packages],
                capture_output=True,
                text=True,
                timeout=QUERY_TIMEOUT,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            # dpkg-query exits 1 for unknown packages (that is an answer); only not running at all is an error.
            raise ProvisionError(f"dpkg-query: cannot query {' '.join(packages)}: {exc}") from exc
        versions: dict[str, str] = {}
        for line in proc.stdout.splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[1].startswith("ii"):
                versions[parts[0].split(":", 1)[0]] = parts[2]
        return versions

    def apt_install(self, packages: Sequence[str], *, what: str, target_release: str | None = None) -> None:
        """Install packages (no recommends); on failure refresh the lists once and retry.

        A retry covers the common CI failure of a stale list naming a version the mirror no longer has.
        """
        self._require_root(what)
        self.ensure_apt()
        cmd = ["apt-get", "-q", "install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300",
               *APT_PROGRESS]
        if target_release:
            cmd += ["-t", target_release]
        cmd += list(packages)
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        label = f"{what}: apt-get install {' '.join(packages)}"
        try:
            run(cmd, timeout=APT_INSTALL_TIMEOUT, what=label, env=env, meter=apt_meter, total=100)
        except ProvisionError as first:
            if not self.apt_update(force=True):
                raise
            log.warning("%s: retrying after apt-get update (%s)", what, str(first).splitlines()[0])
            run(cmd, timeout=APT_INSTALL_TIMEOUT, what=label, env=env, meter=apt_meter, total=100)

    # -- components --------------------------------------------------------------------------------------------

    def qemu(self) -> Qemu:
        """QEMU ≥ 10 from backports with QEMU's own ``vhost-user-gpu`` back end."""
        with self.locked():
            versions = self.installed_versions(QEMU_PACKAGES)
            ok = (
                all(p in versions for p in QEMU_PACKAGES)
                and _version_major(versions["qemu-system-x86"]) >= QEMU_MIN_MAJOR
                and QEMU_SYSTEM_X86_64.is_file()
                and VHOST_USER_GPU.is_file()
            )
            if not ok:
                have = versions.get("qemu-system-x86", "not installed")
                log.info("qemu: qemu-system-x86 is %s; need >= %d from backports", have, QEMU_MIN_MAJOR)
                self.apt_install(QEMU_PACKAGES, what="qemu", target_release=self.backports_suite())
                versions = self.installed_versions(QEMU_PACKAGES)
            version = versions.get("qemu-system-x86", "")
            if _version_major(version) < QEMU_MIN_MAJOR:
                raise ProvisionError(
                    f"qemu: qemu-system-x86 {version or '(absent)'} is installed, need >= {QEMU_MIN_MAJOR}"
                )
            for path in (QEMU_SYSTEM_X86_64, VHOST_USER_GPU):
                if not path.is_file():
                    raise ProvisionError(f"qemu: {path} is missing after installing {' '.join(QEMU_PACKAGES)}")
            return Qemu(system=QEMU_SYSTEM_X86_64, vhost_user_gpu=VHOST_USER_GPU, package_version=version)

    def busybox(self) -> Path:
        """A statically linked busybox: it is the whole userland of the initramfs."""
        with self.locked():
            if "busybox-static" not in self.installed_versions(["busybox-static"]) or not BUSYBOX.is_file():
                self.apt_install(["busybox-static"], what="busybox")
            if not BUSYBOX.is_file():
                raise ProvisionError(f"busybox: {BUSYBOX} is missing after installing busybox-static")
            return BUSYBOX

    def dbus(self) -> tuple[Path, Path]:
        """``dbus-daemon`` and ``dbus-send``: a bus of our own for QEMU's D-Bus display, and a client to call it."""
        with self.locked():
            if not (DBUS_DAEMON.is_file() and DBUS_SEND.is_file()):
                self.apt_install(DBUS_PACKAGES, what="dbus")
            for path in (DBUS_DAEMON, DBUS_SEND):
                if not path.is_file():
                    raise ProvisionError(f"dbus: {path} is missing after installing {' '.join(DBUS_PACKAGES)}")
            return DBUS_DAEMON, DBUS_SEND

    def toolchain(self) -> Path:
        """gcc with a static libc and the kernel's UAPI headers, to build the static guest programs."""
        with self.locked():
            gcc = shutil.which("gcc")
            ok = gcc is not None and all(p in self.installed_versions(TOOLCHAIN_PACKAGES) for p in TOOLCHAIN_PACKAGES)
            if not ok:
                self.apt_install(TOOLCHAIN_PACKAGES, what="toolchain")
                gcc = shutil.which("gcc")
            if gcc is None:
                raise ProvisionError("toolchain: gcc is not on PATH after installing gcc")
            return Path(gcc)

    def guest_kernel(self) -> GuestKernel:
        """The 6.12 guest kernel, downloaded and unpacked once into ``<cache>/kernel``."""
        with self.locked():
            cached = cached_kernel(self.cache)
            if cached is not None:
                return cached
            self.ensure_apt()
            package = select_kernel_package(self.backports_suite())
            try:
                return fetch_kernel(self.cache, package)
            except ProvisionError as first:
                if not self.apt_update(force=True):
                    raise
                log.warning("kernel: retrying after apt-get update (%s)", str(first).splitlines()[0])
                return fetch_kernel(self.cache, select_kernel_package(self.backports_suite()))

    def guest_programs(self) -> dict[str, Path]:
        """Every static guest program, built into the cache (rebuilt only when its sources change)."""
        with self.locked():
            gcc = self.toolchain()
            try:
                return {name: guest.build_program(name, self.cache, gcc=gcc) for name in guest.program_names()}
            except guest.GuestBuildError as exc:
                raise ProvisionError(f"guest programs: {exc}") from exc

    def weston(self) -> weston_lab.Weston:
        """Debian's weston 10: the real Wayland compositor the display tests present to (headless, pixman)."""
        return weston_lab.provision_weston(self)

    def qemu11(self, root: Path | None = None) -> sid.SidQemu:
        """QEMU ≥ 11.1 in a sid chroot under the cache (``<cache>/sid``), for the generic vhost-user device."""
        return sid.provision_sid_qemu(self, root)

    def arm64(self) -> Arm64Lab:
        """The arm64 guest: QEMU 11.1's aarch64 emulator, Debian's arm64 6.12 kernel, its programs and module."""
        return provision_arm64(self)

    def all(self) -> Lab:
        """Everything the e2e tests need now."""
        with self.locked():
            return Lab(
                qemu=self.qemu(),
                kernel=self.guest_kernel(),
                busybox=self.busybox(),
                guest_programs=self.guest_programs(),
            )


# --------------------------------------------------------------------------------------------------------------
# module-level conveniences (each builds a default provisioner)


def provision_qemu(cache: Path | None = None) -> Qemu:
    """QEMU ≥ 10 and ``/usr/lib/qemu/vhost-user-gpu``, installed from backports when missing."""
    return Provisioner(cache).qemu()


def provision_guest_kernel(cache: Path | None = None) -> GuestKernel:
    """The 6.12 guest kernel unpacked in the cache."""
    return Provisioner(cache).guest_kernel()


def provision_busybox(cache: Path | None = None) -> Path:
    """Path of a static busybox."""
    return Provisioner(cache).busybox()


def provision_guest_programs(cache: Path | None = None) -> dict[str, Path]:
    """Name → path of every static guest program."""
    return Provisioner(cache).guest_programs()


def provision_all(cache: Path | None = None) -> Lab:
    """Everything at once."""
    return Provisioner(cache).all()


# --------------------------------------------------------------------------------------------------------------
# command line

COMPONENTS = ("apt", "qemu", "busybox", "toolchain", "kernel", "guest", "dbus", "weston")
#: Components only provisioned when named (not part of ``all``).
EXTRA_COMPONENTS = ("qemu11", "arm64")


def _summary(p: Provisioner, components: Sequence[str]) -> dict[str, object]:
    out: dict[str, object] = {"cache": str(p.cache)}
    for component in components:
        if component == "apt":
            p.ensure_apt()
            out["mirror"] = debian_mirror_uri(p.etc_apt)
        elif component == "qemu":
            q = p.qemu()
            out["qemu"] = {
                "system": str(q.system),
                "vhost_user_gpu": str(q.vhost_user_gpu),
                "package_version": q.package_version,
            }
        elif component == "busybox":
            out["busybox"] = str(p.busybox())
        elif component == "dbus":
            daemon, send = p.dbus()
            out["dbus"] = {"daemon": str(daemon), "send": str(send)}
        elif component == "weston":
            w = p.weston()
            out["weston"] = {"path": str(w.path), "version": w.version}
        elif component == "toolchain":
            out["gcc"] = str(p.toolchain())
        elif component == "kernel":
            k = p.guest_kernel()
            out["kernel"] = {
                "package": k.package,
                "package_version": k.package_version,
                "release": k.release,
                "vmlinuz": str(k.vmlinuz),
                "modules_dir": str(k.modules_dir),
            }
        elif component == "guest":
            out["guest_programs"] = {name: str(path) for name, path in p.guest_programs().items()}
        elif component == "qemu11":
            started = time.monotonic()
            s = p.qemu11()
            out["qemu11"] = {
                "root": str(s.root),
                "system": str(s.system),
                "version": s.version,
                "package_version": s.package_version,
                "seconds": round(time.monotonic() - started, 3),
            }
        elif component == "arm64":
            started = time.monotonic()
            a = p.arm64()
            out["arm64"] = {
                "qemu": str(a.qemu.system_aarch64),
                "kernel": {"abi": a.kernel.abi, "version": a.kernel.version, "image": str(a.kernel.image)},
                "programs": {name: str(path) for name, path in a.programs.items()},
                "pte_module": str(a.pte_module),
                "seconds": round(time.monotonic() - started, 3),
            }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vgpu_lab.provision``: provision components, print where they are."""
    parser = argparse.ArgumentParser(
        prog="python -m vgpu_lab.provision",
        description="Provision the vgpu end-to-end lab (QEMU 10, 6.12 guest kernel, busybox, guest programs).",
    )
    parser.add_argument(
        "components",
        nargs="*",
        choices=(*COMPONENTS, *EXTRA_COMPONENTS, "all"),
        default=["all"],
        metavar="COMPONENT",
        help=f"one or more of {', '.join((*COMPONENTS, *EXTRA_COMPONENTS))}, or all (default: all but "
        f"{', '.join(EXTRA_COMPONENTS)})",
    )
    parser.add_argument("--cache", type=Path,
                        help=f"cache directory (default ${paths.ENV_CACHE} or ${paths.ENV_ROOT}/.cache/lab)")
    parser.add_argument("--json", action="store_true", help="print the resulting paths as JSON on stdout")
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    args = parser.parse_args(argv)
    log_to_stderr(args.quiet)
    wanted: list[str] = []
    for component in args.components:
        for c in COMPONENTS if component == "all" else (component,):
            if c not in wanted:
                wanted.append(c)
    try:
        provisioner = Provisioner(args.cache)
        with provisioner.locked():
            summary = _summary(provisioner, wanted)
    except ProvisionError as exc:
        print(f"vgpu-lab: cannot provision: {exc}", file=sys.stderr)
        return 1
    report(summary, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
