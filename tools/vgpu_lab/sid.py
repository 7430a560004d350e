"""QEMU 11.1 from Debian sid, in a chroot the project builds itself, and a wrapper that runs it there.

Why a chroot: QEMU 11.1 is the first QEMU with vhost-user shared memory (``GET_SHMEM_CONFIG``, ``SHMEM_MAP``), and
its generic ``vhost-user-test-device-pci`` is the only way here to give a guest the host-visible window our blob
resources live in. Debian builds it only for sid, against a glibc bookworm does not have, so it cannot be installed
on the host; ``debootstrap --variant=minbase sid`` into the project cache and an ``apt-get install`` inside it give
a working QEMU 11.1 in about a minute, with nothing outside the cache touched but the host's ``debootstrap``
package.

Why a private mount namespace: QEMU inside the chroot needs ``/dev`` and ``/proc`` and must see the socket, kernel
and initrd at the paths it is given. Every mount is made inside ``unshare --mount --propagation private``, so it
disappears with the process — an interrupted or killed run can never leave mounts behind on the host (which would
also make removing the cache dangerous). The same applies to ``debootstrap`` itself, which mounts ``/proc`` and
``/sys`` in its target while it runs.

Idempotence: a record (``<root>.json``) is written only after QEMU has been installed and checked, so a first run
that was interrupted anywhere is detected and redone (a half-made root is removed, after checking that nothing is
mounted under it); a warm run reads the record and checks two files — a few milliseconds.

The mirror URI is read from the host's apt sources at run time (:func:`vgpu_lab.provision.debian_mirror_uri`);
only the chroot's own apt configuration, written by ``debootstrap`` inside the cache, names it.

Use as a library (:meth:`vgpu_lab.provision.Provisioner.qemu11`, :meth:`SidQemu.config`) or via
``python -m vgpu_lab.provision qemu11``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from vgpu_lab.apt_sources import debian_mirror_uri
from vgpu_lab.qemu import VHOST_USER_TEST_DEVICE_GPU, QemuConfig
from vgpu_lab.shell import APT_PROGRESS, Meter, ProvisionError, apt_meter, line_meter, run


class Provisioner(Protocol):
    """What building the chroot needs of :class:`vgpu_lab.provision.Provisioner` (which builds on this module, so the
    dependency is named by shape, not imported)."""

    cache: Path
    etc_apt: Path

    def locked(self) -> AbstractContextManager[None]: ...

    def apt_install(self, packages: Sequence[str], *, what: str, target_release: str | None = None) -> None: ...

log = logging.getLogger("vgpu_lab")

SUITE = "sid"
#: What QEMU 11.1 needs in the chroot: the x86 system emulator, (for parity with the host lab) the GUI/back-end
#: package that ships QEMU's own ``vhost-user-gpu``, and the arm emulators for the arm64 guest
#: (:mod:`vgpu_lab.arm64`), whose memory types are where map_info matters most.
SID_PACKAGES = ("qemu-system-x86", "qemu-system-gui", "qemu-system-arm")
#: The first QEMU with vhost-user shared memory (``VHOST_USER_PROTOCOL_F_SHMEM``).
QEMU11_MIN_VERSION = (11, 1)
#: The generic device that sizes a shared-memory BAR from the back end's GET_SHMEM_CONFIG.
GENERIC_DEVICE = "vhost-user-test-device-pci"
#: Paths inside the chroot.
QEMU_IN_CHROOT = Path("/usr/bin/qemu-system-x86_64")
QEMU_AARCH64_IN_CHROOT = Path("/usr/bin/qemu-system-aarch64")
VHOST_USER_GPU_IN_CHROOT = Path("/usr/lib/qemu/vhost-user-gpu")
#: Bump when the record's meaning changes, so older records are redone rather than trusted.
RECORD_FORMAT = 1

DEBOOTSTRAP = "debootstrap"
DEBOOTSTRAP_TIMEOUT = 1800.0
CHROOT_APT_TIMEOUT = 1800.0
CHROOT_QUERY_TIMEOUT = 120.0

_QEMU_VERSION_RE = re.compile(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?")


@dataclasses.dataclass(frozen=True)
class SidQemu:
    """QEMU ≥ 11.1 installed in a sid chroot; :meth:`command_prefix` runs a command inside it."""

    root: Path
    version: str
    package_version: str
    #: Paths as seen inside the chroot (what a command run through :meth:`command_prefix` names).
    system: Path = QEMU_IN_CHROOT
    vhost_user_gpu: Path = VHOST_USER_GPU_IN_CHROOT
    system_aarch64: Path = QEMU_AARCH64_IN_CHROOT

    def command_prefix(self, binds: Sequence[Path] = ()) -> tuple[str, ...]:
        """argv words that run the words appended after them inside the chroot, in a private mount namespace.

        ``binds`` are host directories bind-mounted at the same path inside the chroot (the socket directory, the
        kernel and initrd directories, an output directory): QEMU opens the paths it is given inside the chroot.
        The chroot's ``/tmp`` is a fresh tmpfs, so mount points for binds under ``/tmp`` leave nothing behind;
        mount points elsewhere are created as empty directories inside the chroot once. ``unshare`` and ``chroot``
        exec, so the process the caller started *is* QEMU (its exit status, its signals).
        """
        return namespace_prefix(self.root, binds)

    def config(
        self,
        binds: Sequence[Path],
        *,
        device: str | None = VHOST_USER_TEST_DEVICE_GPU,
        extra_args: Sequence[str] = (),
        memory_mib: int = 512,
        env: Mapping[str, str] | None = None,
    ) -> QemuConfig:
        """A :class:`QemuConfig` that boots with this QEMU (the generic vhost-user device by default)."""
        return QemuConfig(
            qemu=self.system,
            memory_mib=memory_mib,
            device=device,
            extra_args=tuple(extra_args),
            command_prefix=self.command_prefix(binds),
            env=env,
        )


def namespace_prefix(root: Path, binds: Sequence[Path] = ()) -> tuple[str, ...]:
    """``unshare --mount --propagation private sh -c SCRIPT vgpu-sid`` + the caller's words as ``"$@"``.

    The script mounts ``/dev`` (recursively: QEMU needs ``/dev/null``, ``/dev/urandom``, ``/dev/shm``), ``/proc``,
    a tmpfs on ``/tmp``, the host's ``resolv.conf`` (for apt) and each bind, then ``exec chroot ROOT "$@"``.
    ``set -e`` makes a failed mount end the run before QEMU starts, with ``mount``'s message on stderr.
    """
    r = shlex.quote(str(root))
    lines = [
        "set -e",
        f"mount --rbind /dev {r}/dev",
        f"mount -t proc proc {r}/proc",
        f"mount -t tmpfs -o mode=1777 tmpfs {r}/tmp",
        f"if [ -f /etc/resolv.conf ] && [ -e {r}/etc/resolv.conf ]; then mount --bind /etc/resolv.conf "
        f"{r}/etc/resolv.conf; fi",
    ]
    # Parents before children, so a nested bind lands on top of its parent's.
    for host in sorted({Path(os.path.abspath(b)) for b in binds}, key=lambda p: len(p.parts)):
        inside = shlex.quote(f"{root}{host}")
        lines.append(f"mkdir -p {inside}")
        lines.append(f"mount --bind {shlex.quote(str(host))} {inside}")
    lines.append(f'exec chroot {r} "$@"')
    return ("unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(lines), "vgpu-sid")


# --------------------------------------------------------------------------------------------------------------
# provisioning


def default_root(cache: Path) -> Path:
    """``<cache>/sid`` (the lab cache: :func:`vgpu_lab.paths.cache_dir`)."""
    return cache / SUITE


def _record_path(root: Path) -> Path:
    return root.with_name(root.name + ".json")


def parse_qemu_version(text: str) -> tuple[int, int, int]:
    """``QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1)`` → ``(11, 1, 3)``."""
    match = _QEMU_VERSION_RE.search(text)
    if not match:
        raise ProvisionError(f"qemu11: cannot read a version from {text.strip()[:200]!r}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def mounts_under(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> list[str]:
    """Mount points at or below ``path`` in this process's namespace (mountinfo field 5, octal escapes decoded)."""
    prefix = str(path.resolve()) if path.exists() else str(path)
    found = []
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found


def _remove_root(root: Path) -> None:
    """Remove a half-made chroot, but never through a mount (a bound /dev or /proc would be destroyed)."""
    if not root.exists() and not root.is_symlink():
        return
    mounted = mounts_under(root)
    if mounted:
        raise ProvisionError(
            f"qemu11: {root} is incomplete but has mounts under it ({', '.join(mounted)}); "
            "unmount them (umount -R) and retry"
        )
    log.info("qemu11: removing incomplete %s", root)
    shutil.rmtree(root)


def _read_record(root: Path) -> SidQemu | None:
    record = _record_path(root)
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    try:
        if data["format"] != RECORD_FORMAT or Path(data["root"]) != root:
            return None
        # A root made before a package joined SID_PACKAGES is completed (apt installs only what is missing).
        if not set(SID_PACKAGES) <= set(data.get("packages", ())):
            return None
        qemu = SidQemu(root=root, version=str(data["version"]), package_version=str(data["package_version"]))
    except (KeyError, TypeError):
        return None
    # Cheap checks that the tree the record describes is still there.
    wanted = (qemu.system, qemu.system_aarch64, Path("/usr/bin/apt-get"))
    if not all((root / path.relative_to("/")).is_file() for path in wanted):
        return None
    return qemu


def _in_chroot(root: Path, argv: Sequence[str], *, what: str, timeout: float, meter: Meter | None = None) -> str:
    env = {"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    total = 100 if meter is apt_meter else None
    return run([*namespace_prefix(root), *argv], timeout=timeout, what=what, env=env, meter=meter,
               total=total).stdout


def _debootstrap(provisioner: Provisioner, root: Path) -> None:
    """A minbase sid tree at ``root`` (removed and redone if a previous run did not finish)."""
    stamp = root.with_name(root.name + ".debootstrap-done")
    if stamp.is_file() and (root / "usr" / "bin" / "apt-get").is_file():
        return
    stamp.unlink(missing_ok=True)
    _remove_root(root)
    if shutil.which(DEBOOTSTRAP) is None:
        provisioner.apt_install([DEBOOTSTRAP], what="qemu11 (debootstrap)")
    mirror = debian_mirror_uri(provisioner.etc_apt)
    root.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # In a private mount namespace: debootstrap mounts /proc and /sys in the target while it runs.
    run(
        ["unshare", "--mount", "--propagation", "private",
         DEBOOTSTRAP, "--variant=minbase", SUITE, str(root), mirror],
        timeout=DEBOOTSTRAP_TIMEOUT,
        what="qemu11: debootstrap sid (steps)",
        # One "I: Retrieving/Validating/Extracting/Unpacking/Configuring <package>" line per package and phase.
        meter=line_meter(r"^I: "),
    )
    stamp.write_text(f"{SUITE} {mirror}\n")
    log.info("qemu11: debootstrap %s into %s took %.1f s", SUITE, root, time.monotonic() - started)


#: sid's Release files carry a ``Valid-Until`` about a week ahead; a mirror that serves a dated snapshot of the
#: archive (as this machine kind's does) would make apt refuse them as expired. The signatures are still checked.
APT_OPTIONS = ("-q", "-o", "Acquire::Check-Valid-Until=false", "-o", "DPkg::Lock::Timeout=300", *APT_PROGRESS)


def _install_qemu(root: Path) -> None:
    started = time.monotonic()
    # Finish whatever an interrupted earlier install left half-configured, then install.
    _in_chroot(root, ["dpkg", "--configure", "-a"], what="qemu11 (dpkg --configure)", timeout=CHROOT_APT_TIMEOUT)
    _in_chroot(root, ["apt-get", *APT_OPTIONS, "update"], what="qemu11: apt-get update in sid",
               timeout=CHROOT_APT_TIMEOUT, meter=apt_meter)
    install = ["apt-get", *APT_OPTIONS, "install", "-y", "--no-install-recommends", *SID_PACKAGES]
    what = f"qemu11: apt-get install {' '.join(SID_PACKAGES)} in sid"
    try:
        _in_chroot(root, install, what=what, timeout=CHROOT_APT_TIMEOUT, meter=apt_meter)
    except ProvisionError as first:
        # A run killed while unpacking can leave broken dependencies that only ``-f install`` repairs.
        log.warning("qemu11: repairing the sid chroot's packages (%s)", str(first).splitlines()[-1])
        _in_chroot(root, ["apt-get", *APT_OPTIONS, "-f", "install", "-y", "--no-install-recommends"],
                   what="qemu11: apt-get -f install in sid", timeout=CHROOT_APT_TIMEOUT, meter=apt_meter)
        _in_chroot(root, install, what=what, timeout=CHROOT_APT_TIMEOUT, meter=apt_meter)
    # The .debs are not needed again (a rebuild downloads them anew); keep the cache small.
    _in_chroot(root, ["apt-get", "clean"], what="qemu11 (apt-get clean)", timeout=CHROOT_QUERY_TIMEOUT)
    log.info("qemu11: apt-get install %s took %.1f s", " ".join(SID_PACKAGES), time.monotonic() - started)


def install_packages(root: Path, packages: Sequence[str], *, what: str) -> None:
    """Install more of sid's packages into the provisioned chroot: programs a guest runs from it (the guest sees
    the host's root, this chroot included, over 9p)."""
    _in_chroot(root, ["apt-get", *APT_OPTIONS, "install", "-y", "--no-install-recommends", *packages], what=what,
               timeout=CHROOT_APT_TIMEOUT, meter=apt_meter)
    _in_chroot(root, ["apt-get", "clean"], what=f"{what} (apt-get clean)", timeout=CHROOT_QUERY_TIMEOUT)


def _check_qemu(root: Path) -> SidQemu:
    """Version ≥ 11.1 and the generic vhost-user device present, asked of the installed binary itself."""
    text = _in_chroot(root, [str(QEMU_IN_CHROOT), "--version"], what="qemu11 (--version)",
                      timeout=CHROOT_QUERY_TIMEOUT)
    major, minor, micro = parse_qemu_version(text)
    if (major, minor) < QEMU11_MIN_VERSION:
        want = ".".join(map(str, QEMU11_MIN_VERSION))
        raise ProvisionError(f"qemu11: sid has QEMU {major}.{minor}.{micro}, need >= {want}")
    for system in (QEMU_IN_CHROOT, QEMU_AARCH64_IN_CHROOT):
        devices = _in_chroot(root, [str(system), "-device", "help"], what=f"qemu11 ({system.name} -device help)",
                             timeout=CHROOT_QUERY_TIMEOUT)
        if f'"{GENERIC_DEVICE}"' not in devices:
            raise ProvisionError(f"qemu11: {system.name} {major}.{minor}.{micro} in {root} does not list "
                                 f"{GENERIC_DEVICE}")
    package_version = _in_chroot(
        root, ["dpkg-query", "-W", "-f=${Version}", "qemu-system-x86"], what="qemu11 (dpkg-query)",
        timeout=CHROOT_QUERY_TIMEOUT,
    ).strip()
    return SidQemu(root=root, version=f"{major}.{minor}.{micro}", package_version=package_version)


def provision_sid_qemu(provisioner: Provisioner, root: Path | None = None) -> SidQemu:
    """QEMU ≥ 11.1 in a sid chroot at ``root`` (default ``<cache>/sid``), built once, then reused.

    Holds the provisioner's cache lock throughout, so parallel test workers build it once.
    """
    root = (root or default_root(provisioner.cache)).absolute()
    with provisioner.locked():
        cached = _read_record(root)
        if cached is not None:
            return cached
        if os.geteuid() != 0:
            raise ProvisionError("qemu11: debootstrap, chroot and mount namespaces need root")
        for tool in ("unshare", "chroot", "mount"):
            if shutil.which(tool) is None:
                raise ProvisionError(f"qemu11: {tool} is not on PATH (util-linux / coreutils)")
        record = _record_path(root)
        record.unlink(missing_ok=True)
        _debootstrap(provisioner, root)
        _install_qemu(root)
        qemu = _check_qemu(root)
        tmp = record.with_name(record.name + ".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "format": RECORD_FORMAT,
                    "root": str(root),
                    "version": qemu.version,
                    "package_version": qemu.package_version,
                    "packages": list(SID_PACKAGES),
                },
                indent=2,
            )
            + "\n"
        )
        tmp.replace(record)
        log.info("qemu11: QEMU %s (%s) ready in %s", qemu.version, qemu.package_version, root)
        return qemu


__all__ = [
    "GENERIC_DEVICE",
    "QEMU11_MIN_VERSION",
    "SID_PACKAGES",
    "SidQemu",
    "default_root",
    "install_packages",
    "mounts_under",
    "namespace_prefix",
    "parse_qemu_version",
    "provision_sid_qemu",
]
