"""Boot a guest that asks real dma-buf exporters ``DMA_BUF_IOCTL_INFO`` and reads the truth from its page tables.

Why this module: the kernel-query path of vgpu can only be proven on a kernel that has the ioctl (our patched
build, :mod:`vgpu_lab.kernel_build`) and compared with one that has not (Debian's 6.12). Both boots run the same
static ``dmabuf_info`` guest program under QEMU TCG with no vhost-user device at all — udmabuf, the system heap
and vgem are virtual — plus QEMU's built-in ``virtio-gpu-pci``, whose PRIME exports use virtio-gpu's own
dma_buf_ops (the "exporter without a hook" case). Optionally the host's root is shared read-only over virtio-9p
and the program ``exec``s our Python (:mod:`vgpu_lab.dmabuf_probe`) in a chroot of it, on the same fds.

:func:`parse_report` and :func:`parse_python` turn the guest's ``VGPU-GUEST`` lines into typed rows, so tests and
the cache-attribute benchmark read the same table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from vgpu_lab import initramfs, paths
from vgpu_lab.qemu import GuestRun, QemuConfig, run_guest

#: Every buffer the guest program makes on any kernel, in its order.
BUFFERS = ("udmabuf", "system-heap", "vgem", "virtio-gpu", "memfd")
#: The buffers of our patch's vgem test exporters, made only where vgem has them (the patched kernel).
TEST_BUFFERS = ("vgem-moving", "vgem-incoherent")
#: The guest waits for both DRM devices (vgem and virtio-gpu) before it runs.
WAIT_FOR = "/dev/dri/card1"
HOST_ROOT_TAG = "hostroot"
GUEST_HOST_ROOT = "/mnt/host"
#: The chroot's writable scratch space, exported to it as TMPDIR.  Not /tmp: the chroot is the host's whole root,
#: and a tmpfs mounted on its /tmp hides everything the host keeps there — a checkout or a venv under /tmp then
#: vanishes from the guest and its interpreter is "not found" (exit 127).  The chroot's /dev is the guest's own
#: devtmpfs, bound over the host's /dev anyway, so a tmpfs on /dev/shm hides nothing the chroot could have shown.
GUEST_SCRATCH = "/dev/shm"
#: Host directories the chroot cannot show: the guest's own /dev, /proc and /sys are bound over them.
SHADOWED = (Path("/dev"), Path("/proc"), Path("/sys"))
#: Modules the Debian kernel needs for this program (udmabuf and the system heap are built in there).
STOCK_MODULES = ("virtio-gpu", "vgem")
STOCK_9P_MODULES = initramfs.EXTRA_MODULE_SETS["9p"]
BOOT_TIMEOUT = 240.0

_PAIR = re.compile(r"(\w+)=(\S+)")


@dataclasses.dataclass(frozen=True)
class BufferReport:
    """One ``VGPU-GUEST dmabuf`` line of the C program: what the kernel said and what the PTE says."""

    name: str
    exp_name: str
    info: str
    v1: str  # the answer to param 1, the earlier revisions' question (revision 3 must refuse it)
    param99: str
    pad1: str
    pte: str
    pte_bits: str
    mmap: str


@dataclasses.dataclass(frozen=True)
class PythonReport:
    """One ``VGPU-GUEST py`` line: what :func:`vgpu.blob.dmabuf.query_map_attr` and the resolver made of it."""

    name: str
    exporter: str
    answer: str
    kind: str
    param99: str
    resolved: str
    provenance: str


def _fields(line: str) -> dict[str, str]:
    return dict(_PAIR.findall(line))


def parse_report(lines: Iterable[str]) -> dict[str, BufferReport]:
    """Buffer name → report, from the guest's lines (failed buffers are absent; see :func:`failures`)."""
    out: dict[str, BufferReport] = {}
    for line in lines:
        if not line.startswith("VGPU-GUEST dmabuf ") or " fail " in line:
            continue
        f = _fields(line)
        out[f["name"]] = BufferReport(
            name=f["name"], exp_name=f["exp_name"], info=f["info"], v1=f["v1"], param99=f["param99"], pad1=f["pad1"],
            pte=f["pte"], pte_bits=f["pte_bits"], mmap=f["mmap"],
        )
    return out


@dataclasses.dataclass(frozen=True)
class MoveReport:
    """One ``VGPU-GUEST dmabuf-move`` line: the moving test buffer after a move, as the kernel and the PTE see it."""

    step: int
    info: str
    pte: str
    pte_bits: str
    same: bool


def parse_moves(lines: Iterable[str]) -> list[MoveReport]:
    out = []
    for line in lines:
        if line.startswith("VGPU-GUEST dmabuf-move ") and " fail " not in line:
            f = _fields(line)
            out.append(MoveReport(int(f["step"]), f["info"], f["pte"], f["pte_bits"], f["same"] == "yes"))
    return out


def failures(lines: Iterable[str]) -> list[str]:
    """The guest's failure lines (a buffer it could not make, a missing page-table dump, a failed exec)."""
    return [line for line in lines if " fail " in line or "ptdump missing" in line]


def parse_python(lines: Iterable[str]) -> dict[str, PythonReport]:
    """Buffer name → what our Python layer answered."""
    out: dict[str, PythonReport] = {}
    for line in lines:
        if not line.startswith("VGPU-GUEST py "):
            continue
        f = _fields(line)
        out[f["name"]] = PythonReport(
            name=f["name"], exporter=f["exporter"], answer=f["answer"], kind=f["kind"], param99=f["param99"],
            resolved=f["resolved"], provenance=f["provenance"],
        )
    return out


def host_root_args(tag: str = HOST_ROOT_TAG) -> tuple[str, ...]:
    """QEMU arguments sharing the host's ``/`` read-only over virtio-9p.

    ``multidevs=remap`` keeps inode numbers unique across the host's several file systems (otherwise QEMU warns
    and the guest may see collisions); ``readonly=on`` because the guest must never write to the host.
    """
    return (
        "-fsdev", f"local,id={tag},path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}",
    )


def chroot_mounts(root: str = GUEST_HOST_ROOT, tag: str = HOST_ROOT_TAG) -> list[str]:
    """Guest shell commands preparing a chroot of the host's root at ``root``: the 9p share read-only, the guest's
    own /dev, /proc and /sys bound in, and a writable tmpfs at :data:`GUEST_SCRATCH` (run it with
    ``TMPDIR=GUEST_SCRATCH``).  Nothing is mounted over a host path the chroot may need (see GUEST_SCRATCH)."""
    return [
        f"mkdir -p {root}",
        f"mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 {tag} {root}",
        f"mount --bind /dev {root}/dev",
        f"mount --bind /proc {root}/proc",
        f"mount --bind /sys {root}/sys",
        f"mkdir -p {root}{GUEST_SCRATCH}",
        f"mount -t tmpfs -o mode=1777 tmpfs {root}{GUEST_SCRATCH}",
    ]


def shadowed(paths: Iterable[Path]) -> list[Path]:
    """Those of ``paths`` the chroot cannot show (under :data:`SHADOWED`), so a caller can refuse to boot with a
    clear reason instead of a guest whose chroot fails with "not found"."""
    out = []
    for path in paths:
        resolved = Path(os.path.abspath(path))
        if any(resolved == top or top in resolved.parents for top in SHADOWED):
            out.append(path)
    return out


def python_command(program: str, *, python: Path | None = None, repo: Path | None = None) -> str:
    """The guest shell command: prepare the chroot of the host root (:func:`chroot_mounts`) and let the C program
    exec our Python probe in it (the fds are inherited across both execs)."""
    interpreter = python or Path(sys.executable)
    repo = repo or paths.project_root()
    root = GUEST_HOST_ROOT
    steps = [
        *chroot_mounts(root),
        shlex.join([
            program, "--exec", "chroot", root, "/usr/bin/env", f"PYTHONPATH={repo}", "PYTHONDONTWRITEBYTECODE=1",
            f"TMPDIR={GUEST_SCRATCH}", str(interpreter), "-m", "vgpu_lab.dmabuf_probe",
        ]),
    ]
    return " && ".join(steps)


CHROOT_SCRIPT = """#!/bin/sh
set -e
{mounts}
{setup}
echo "VGPU-GUEST chroot uptime=$(cut -d' ' -f1 /proc/uptime)"
exec chroot {root} /usr/bin/env PYTHONDONTWRITEBYTECODE=1 TMPDIR={scratch} {python} -B -m {module} {args}
"""


def run_python_in_chroot(module: str, args: Sequence[str] = (), *, kernel: Path, busybox: Path, qemu: Path,
                         work: Path, modules_dir: Path | None = None, setup: Sequence[str] = (),
                         python: Path | None = None, timeout: float = BOOT_TIMEOUT) -> GuestRun:
    """Boot `kernel` with no GPU device and vgem (Debian's kernel gets vgem and 9p from `modules_dir`; the patched
    kernel has them built in), chroot into the host's root shared over 9p and run ``python -m module args`` there
    with the host's venv Python, after the shell lines `setup`. The lab's in-guest programs run this way."""
    interpreter = python or Path(sys.executable)
    hidden = shadowed([interpreter])
    if hidden:
        raise ValueError(f"the guest's chroot cannot show {hidden} (its own /dev, /proc, /sys cover them)")
    script = work / "chroot-python"
    script.write_text(CHROOT_SCRIPT.format(
        mounts="\n".join(chroot_mounts()), setup="\n".join(setup), root=GUEST_HOST_ROOT, scratch=GUEST_SCRATCH,
        python=interpreter, module=module, args=shlex.join(args),
    ))
    script.chmod(0o755)
    modules: tuple[str, ...] = ()
    if modules_dir is not None:
        modules = (*initramfs.EXTRA_MODULE_SETS["vgem"], *initramfs.EXTRA_MODULE_SETS["9p"])
    initrd = initramfs.build_initramfs(
        work / "initrd.gz", busybox=busybox, command="/bin/chroot-python", modules_dir=modules_dir, modules=modules,
        files={"/bin/chroot-python": script},
        wait_for="/dev/dri/card0",  # vgem's node: the only DRM device (no GPU device is attached)
    )
    config = QemuConfig(qemu=qemu, device=None, extra_args=host_root_args())
    return run_guest(kernel=kernel, initrd=initrd, socket_path=None, config=config, timeout=timeout,
                     serial_log=work / "serial.log")


def run_dmabuf_guest(
    *,
    kernel: Path,
    busybox: Path,
    program: Path,
    work: Path,
    qemu: Path | None = None,
    modules_dir: Path | None = None,
    modules: Sequence[str] = (),
    with_python: bool = False,
    python: Path | None = None,
    timeout: float = BOOT_TIMEOUT,
) -> GuestRun:
    """Boot ``kernel`` once with the ``dmabuf_info`` program (and, ``with_python``, our Python on the same fds)."""
    guest_program = "/bin/dmabuf_info"
    command = python_command(guest_program, python=python) if with_python else guest_program
    initrd = initramfs.build_initramfs(
        work / "initrd.gz", busybox=busybox, command=command, modules_dir=modules_dir, modules=modules,
        files={guest_program: program}, wait_for=WAIT_FOR,
    )
    extra: tuple[str, ...] = ("-device", "virtio-gpu-pci")
    if with_python:
        extra += host_root_args()
    config = QemuConfig(device=None, extra_args=extra)
    if qemu is not None:
        config = dataclasses.replace(config, qemu=qemu)
    return run_guest(kernel=kernel, initrd=initrd, socket_path=None, config=config, timeout=timeout,
                     serial_log=work / "serial.log")


def table(c_reports: dict[str, BufferReport], py_reports: dict[str, PythonReport] | None = None) -> str:
    """A plain-text table of one boot (for logs and the benchmark note)."""
    rows = [("buffer", "exp_name", "ioctl", "param 1", "param 99", "pad 1", "PTE", "PTE bits", "python", "provenance")]
    for name in (*BUFFERS, *(n for n in TEST_BUFFERS if n in c_reports)):
        c = c_reports.get(name)
        p = (py_reports or {}).get(name)
        if c is None:
            rows.append((name, "(not made)", "", "", "", "", "", "", "", ""))
            continue
        rows.append((name, c.exp_name, c.info, c.v1, c.param99, c.pad1, c.pte, c.pte_bits,
                     p.answer if p else "", p.provenance if p else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


@dataclasses.dataclass(frozen=True)
class FallbackReport:
    """One ``VGPU-GUEST py-fallback`` line: the resolver on a real fd in one fallback mode (rule, heuristic, none).

    ``resolved``/``provenance`` are None when the resolver refused (``detail`` is then the refusal's text).
    """

    name: str
    mode: str
    exporter: str | None
    answer: str
    resolved: str | None
    provenance: str | None
    detail: str


def parse_fallbacks(lines: Iterable[str]) -> dict[tuple[str, str], FallbackReport]:
    """(buffer name, mode) → what the resolver decided, from :func:`vgpu_lab.dmabuf_probe.fallbacks` lines."""
    prefix = "VGPU-GUEST py-fallback "
    out: dict[tuple[str, str], FallbackReport] = {}
    for line in lines:
        if not line.startswith(prefix):
            continue
        f = json.loads(line[len(prefix):])
        out[(str(f["name"]), str(f["mode"]))] = FallbackReport(
            name=str(f["name"]), mode=str(f["mode"]), exporter=f.get("exporter"), answer=str(f["answer"]),
            resolved=f.get("resolved"), provenance=f.get("provenance"), detail=str(f["detail"]),
        )
    return out
