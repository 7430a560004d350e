"""End to end: our dma-buf layer, allocators and resolver against the *real* exporters of a 6.12 Linux guest.

Why a guest: this host's kernel has no udmabuf, no dma-heap and no DRM, so only a guest can give us real dma-buf
fds with real exporter names and the kernel's real answer to DMA_BUF_IOCTL_INFO (ENOTTY: the proposal was never
merged). QEMU 10 (TCG) boots the Debian 6.12 kernel with vgem and 9p loaded and no GPU device at all; the host's
root filesystem is shared read-only over 9p, and the guest chroots into it (with its own /dev, /proc, /sys and a
scratch tmpfs bound in: :func:`vgpu_lab.dmabuf_guest.chroot_mounts`) to run *this file* with the host's own venv
Python in ``--guest`` mode. The guest prints one ``VGPU-GUEST dmabuf <json>`` line per finding on the serial
console; the host side parses and asserts.

In CI (CI=true) a missing lab component fails the test; elsewhere it skips, naming the component.
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
from typing import Any, TypeVar

import pytest

from vgpu_lab.dmabuf_guest import GUEST_SCRATCH
from vgpu_lab.shell import ProvisionError

REPO = Path(__file__).resolve().parent.parent
PREFIX = "VGPU-GUEST dmabuf "
BOOT_TIMEOUT = 240.0
SIZE = 64 << 10
#: Written by the guest side into its scratch tmpfs (the chroot's /tmp is the host's, read-only).
RULES = f"{GUEST_SCRATCH}/vgpu-cache.toml"

T = TypeVar("T")


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
# host side: pytest


GUEST_SCRIPT = """#!/bin/sh
set -e
{mounts}
echo "VGPU-GUEST dmabuf-chroot uptime=$(cut -d' ' -f1 /proc/uptime)"
exec chroot {root} /usr/bin/env TMPDIR={scratch} {python} -B {script} --guest
"""


def _component(name: str, make: Callable[[], T]) -> T:
    # Imported here: this file also runs inside the guest as a script, where `tests` is not importable.
    from tests.conftest import unavailable

    try:
        return make()
    except (ProvisionError, OSError) as exc:
        message = f"lab component {name!r} unavailable: {exc}"
        unavailable(message)


def _records(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line[len(PREFIX) :]) for line in lines if line.startswith(PREFIX)]


@pytest.mark.e2e
def test_real_exporters_in_a_guest(tmp_path: Path) -> None:
    from vgpu_lab import dmabuf_guest, initramfs, provision
    from vgpu_lab.qemu import QemuConfig, run_guest

    provisioner = _component("cache", provision.Provisioner)
    qemu = _component("qemu", provisioner.qemu)
    kernel = _component("kernel", provisioner.guest_kernel)
    busybox = _component("busybox", provisioner.busybox)

    here = Path(__file__).resolve()
    hidden = dmabuf_guest.shadowed([here, Path(sys.executable)])
    assert not hidden, f"the guest's chroot cannot show {hidden} (its own /dev, /proc, /sys cover them)"
    script = tmp_path / "dmabuf-guest"
    script.write_text(GUEST_SCRIPT.format(
        mounts="\n".join(dmabuf_guest.chroot_mounts()), root=dmabuf_guest.GUEST_HOST_ROOT,
        scratch=dmabuf_guest.GUEST_SCRATCH, python=sys.executable, script=here,
    ))
    script.chmod(0o755)
    modules = (*initramfs.EXTRA_MODULE_SETS["vgem"], *initramfs.EXTRA_MODULE_SETS["9p"])
    initrd = initramfs.build_initramfs(
        tmp_path / "initrd.gz",
        busybox=busybox,
        command="/bin/dmabuf-guest",
        modules_dir=kernel.modules_dir,
        modules=modules,
        files={"/bin/dmabuf-guest": script},
        wait_for="/dev/dri/card0",  # vgem's node: the only DRM device (no GPU device is attached)
    )
    config = QemuConfig(qemu=qemu.system, device=None, extra_args=dmabuf_guest.host_root_args())
    guest = run_guest(
        kernel=kernel.vmlinuz,
        initrd=initrd,
        socket_path=None,  # no vhost-user device: the guest needs no GPU for this
        config=config,
        timeout=BOOT_TIMEOUT,
        serial_log=tmp_path / "serial.log",
    )
    context = guest.describe()
    records = _records(guest.guest_lines())
    print(f"guest run: {guest.elapsed:.2f} s wall")
    for r in records:
        print(json.dumps(r, sort_keys=True))
    assert not guest.timed_out and guest.guest_status == 0, context
    assert not [r for r in records if r["kind"] == "exception"], context
    assert records and records[-1]["kind"] == "done", context
    start = next(r for r in records if r["kind"] == "start")
    assert start["kernel"].startswith("6.12."), context

    buffers = {r["allocator"]: r for r in records if r["kind"] == "buffer"}
    expect = {
        # allocator: (exp_name, DRM driver, resolved attribute)
        "udmabuf": ("udmabuf", None, "CACHED"),
        "dma-heap": ("system", None, "CACHED"),
        "vgem": ("drm", "vgem", "WC"),
        "memfd": (None, None, "CACHED"),
    }
    for name, (exporter, driver, attr) in expect.items():
        b = buffers[name]
        assert b["available"], (name, b["reason"])
        assert (b["exporter"], b["fdinfo_exporter"], b["drm_driver"]) == (exporter, exporter, driver), b
        assert b["size"] == b["lseek_size"] == SIZE, b
        if exporter is not None:
            assert b["fdinfo_size"] == SIZE and f"exp_name:\t{exporter}" in b["raw_fdinfo"], b
            assert b["sync"] == "ok", b
        else:
            assert b["sync"] == "Inappropriate ioctl for device", b
        assert b["mmap_roundtrip"] is True, b
        # A stock kernel: the real ENOTTY for the proposed ioctl, whatever the param.
        assert (b["kernel"], b["kernel_kind"], b["kernel_param99"]) == ("ENOTTY", "ENOTTY", "ENOTTY"), b
        assert (b["attr"], b["provenance"]) == (attr, "allocator"), b
        assert f"{name}: " in b["detail"] and "kernel: DMA_BUF_IOCTL_INFO: ENOTTY" in b["detail"], b
        assert b["fd_leak"] == 0, b

        ext = b["external"]
        assert "unresolved" in ext["plain"] and "ENOTTY" in ext["plain"]["unresolved"], ext
        if exporter is None:  # a memfd from outside: nobody can vouch for it, and the heuristic does not guess
            assert "unresolved" in ext["heuristic"] and "unresolved" in ext["rules"], ext
            continue
        # The legacy heuristic keys on the name: "drm" and "udmabuf" and "system" are all "not i915" → WC.
        assert (ext["heuristic"]["attr"], ext["heuristic"]["provenance"]) == ("WC", "legacy heuristic"), ext
        assert "ENOTTY" in ext["heuristic"]["detail"], ext
        if exporter == "drm":
            assert (ext["rules"]["attr"], ext["rules"]["provenance"]) == ("UNCACHED", "operator rule"), ext
            assert f"rule exporters.drm = uncached in {RULES}" in ext["rules"]["detail"], ext
        else:
            assert ext["rules"]["provenance"] == "legacy heuristic", ext

    errors = next(r for r in records if r["kind"] == "errors")
    assert "UDMABUF_CREATE of 134217728 bytes: Invalid argument" in errors["udmabuf_128M"], errors
    assert "over the cap" in errors["vgem_over_cap"], errors
    assert errors["fd_leak"] == 0, errors

    misc = next(r for r in records if r["kind"] == "misc")
    assert misc["vgem_node"] == "/dev/dri/card0" and misc["drm_version"]["name"] == "vgem", misc
    assert misc["auto"] == "udmabuf", misc

    cli = next(r for r in records if r["kind"] == "cli")
    assert cli["own_status"] == 0 and cli["own"]["exporter"] == "system", cli
    assert cli["own"]["resolution"]["provenance"] == "allocator" and cli["own"]["resolution"]["map_info"] == 1, cli
    peer = cli["peer"]
    assert cli["peer_status"] == 0 and peer["exporter"] == "drm" and peer["kernel"]["answer"] == "ENOTTY", cli
    assert peer["resolution"]["attr"] == "WC" and peer["resolution"]["provenance"] == "legacy heuristic", cli
    assert peer["resolution"]["map_info"] == 3, cli


if __name__ == "__main__":
    if sys.argv[1:] == ["--guest"]:
        sys.path.insert(0, str(REPO))
        sys.exit(guest_main())
    sys.exit(f"usage: {sys.argv[0]} --guest (inside the lab guest; pytest runs the host side)")
