"""Inside a guest: our dma-buf layer, allocators and resolver against the *real* exporters of a 6.12 kernel.

Why a guest: the host's kernel has no udmabuf, no dma-heap and no DRM, so only a guest can give us real dma-buf fds
with real exporter names and the kernel's real answer to DMA_BUF_IOCTL_INFO (ENOTTY on Debian's kernel: the
proposal was never merged). QEMU 10 (TCG) boots the Debian 6.12 kernel with vgem and 9p loaded and no GPU device
at all; the host's root filesystem is shared read-only over 9p, and the guest chroots into it (its own /dev, /proc,
/sys and a scratch tmpfs bound in: :func:`vgpu_lab.dmabuf_guest.chroot_mounts`) to run this module with the host's
own venv Python. It prints one ``VGPU-GUEST dmabuf <json>`` line per finding on the serial console:

- ``buffer`` per allocator (udmabuf, dma-heap, vgem, memfd): exporter, fdinfo, sizes, the kernel's answer, the
  resolved attribute with its provenance, an mmap round trip bracketed by DMA_BUF_IOCTL_SYNC, the same fd
  resolved from outside (no allocator knowledge), fds left behind;
- ``errors``: real kernel refusals on the allocation path; ``misc``: the vgem node and the auto allocator;
- ``cli``: ``vgpu-dmabuf-info`` on its own buffer and on a vgem dma-buf held by another process;
- ``start`` / ``exception`` / ``done``.

:func:`run_exporters_guest` boots it on the host and returns the records; ``tests/e2e/test_dmabuf_guest.py``
judges them. ``python -m vgpu_lab.exporters_guest`` is the guest side (it refuses to run elsewhere usefully: it
needs the guest's exporters).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import mmap
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vgpu_lab import dmabuf_guest
from vgpu_lab.guest_kernel import GuestKernel
from vgpu_lab.qemu import GuestRun

PREFIX = "VGPU-GUEST dmabuf "
BOOT_TIMEOUT = 240.0
SIZE = 64 << 10
#: Written by the guest side into its scratch tmpfs (the chroot's /tmp is the host's, read-only).
RULES = f"{dmabuf_guest.GUEST_SCRATCH}/vgpu-cache.toml"


# ================================================================================================================
# guest side: runs inside the chroot on the guest kernel


def _emit(kind: str, **fields: Any) -> None:
    print(PREFIX + json.dumps({"kind": kind, **fields}, sort_keys=True), flush=True)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _guest_buffer(name: str, rules_path: str) -> None:
    """Allocate with one allocator and report everything the kernel and the resolver say about it."""
    from vgpu.blob import allocators, dmabuf
    from vgpu.blob.dmabuf import DmaBuf
    from vgpu.blob.resolve import Resolver
    from vgpu.blob.rules import load_rules
    from vgpu.blob.types import Unresolved

    before = _fds()
    state = allocators.ALLOCATORS[name].available()
    record: dict[str, Any] = {"allocator": name, "available": state.ok, "reason": state.reason}
    if not state:
        _emit("buffer", **record)
        return
    with allocators.open_allocator(name) as allocator:
        buf = allocator.allocate(SIZE - 1)
    try:
        info = dmabuf.read_fdinfo(buf.fd)
        answer = dmabuf.query_map_attr(buf.fd)
        res = Resolver().resolve(buf)
        record.update(
            exporter=buf.exporter,
            fdinfo_exporter=info.exporter,
            fdinfo_size=info.size,
            size=buf.size,
            lseek_size=dmabuf.fd_size(buf.fd),
            drm_driver=buf.drm_driver,
            kernel=answer.code,
            kernel_kind=answer.kind.value,
            kernel_param99=dmabuf.query_info(buf.fd, 99).code,
            attr=res.attr.name,
            provenance=res.provenance.value,
            detail=res.detail,
        )
        # CPU access through a real mmap, bracketed by real DMA_BUF_IOCTL_SYNC calls (dma-bufs only).
        with mmap.mmap(buf.fd, buf.size) as m:
            if buf.is_dmabuf:
                with dmabuf.cpu_access(buf.fd, read=True, write=True):
                    m[: len(name)] = name.encode()
                with dmabuf.cpu_access(buf.fd, read=True):
                    record["mmap_roundtrip"] = m[: len(name)] == name.encode()
                record["sync"] = "ok"
            else:
                try:
                    dmabuf.sync(buf.fd, 0)
                except OSError as exc:
                    record["sync"] = exc.strerror
                m[:4] = b"memf"
                record["mmap_roundtrip"] = m[:4] == b"memf"
        if not buf.is_dmabuf:
            record["raw_fdinfo"] = None
        else:
            with open(f"/proc/self/fdinfo/{buf.fd}") as f:
                record["raw_fdinfo"] = f.read()
        # The same fd seen from outside (no allocator knowledge): the resolver must fall through to rules or
        # the legacy heuristic, or refuse; the kernel's real ENOTTY rides along in every detail.
        with DmaBuf.open(f"/proc/{os.getpid()}/fd/{buf.fd}") as held:
            external = held.into_host_buffer()
        try:
            outside: dict[str, Any] = {}
            for label, resolver in (
                ("plain", Resolver()),
                ("heuristic", Resolver(legacy_heuristic=True)),
                ("rules", Resolver(rules=load_rules(rules_path), legacy_heuristic=True)),
            ):
                try:
                    r = resolver.resolve(external)
                    outside[label] = {"attr": r.attr.name, "provenance": r.provenance.value, "detail": r.detail}
                except Unresolved as exc:
                    outside[label] = {"unresolved": str(exc)}
            record["external"] = outside
        finally:
            external.close()
    finally:
        buf.close()
    record["fd_leak"] = _fds() - before
    _emit("buffer", **record)


def _guest_errors() -> None:
    """Real kernel refusals on the allocation path leave no fd behind."""
    from vgpu.blob import allocators

    before = _fds()
    result: dict[str, Any] = {}
    # Two refusals alike in shape, each by a different party: the kernel's own cap, then our allocator's.
    # Debian's udmabuf caps one buffer at size_limit_mb = 64 MiB: 128 MiB is the kernel's EINVAL.
    with allocators.UdmabufAllocator(max_size=1 << 30) as allocator:
        try:
            allocator.allocate(128 << 20).close()
            result["udmabuf_128M"] = "allocated"
        except allocators.AllocationError as exc:
            result["udmabuf_128M"] = str(exc)
    with allocators.VgemAllocator(max_size=1 << 20) as allocator:
        try:
            allocator.allocate(2 << 20).close()
            result["vgem_over_cap"] = "allocated"
        except allocators.SizeLimitExceeded as exc:
            result["vgem_over_cap"] = str(exc)
    result["fd_leak"] = _fds() - before
    _emit("errors", **result)


def _guest_misc() -> None:
    from vgpu.blob import allocators, dmabuf

    path, seen = allocators.find_drm_node("vgem")
    version: dict[str, Any] = {}
    if path is not None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            v = dmabuf.drm_version(fd)
            version = {"name": v.name, "major": v.major, "desc": v.desc, "date": v.date}
        finally:
            os.close(fd)
    with allocators.auto() as allocator:
        auto_name = allocator.name
    _emit("misc", vgem_node=path, seen=seen, drm_version=version, auto=auto_name)


def _guest_cli() -> None:
    """The console tool on a buffer it allocates, and on a vgem dma-buf held by another process (pidfd_getfd)."""
    from vgpu import dmabuf_info
    from vgpu.blob import allocators

    def tool(*argv: str) -> tuple[int, Any]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = dmabuf_info.main(list(argv))
        return status, json.loads(out.getvalue())

    status, own = tool("--allocate", "dma-heap", "--json")
    with allocators.VgemAllocator() as allocator:
        buf = allocator.allocate(SIZE)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the peer: holds the buffer until the parent is done
        os.close(writer)
        os.read(reader, 1)
        os._exit(0)
    try:
        os.close(reader)
        buf_fd = buf.fd
        buf.close()  # the parent's copy goes; the child's inherited fd keeps the dma-buf alive
        peer_status, peer = tool(f"/proc/{pid}/fd/{buf_fd}", "--json", "--legacy-heuristic")
    finally:
        os.close(writer)
        os.waitpid(pid, 0)
    _emit("cli", own_status=status, own=own, peer_status=peer_status, peer=peer)


def guest_main() -> int:
    """Every step, each reported even when another failed."""
    started = time.monotonic()
    rules = RULES
    Path(rules).write_text('[exporters]\ndrm = "uncached"\n')
    _emit("start", uptime=float(Path("/proc/uptime").read_text().split()[0]), kernel=os.uname().release)
    steps: list[Callable[[], None]] = [
        *(functools.partial(_guest_buffer, name, rules) for name in ("udmabuf", "dma-heap", "vgem", "memfd")),
        _guest_errors,
        _guest_misc,
        _guest_cli,
    ]
    for step in steps:
        try:
            step()
        except Exception as exc:  # report and go on: one broken exporter must not hide the others' results
            _emit("exception", error=f"{type(exc).__name__}: {exc}")
    _emit("done", seconds=round(time.monotonic() - started, 2))
    return 0


# ================================================================================================================
# host side: boot the guest and collect what it found

def records(lines: list[str]) -> list[dict[str, Any]]:
    """The guest's findings, in order, from its serial lines."""
    return [json.loads(line[len(PREFIX):]) for line in lines if line.startswith(PREFIX)]


def run_exporters_guest(*, kernel: GuestKernel, busybox: Path, qemu: Path,
                        work: Path) -> tuple[GuestRun, list[dict[str, Any]]]:
    """Boot Debian's kernel with vgem and 9p and run the guest side in a chroot of the host root."""
    run = dmabuf_guest.run_python_in_chroot("vgpu_lab.exporters_guest", kernel=kernel.vmlinuz, busybox=busybox,
                                            qemu=qemu, work=work, modules_dir=kernel.modules_dir,
                                            timeout=BOOT_TIMEOUT)
    return run, records(run.guest_lines())


if __name__ == "__main__":
    sys.exit(guest_main())
