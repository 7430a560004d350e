"""Build the lab's patched guest kernel: Debian's 6.12 source + our DMA_BUF_IOCTL_INFO patch, minimal and built in.

Why this exists: no released kernel answers ``DMA_BUF_IOCTL_INFO`` (the proposal was never merged), so vgpu's
primary path — asking the exporter — could otherwise only ever meet ``ENOTTY`` or a fake. The patch in
``tools/vgpu_lab/kernel/*.patch`` adds the ioctl and the exporter hooks; this module turns it into a bootable
``bzImage`` from nothing but Debian packages (``linux-source-6.12`` through apt, no other download).

How: unpack ``/usr/src/linux-source-6.12.tar.xz``, apply the patches (checked with ``--dry-run`` first), configure
``make tinyconfig`` + ``tools/vgpu_lab/kernel/vgpu-guest.config`` + ``olddefconfig`` out of tree (``O=``), verify that
every option of the fragment survived (tinyconfig silently drops options whose dependencies are missing — a dropped
PTDUMP_DEBUGFS or X86_PAT would make the ground truth lie, so that fails loudly), then ``make bzImage``.

The image is cached under ``<cache>/patched-kernel/<key>/`` where the key hashes the source package version, the
patches, the fragment, the compiler version and this module's recipe version, so a second run costs a few hashes.
The build happens in a scratch directory next to it and only a finished image is renamed into place: an
interrupted build leaves no key directory and is redone from scratch, never half-used.

Use as a library (:func:`build_patched_kernel` returns the bzImage path) or as a command::

    python -m vgpu_lab.kernel_build [--cache DIR] [--jobs N] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from vgpu_lab import provision
from vgpu_lab.progress import Progress
from vgpu_lab.shell import Meter, ProvisionError, line_meter, log_to_stderr, report, run

log = logging.getLogger("vgpu_lab")

#: Our kernel patch and config fragments: the lab's own files, beside this module.
KERNEL_TOOLS = Path(__file__).resolve().parent / "kernel"
FRAGMENT = KERNEL_TOOLS / "vgpu-guest.config"


@dataclasses.dataclass(frozen=True)
class KernelProfile:
    """One kind of kernel the lab builds from the same source and patches: its config fragment, where its
    images are cached (each profile has a directory of its own, its images keyed as the guest kernel's are),
    and the objects rebuilt with debug info and kept beside the image.

    ``dwarf_objects`` are paths in the build tree (``drivers/xen/privcmd.o``): after ``bzImage`` they are compiled
    once more with ``-g`` and the kernel's own flags and configuration, so a layout check reads the structs as this
    very kernel compiled them, without the minutes and gigabytes of a whole-kernel ``DEBUG_INFO`` build."""

    name: str
    fragment: Path
    cache_dir: str
    dwarf_objects: tuple[str, ...] = ()


#: The patched guest kernel (the image QEMU boots as the guest of the vhost-user device).
GUEST = KernelProfile("guest", FRAGMENT, "patched-kernel")
#: A Xen PV dom0 kernel (see ``kernel/vgpu-xen-dom0.config``): the Xen drivers the back end uses, built in, with the
#: objects that define their UAPI structs kept with debug info for ``tools/layoutcheck.py``.
XEN_DOM0 = KernelProfile(
    "xen-dom0", KERNEL_TOOLS / "vgpu-xen-dom0.config", "xen-dom0-kernel",
    dwarf_objects=(
        "drivers/xen/privcmd.o", "drivers/xen/gntdev.o", "drivers/xen/gntdev-dmabuf.o", "drivers/xen/gntalloc.o",
        "drivers/xen/grant-table.o",
    ),
)

SOURCE_PACKAGE = "linux-source-6.12"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.12.tar.xz")
#: The top directory inside the tarball.
SOURCE_TOP = "linux-source-6.12"
#: What a kernel build needs beyond gcc/make: the source itself, kconfig's parser generators, objtool's libelf,
#: and the small tools the kernel's scripts call.
BUILD_PACKAGES = (SOURCE_PACKAGE, "flex", "bison", "libelf-dev", "bc", "libssl-dev", "cpio", "xz-utils", "make", "gcc")
ARCH = "x86_64"
#: Bumped whenever the recipe below changes in a way that changes the image (part of the cache key).
RECIPE_VERSION = "1"

TAR_TIMEOUT = 900.0
PATCH_TIMEOUT = 120.0
CONFIG_TIMEOUT = 600.0
#: A cold build takes about 6 minutes on 2 cores; the bound only stops a wedged build from hanging CI.
BUILD_TIMEOUT = 3600.0
QUERY_TIMEOUT = 60.0


class KernelBuildError(RuntimeError):
    """The patched kernel cannot be built; the message names the step and the reason."""


@dataclasses.dataclass(frozen=True)
class PatchedKernel:
    """A finished build in the cache."""

    bzimage: Path
    config: Path
    key: str
    source_version: str
    build_seconds: float
    cached: bool

    @property
    def dwarf_dir(self) -> Path:
        """The profile's ``dwarf_objects``, kept flat by file name (``privcmd.o``)."""
        return self.bzimage.parent / "dwarf"


# --------------------------------------------------------------------------------------------------------------
# inputs and the cache key


def patch_files() -> list[Path]:
    """Our kernel patches, applied in name order (``0001-...``, ``0002-...``)."""
    patches = sorted(KERNEL_TOOLS.glob("*.patch"))
    if not patches:
        raise KernelBuildError(f"patches: no *.patch in {KERNEL_TOOLS}")
    return patches


def parse_fragment(text: str) -> dict[str, str]:
    """``CONFIG_X=value`` lines of a config fragment (``# CONFIG_X is not set`` counts as ``n``)."""
    options: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        unset = re.match(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$", line)
        if unset:
            options[unset.group(1)] = "n"
            continue
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.startswith("CONFIG_"):
            raise KernelBuildError(f"config fragment: cannot parse line {raw!r}")
        options[key] = value
    return options


def parse_dotconfig(text: str) -> dict[str, str]:
    """A kernel ``.config``: set options with their values; options that are ``not set`` are left out."""
    options: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("CONFIG_"):
            options[key] = value
    return options


def dropped_options(fragment: Mapping[str, str], final: Mapping[str, str]) -> list[str]:
    """Fragment options whose value did not survive ``olddefconfig``, each described as ``X wanted a, got b``.

    An ``=n`` in the fragment is satisfied by the option being absent (its dependencies gone) or unset.
    """
    problems = []
    for key, want in fragment.items():
        got = final.get(key)
        if want == "n":
            if got not in (None, "n"):
                problems.append(f"{key} wanted n, got {got}")
        elif got != want:
            problems.append(f"{key} wanted {want}, got {'not set' if got is None else got}")
    return problems


def _tool_version(cmd: Sequence[str]) -> str:
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=QUERY_TIMEOUT, check=False, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelBuildError(f"toolchain: cannot run {cmd[0]}: {exc}") from exc
    return proc.stdout.splitlines()[0].strip() if proc.stdout else ""


def cache_key(source_version: str, patches: Sequence[Path], fragment: Path, compiler: str,
              dwarf_objects: Sequence[str] = ()) -> str:
    """Hash of everything that decides the image's bytes (modulo the kernel's own timestamps)."""
    digest = hashlib.sha256()
    for part in (RECIPE_VERSION, ARCH, source_version, compiler):
        digest.update(part.encode() + b"\0")
    for path in (*patches, fragment):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for obj in dwarf_objects:  # none for the guest profile, whose key (and cached image) stays what it was
        digest.update(b"dwarf\0" + obj.encode() + b"\0")
    return digest.hexdigest()[:20]


# --------------------------------------------------------------------------------------------------------------
# steps


#: A kbuild step as make prints it (``  CC      fs/open.o``, ``  AR      lib/lib.a``, ``  HOSTCC  ...``): the unit
#: of a build's progress.
KBUILD_STEP = re.compile(r"^\s+[A-Z][A-Z0-9_-]*\s+\S")
#: Steps of ``make bzImage`` for this recipe when no earlier build recorded its own count (measured: 1,927).
ESTIMATED_MAKE_STEPS = 1927
#: How much of the source tarball is fed to tar at a time (its progress unit is bytes of the compressed file).
TAR_CHUNK = 1 << 20


def _run_logged(cmd: Sequence[str], *, cwd: Path, log_file: Path, timeout: float, what: str,
                meter: Meter | None = None, total: float | None = None) -> None:
    """Run a (chatty) build command with its output appended to ``log_file``; failures quote the log's tail.
    With a `meter` its output also drives a progress display (:mod:`vgpu_lab.progress`)."""
    with log_file.open("a", encoding="utf-8", errors="replace") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        try:
            if meter is not None:
                run(cmd, timeout=timeout, what=what, cwd=cwd, meter=meter, total=total, output=out)
                return
            log.info("%s: $ %s", what, " ".join(cmd))
            proc = subprocess.run(list(cmd), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise KernelBuildError(f"{what}: {cmd[0]} did not finish within {timeout:.0f} s (log {log_file})") from exc
        except (OSError, ProvisionError) as exc:
            raise KernelBuildError(f"{exc} (log {log_file})") from exc
    if proc.returncode != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-25:])
        raise KernelBuildError(f"{what}: {' '.join(cmd)} exited with {proc.returncode} (log {log_file}):\n{tail}")


def _unpack(tarball: Path, into: Path, *, timeout: float) -> None:
    """``tar -xJ`` fed by us, so the bytes of the compressed tarball read so far are the progress."""
    cmd = ["tar", "-xJ", "-C", str(into)]
    log.info("unpack: $ %s < %s", " ".join(cmd), tarball)
    size = tarball.stat().st_size
    deadline = time.monotonic() + timeout
    with Progress(f"patched kernel: unpack {tarball.name} (MiB)", size / (1 << 20)) as progress:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert proc.stdin is not None and proc.stderr is not None
        try:
            with tarball.open("rb") as f:
                while chunk := f.read(TAR_CHUNK):
                    if time.monotonic() > deadline:
                        raise KernelBuildError(f"unpack: tar did not finish within {timeout:.0f} s")
                    proc.stdin.write(chunk)
                    progress.update(f.tell() / (1 << 20))
            proc.stdin.close()
            errors = proc.stderr.read().decode(errors="replace")
            returncode = proc.wait(max(deadline - time.monotonic(), 1))
        except BrokenPipeError:
            errors = proc.stderr.read().decode(errors="replace")
            returncode = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
        if returncode != 0:
            raise KernelBuildError(f"unpack: tar exited with {returncode}: {errors.strip()[-2000:]}")


def _make_steps_before(root: Path) -> int:
    """How many kbuild steps the last finished build under ``root`` took (the estimate when none recorded it)."""
    for record in sorted(root.glob("*/build.json")):
        try:
            steps = json.loads(record.read_text()).get("make_steps")
        except (OSError, ValueError):
            continue
        if isinstance(steps, int) and steps > 0:
            return steps
    return ESTIMATED_MAKE_STEPS


def ensure_build_packages(provisioner: provision.Provisioner) -> str:
    """Install the source package and build tools through apt when missing; returns the source version."""
    have = provisioner.installed_versions(BUILD_PACKAGES)
    missing = [p for p in BUILD_PACKAGES if p not in have]
    if missing or not SOURCE_TARBALL.is_file():
        try:
            provisioner.apt_install(missing or [SOURCE_PACKAGE], what="kernel source")
        except ProvisionError as exc:
            raise KernelBuildError(str(exc)) from exc
        have = provisioner.installed_versions(BUILD_PACKAGES)
    if SOURCE_PACKAGE not in have or not SOURCE_TARBALL.is_file():
        raise KernelBuildError(f"kernel source: {SOURCE_TARBALL} is missing after installing {SOURCE_PACKAGE}")
    return have[SOURCE_PACKAGE]


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise builds sharing one cache (parallel test workers), without holding the provisioner's lock."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _finished(final: Path) -> PatchedKernel | None:
    record = final / "build.json"
    if not (final / "bzImage").is_file() or not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
        return PatchedKernel(
            bzimage=final / "bzImage",
            config=final / "config",
            key=str(data["key"]),
            source_version=str(data["source_version"]),
            build_seconds=float(data["build_seconds"]),
            cached=True,
        )
    except (ValueError, KeyError, TypeError):
        return None


def _build(work: Path, *, patches: Sequence[Path], jobs: int, expected_steps: int,
           profile: KernelProfile = GUEST) -> tuple[Path, Path, int]:
    """Unpack, patch, configure, verify the config, build; returns (bzImage, .config, kbuild steps) in ``work``."""
    log_file = work / "build.log"
    _unpack(SOURCE_TARBALL, work, timeout=TAR_TIMEOUT)
    src = work / SOURCE_TOP
    obj = work / "obj"
    obj.mkdir()
    for patch in patches:
        for extra in (["--dry-run"], []):
            _run_logged(["patch", "-p1", "--forward", "--batch", *extra, "-i", str(patch)], cwd=src,
                        log_file=log_file, timeout=PATCH_TIMEOUT, what=f"patch {patch.name}")
    make = ["make", f"O={obj}", f"ARCH={ARCH}"]
    _run_logged([*make, "tinyconfig"], cwd=src, log_file=log_file, timeout=CONFIG_TIMEOUT,
                what="patched kernel: make tinyconfig", meter=line_meter())
    fragment = profile.fragment
    _run_logged(["scripts/kconfig/merge_config.sh", "-m", "-O", str(obj), str(obj / ".config"), str(fragment)],
                cwd=src, log_file=log_file, timeout=CONFIG_TIMEOUT, what="patched kernel: merge the config fragment",
                meter=line_meter())
    _run_logged([*make, "olddefconfig"], cwd=src, log_file=log_file, timeout=CONFIG_TIMEOUT,
                what="patched kernel: make olddefconfig", meter=line_meter())
    dotconfig = obj / ".config"
    problems = dropped_options(parse_fragment(fragment.read_text()), parse_dotconfig(dotconfig.read_text()))
    if problems:
        raise KernelBuildError(
            f"config: olddefconfig dropped options of {fragment.name} (missing dependencies?): " + "; ".join(problems)
        )
    steps = 0

    def count(line: str, p: Progress) -> None:
        nonlocal steps
        if KBUILD_STEP.match(line):
            steps += 1
            p.update(steps, line)

    _run_logged([*make, f"-j{jobs}", "bzImage"], cwd=src, log_file=log_file, timeout=BUILD_TIMEOUT,
                what=f"patched kernel: make -j{jobs} bzImage (kbuild steps, about {expected_steps:,})", meter=count,
                total=expected_steps)
    bzimage = obj / "arch" / "x86" / "boot" / "bzImage"
    if not bzimage.is_file():
        raise KernelBuildError(f"make bzImage: finished without {bzimage} (log {log_file})")
    if profile.dwarf_objects:
        # The image is built: these objects are compiled again, now with debug info (and every type kept), for
        # the layout check only; the image is not relinked.
        _run_logged([*make, f"-j{jobs}", "KCFLAGS=-g -fno-eliminate-unused-debug-types", *profile.dwarf_objects],
                    cwd=src, log_file=log_file, timeout=BUILD_TIMEOUT, what="patched kernel: debug-info objects",
                    meter=line_meter())
    return bzimage, dotconfig, steps


def find_patched_kernel(cache: Path | None = None, *, profile: KernelProfile = GUEST) -> PatchedKernel | None:
    """The cached kernel of ``profile`` for the current inputs (this checkout's patches), or None; never builds.

    Keyed like :func:`patched_kernel`, so a cache shared by checkouts with other patches never hands out theirs."""
    provisioner = provision.Provisioner(cache)
    version = provisioner.installed_versions((SOURCE_PACKAGE,)).get(SOURCE_PACKAGE)
    if version is None:
        return None
    key = cache_key(version, patch_files(), profile.fragment, _tool_version(["gcc", "--version"]),
                    profile.dwarf_objects)
    return _finished(provisioner.cache / profile.cache_dir / key)


def patched_kernel(cache: Path | None = None, *, jobs: int | None = None,
                   profile: KernelProfile = GUEST) -> PatchedKernel:
    """The cached patched kernel of ``profile``, built first when the cache holds none for the current inputs."""
    provisioner = provision.Provisioner(cache)
    root = provisioner.cache / profile.cache_dir
    with _locked(root):
        source_version = ensure_build_packages(provisioner)
        patches = patch_files()
        compiler = _tool_version(["gcc", "--version"])
        key = cache_key(source_version, patches, profile.fragment, compiler, profile.dwarf_objects)
        final = root / key
        done = _finished(final)
        if done is not None:
            return done
        # Anything else under this key is debris of an interrupted run: start over, never reuse half a build.
        work = root / f".work-{key}"
        for debris in (work, final):
            if debris.exists():
                log.warning("patched kernel: removing unfinished %s", debris)
                shutil.rmtree(debris)
        work.mkdir()
        started = time.monotonic()
        bzimage, dotconfig, steps = _build(work, patches=patches, jobs=jobs or os.cpu_count() or 1,
                                           expected_steps=_make_steps_before(root), profile=profile)
        seconds = time.monotonic() - started
        staging = root / f".staging-{key}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        shutil.copy2(bzimage, staging / "bzImage")
        shutil.copy2(dotconfig, staging / "config")
        shutil.copy2(work / "build.log", staging / "build.log")
        if profile.dwarf_objects:
            (staging / "dwarf").mkdir()
            for name in profile.dwarf_objects:
                shutil.copy2(work / "obj" / name, staging / "dwarf" / Path(name).name)
        record = {
            "key": key,
            "profile": profile.name,
            "source_package": SOURCE_PACKAGE,
            "source_version": source_version,
            "patches": [p.name for p in patches],
            "fragment": profile.fragment.name,
            "dwarf_objects": list(profile.dwarf_objects),
            "compiler": compiler,
            "build_seconds": round(seconds, 1),
            "make_steps": steps,
        }
        (staging / "build.json").write_text(json.dumps(record, indent=2) + "\n")
        staging.replace(final)
        shutil.rmtree(work)
        # Debris of other interrupted builds (nobody else builds while we hold the lock). Finished images of other
        # keys stay: checkouts with other patches share this cache, and each would otherwise rebuild the other's.
        for stale in root.iterdir():
            if stale.is_dir() and stale.name.startswith((".work-", ".staging-")):
                shutil.rmtree(stale)
        log.info("patched kernel: built %s in %.0f s", final / "bzImage", seconds)
        return PatchedKernel(
            bzimage=final / "bzImage", config=final / "config", key=key, source_version=source_version,
            build_seconds=seconds, cached=False,
        )


def build_patched_kernel(cache: Path | None = None, *, jobs: int | None = None,
                         profile: KernelProfile = GUEST) -> Path:
    """Path of the patched kernel's bzImage, built (about 6 minutes on 2 cores) only when not cached."""
    return patched_kernel(cache, jobs=jobs, profile=profile).bzimage


PROFILES = {p.name: p for p in (GUEST, XEN_DOM0)}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vgpu_lab.kernel_build``: build (or find) the patched guest kernel and say where it is."""
    parser = argparse.ArgumentParser(prog="python -m vgpu_lab.kernel_build", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, help="cache directory (default $VGPU_LAB_CACHE or $VGPU_ROOT/.cache/lab)")
    parser.add_argument("--jobs", type=int, help="parallel make jobs (default: number of CPUs)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default=GUEST.name,
                        help="which kernel: the patched guest (default) or the Xen dom0")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    args = parser.parse_args(argv)
    log_to_stderr(args.quiet)
    started = time.monotonic()
    try:
        kernel = patched_kernel(args.cache, jobs=args.jobs, profile=PROFILES[args.profile])
    except (KernelBuildError, ProvisionError, OSError) as exc:
        print(f"vgpu-lab: cannot build the patched kernel: {exc}", file=sys.stderr)
        return 1
    summary = {
        "bzimage": str(kernel.bzimage),
        "config": str(kernel.config),
        "key": kernel.key,
        "source_version": kernel.source_version,
        "cached": kernel.cached,
        "build_seconds": round(kernel.build_seconds, 1),
        "seconds": round(time.monotonic() - started, 2),
    }
    report(summary, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
