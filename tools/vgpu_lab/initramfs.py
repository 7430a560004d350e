"""A minimal initramfs for the lab guest, written in pure Python (newc cpio, gzip-compressed).

Why our own writer: the image is tiny (busybox, a few kernel modules, a test program and ``/init``), building it
must not depend on host tools (cpio, kmod) or on root-owned files, and it must be reproducible — fixed inode
numbers and mtimes make the same inputs give the same bytes, so a cache can key on them.

Kernel modules are resolved in dependency order from the ``depends=`` field of each module's ``.modinfo``
section (what modpost recorded at build time; ``depmod`` derives the same graph) because Debian's packages ship
no ``modules.dep`` — it is generated at install time, and we never install the guest kernel. Compressed modules
(``.ko.xz``) are decompressed on the way in, so the guest's busybox ``insmod`` needs no decompressor.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import lzma
import shlex
import stat
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath

from elftools.elf.elffile import ELFFile

#: What virtio-gpu needs; its own dependencies are added automatically.
VIRTIO_GPU_MODULES = ("virtio-gpu",)
#: Optional module sets for later work: a second DRM device whose PRIME exports are real dma-bufs, and 9p to
#: share a host directory with the guest.
EXTRA_MODULE_SETS: Mapping[str, tuple[str, ...]] = {
    "vgem": ("vgem",),
    "9p": ("9pnet", "9pnet_virtio", "9p"),
}

#: Printed by /init as ``VGPU-LAB-END rc=<status>`` right before poweroff; :mod:`vgpu_lab.qemu` parses it.
END_MARKER = "VGPU-LAB-END"
DMESG_BEGIN = "VGPU-LAB-DMESG-BEGIN"
DMESG_END = "VGPU-LAB-DMESG-END"
#: Status reported when the awaited device node never appeared (the command is then not run).
DEVICE_TIMEOUT_STATUS = 124

BUSYBOX_LIST_TIMEOUT = 30.0


class InitramfsError(RuntimeError):
    """The initramfs cannot be built (missing module, unreadable file, ...)."""


# --------------------------------------------------------------------------------------------------------------
# newc cpio


class CpioWriter:
    """Writes a newc ("070701") cpio archive in memory, the format the kernel unpacks as an initramfs.

    Parent directories are emitted automatically before their entries because the kernel's unpacker does not
    create missing parents. Every entry gets uid/gid 0, mtime 0 and a sequential inode number.
    """

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._next_ino = 1
        self._paths: set[str] = set()
        self._closed = False

    @staticmethod
    def _normalise(path: str) -> str:
        parts = [p for p in PurePosixPath("/", path).parts[1:] if p not in ("", ".")]
        if not parts or ".." in parts:
            raise InitramfsError(f"bad archive path {path!r}")
        return "/".join(parts)

    def _ensure_parents(self, name: str) -> None:
        parent = PurePosixPath(name).parent
        missing = []
        while str(parent) not in (".", "") and str(parent) not in self._paths:
            missing.append(str(parent))
            parent = parent.parent
        for directory in reversed(missing):
            self._entry(directory, stat.S_IFDIR | 0o755, b"", nlink=2)

    def _entry(self, name: str, mode: int, data: bytes, *, nlink: int = 1, rdev: tuple[int, int] = (0, 0)) -> None:
        if self._closed:
            raise InitramfsError("cpio archive already finished")
        if name in self._paths:
            raise InitramfsError(f"duplicate archive path {name!r}")
        encoded = name.encode() + b"\0"
        fields = (
            self._next_ino,
            mode,
            0,
            0,
            nlink,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        )
        self._next_ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._buf.write(header + encoded)
        self._pad()
        self._buf.write(data)
        self._pad()
        self._paths.add(name)

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        name = self._normalise(path)
        if name in self._paths:
            return
        self._ensure_parents(name)
        self._entry(name, stat.S_IFDIR | mode, b"", nlink=2)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        name = self._normalise(path)
        self._ensure_parents(name)
        self._entry(name, stat.S_IFREG | mode, data)

    def add_symlink(self, path: str, target: str) -> None:
        name = self._normalise(path)
        self._ensure_parents(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        name = self._normalise(path)
        self._ensure_parents(name)
        self._entry(name, stat.S_IFCHR | mode, b"", rdev=(major, minor))

    def __contains__(self, path: str) -> bool:
        return self._normalise(path) in self._paths

    def finish(self) -> bytes:
        """Append the trailer and return the archive; the writer accepts nothing afterwards."""
        if not self._closed:
            self._entry("TRAILER!!!", 0, b"", nlink=1)
            self._closed = True
        return self._buf.getvalue()


# --------------------------------------------------------------------------------------------------------------
# kernel modules


def module_name(name_or_file: str) -> str:
    """The kernel's canonical module name: file stem without ``.ko[.xz]``, dashes as underscores."""
    base = name_or_file.rsplit("/", 1)[-1]
    for suffix in (".xz", ".gz", ".zst"):
        base = base.removesuffix(suffix)
    return base.removesuffix(".ko").replace("-", "_")


def read_module_bytes(path: Path) -> bytes:
    """The module's ELF image, decompressing ``.ko.xz`` / ``.ko.gz``."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise InitramfsError(f"{path}: zstd-compressed modules are not supported")
    return data


def modinfo(elf_image: bytes) -> dict[str, list[str]]:
    """The ``key=value`` strings of a module's ``.modinfo`` section, grouped by key."""
    elf = ELFFile(io.BytesIO(elf_image))
    section = elf.get_section_by_name(".modinfo")
    if section is None:
        raise InitramfsError("module has no .modinfo section")
    info: dict[str, list[str]] = {}
    for raw in bytes(section.data()).split(b"\0"):
        key, sep, value = raw.decode("utf-8", "replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


@dataclasses.dataclass(frozen=True)
class KernelModule:
    """One loadable module: canonical name, file in the kernel tree, direct dependencies."""

    name: str
    path: Path
    depends: tuple[str, ...]


class ModuleTree:
    """The modules of one unpacked kernel (``lib/modules/<release>``), indexed by canonical name."""

    def __init__(self, modules_dir: Path) -> None:
        if not modules_dir.is_dir():
            raise InitramfsError(f"no module tree at {modules_dir}")
        self.modules_dir = modules_dir
        self._files: dict[str, Path] = {}
        for path in sorted((modules_dir / "kernel").rglob("*.ko*")):
            self._files.setdefault(module_name(path.name), path)
        builtin = modules_dir / "modules.builtin"
        self._builtin = (
            {module_name(line.strip()) for line in builtin.read_text().splitlines() if line.strip()}
            if builtin.is_file()
            else set()
        )
        self._cache: dict[str, KernelModule] = {}

    def is_builtin(self, name: str) -> bool:
        return module_name(name) in self._builtin

    def module(self, name: str) -> KernelModule:
        canonical = module_name(name)
        if canonical in self._cache:
            return self._cache[canonical]
        path = self._files.get(canonical)
        if path is None:
            raise InitramfsError(f"kernel module {name!r} is neither in {self.modules_dir} nor built in")
        info = modinfo(read_module_bytes(path))
        depends = tuple(module_name(d) for d in ",".join(info.get("depends", [])).split(",") if d)
        module = KernelModule(canonical, path, depends)
        self._cache[canonical] = module
        return module

    def load_order(self, names: Iterable[str]) -> list[KernelModule]:
        """The requested modules and everything they depend on, each after its dependencies, built-ins left out."""
        order: list[KernelModule] = []
        done: set[str] = set()
        visiting: set[str] = set()

        def visit(name: str) -> None:
            canonical = module_name(name)
            if canonical in done or self.is_builtin(canonical):
                return
            if canonical in visiting:
                raise InitramfsError(f"module dependency cycle through {canonical}")
            visiting.add(canonical)
            module = self.module(canonical)
            for dep in module.depends:
                visit(dep)
            visiting.discard(canonical)
            done.add(canonical)
            order.append(module)

        for name in names:
            visit(name)
        return order


# --------------------------------------------------------------------------------------------------------------
# /init and the image


def init_script(
    module_files: Sequence[str],
    command: str,
    *,
    wait_for: str | None = "/dev/dri/card0",
    wait_timeout: float = 20.0,
    dump_dmesg: bool = True,
    shutdown: str = "poweroff -f",
) -> str:
    """The busybox ``sh`` script run as PID 1.

    It mounts what the kernel does not (the Debian kernel has ``DEVTMPFS_MOUNT`` off), loads the modules in
    the order given, waits for the device node, runs ``command``, then dumps the kernel log between markers —
    the console runs at ``loglevel=4`` to keep boots fast, so driver info lines only reach the serial log this
    way — and prints ``VGPU-LAB-END rc=<status>`` before powering off. PID 1 must never exit (that panics the
    guest), hence ``shutdown`` (``poweroff -f``) as the last word whatever happened. A Xen dom0 ends the run with
    ``reboot -f`` instead: Xen then reboots and QEMU's ``-no-reboot`` exits, where a powered-off Xen waits forever.
    """
    lines = [
        "#!/bin/sh",
        "export PATH=/bin:/sbin:/usr/bin:/usr/sbin",
        "mount -t proc proc /proc",
        "mount -t sysfs sysfs /sys",
        "mount -t devtmpfs devtmpfs /dev",
        "mount -t debugfs debugfs /sys/kernel/debug",
        "mount -t tmpfs tmpfs /tmp",
        "echo \"VGPU-LAB-INIT uptime=$(cut -d' ' -f1 /proc/uptime)\"",
    ]
    for module in module_files:
        quoted = shlex.quote(f"/lib/modules/{module}")
        lines.append(f'insmod {quoted} || echo "VGPU-LAB-INSMOD-FAILED {module}"')
    lines.append("rc=0")
    if wait_for is not None:
        ticks = max(1, int(wait_timeout * 10))
        path = shlex.quote(wait_for)
        lines += [
            "i=0",
            f"while [ ! -e {path} ] && [ $i -lt {ticks} ]; do usleep 100000; i=$((i+1)); done",
            f"if [ -e {path} ]; then",
            f'  echo "VGPU-LAB-DEVICE {wait_for} after $((i*100)) ms"',
            "else",
            f'  echo "VGPU-LAB-DEVICE-TIMEOUT {wait_for} after {wait_timeout:g} s"',
            f"  rc={DEVICE_TIMEOUT_STATUS}",
            "fi",
        ]
    lines += [
        "if [ $rc -eq 0 ]; then",
        "  echo \"VGPU-LAB-RUN uptime=$(cut -d' ' -f1 /proc/uptime)\"",
        "  cd /",
        f"  {command}",
        "  rc=$?",
        "fi",
    ]
    if dump_dmesg:
        lines += [f"echo {DMESG_BEGIN}", "dmesg", f"echo {DMESG_END}"]
    lines += [
        f"echo \"{END_MARKER} rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)\"",
        "sync",
        shutdown,
        "",
    ]
    return "\n".join(lines)


def busybox_applets(busybox: Path) -> list[str]:
    """Install paths of every applet (``bin/sh``, ``sbin/insmod``, ...), from the binary itself.

    ``bin/busybox`` is in that list; linking it onto itself would make every applet fail with ELOOP.
    """
    try:
        proc = subprocess.run(
            [str(busybox), "--list-full"],
            capture_output=True,
            text=True,
            timeout=BUSYBOX_LIST_TIMEOUT,
            check=True,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise InitramfsError(f"cannot list the applets of {busybox}: {exc}") from exc
    return [line.strip() for line in proc.stdout.splitlines() if line.strip() and line.strip() != "bin/busybox"]


def build_initramfs(
    output: Path,
    *,
    busybox: Path,
    command: str,
    modules_dir: Path | None = None,
    modules: Sequence[str] = VIRTIO_GPU_MODULES,
    files: Mapping[str, Path | bytes] | None = None,
    wait_for: str | None = "/dev/dri/card0",
    wait_timeout: float = 20.0,
    dump_dmesg: bool = True,
    applets: Sequence[str] | None = None,
    shutdown: str = "poweroff -f",
) -> Path:
    """Write a gzip-compressed newc initramfs to ``output`` and return it.

    ``command`` is a shell command line run by /init (e.g. ``/bin/kms_pattern 500``); ``files`` maps guest paths
    to host files (mode kept) or bytes (mode 0644), e.g. ``{"/bin/kms_pattern": built_program}``;
    ``modules`` are module names resolved with their dependencies from ``modules_dir`` (required when any
    module is asked for). ``applets`` are busybox's install paths when ``busybox`` cannot run on this host (another
    architecture's binary); by default the binary lists its own.
    """
    archive = CpioWriter()
    for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "lib/modules", "root"):
        archive.add_dir(directory)
    archive.add_char_device("dev/console", 5, 1)
    archive.add_char_device("dev/null", 1, 3, 0o666)
    archive.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in busybox_applets(busybox) if applets is None else applets:
        depth = applet.count("/")
        archive.add_symlink(applet, "../" * depth + "bin/busybox")

    module_files: list[str] = []
    if modules:
        if modules_dir is None:
            raise InitramfsError("modules were requested but no modules_dir was given")
        tree = ModuleTree(modules_dir)
        for module in tree.load_order(modules):
            file_name = f"{module.name}.ko"
            archive.add_file(f"lib/modules/{file_name}", read_module_bytes(module.path))
            module_files.append(file_name)

    for guest_path, source in (files or {}).items():
        if isinstance(source, Path):
            mode = stat.S_IMODE(source.stat().st_mode)
            archive.add_file(guest_path, source.read_bytes(), mode)
        else:
            archive.add_file(guest_path, source)

    script = init_script(module_files, command, wait_for=wait_for, wait_timeout=wait_timeout, dump_dmesg=dump_dmesg,
                         shutdown=shutdown)
    archive.add_file("init", script.encode(), 0o755)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    try:
        tmp.write_bytes(gzip.compress(archive.finish(), compresslevel=6, mtime=0))
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    return output
