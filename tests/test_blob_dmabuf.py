"""The dma-buf layer on this host: real memfds, real ENOTTY; fakes only for kernel answers that cannot exist here.

This host kernel has no dma-buf exporter at all, so the answers a patched kernel would give are played in
tests/test_blob_uapi_revisions.py and by a fake ``ioctl`` in the tests whose names say "fake". The real exporters
are exercised inside a guest by tests/e2e/test_dmabuf_guest.py and tests/e2e/test_kernel_ioctl.py.
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from vgpu.blob import dmabuf, uapi
from vgpu.blob.dmabuf import DmaBuf, KernelAnswer, KernelAnswerKind


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("test-blob", os.MFD_CLOEXEC)
    os.ftruncate(fd, 3 * 4096)
    yield fd
    try:
        os.close(fd)
    except OSError:
        pass


# --- size and fdinfo -------------------------------------------------------------------------------------------


def test_fd_size_is_lseek_end_and_rewinds(memfd: int) -> None:
    os.lseek(memfd, 100, os.SEEK_SET)
    assert dmabuf.fd_size(memfd) == 3 * 4096
    assert os.lseek(memfd, 0, os.SEEK_CUR) == 0


def test_fdinfo_of_memfd_has_no_exporter(memfd: int) -> None:
    info = dmabuf.read_fdinfo(memfd)
    assert "flags" in info.fields and "ino" in info.fields
    assert info.exporter is None and not info.is_dmabuf and info.size is None


def test_parse_fdinfo_of_a_dmabuf_text() -> None:
    # Verbatim from the 6.12 lab guest (vgpu_lab.exporters_guest): a 64 KiB udmabuf's fdinfo.
    text = "pos:\t0\nflags:\t02000002\nmnt_id:\t12\nino:\t1\nsize:\t65536\ncount:\t1\nexp_name:\tudmabuf\n"
    info = dmabuf.parse_fdinfo(text)
    assert info.exporter == "udmabuf" and info.size == 65536 and info.is_dmabuf


# --- DMA_BUF_IOCTL_INFO, real ------------------------------------------------------------------------------------


def test_query_map_attr_on_memfd_is_real_enotty(memfd: int) -> None:
    answer = dmabuf.query_map_attr(memfd)
    assert answer == KernelAnswer(KernelAnswerKind.ENOTTY, errno=errno.ENOTTY)
    assert answer.attr is None and answer.code == "ENOTTY"
    assert answer.describe().startswith("DMA_BUF_IOCTL_INFO: ENOTTY, no such ioctl")


def test_query_map_attr_on_closed_fd_raises(memfd: int) -> None:
    os.close(memfd)
    with pytest.raises(OSError) as exc:
        dmabuf.query_map_attr(memfd)
    assert exc.value.errno == errno.EBADF


# Answers of kernels that have DMA_BUF_IOCTL_INFO (every revision, values, errnos) are played in
# tests/test_blob_uapi_revisions.py.


# --- DMA_BUF_IOCTL_SYNC ------------------------------------------------------------------------------------------


def test_sync_on_memfd_is_enotty(memfd: int) -> None:
    with pytest.raises(OSError) as exc, dmabuf.cpu_access(memfd, write=True):
        pass
    assert exc.value.errno == errno.ENOTTY


def test_cpu_access_needs_a_direction(memfd: int) -> None:
    with pytest.raises(ValueError, match="read, write or both"), dmabuf.cpu_access(memfd, read=False):
        pass


def test_fake_kernel_cpu_access_brackets_even_on_error(monkeypatch: pytest.MonkeyPatch, memfd: int) -> None:
    calls: list[tuple[int, int]] = []

    def ioctl(fd: int, request: int, arg: bytes, mutate: bool = False) -> bytes:
        calls.append((request, int(uapi.dma_buf_sync.parse(arg).flags)))
        return arg

    monkeypatch.setattr(fcntl, "ioctl", ioctl)
    with pytest.raises(RuntimeError), dmabuf.cpu_access(memfd, read=True, write=True):
        raise RuntimeError("body failed")
    assert calls == [(0x40086200, uapi.DMA_BUF_SYNC_START | 3), (0x40086200, uapi.DMA_BUF_SYNC_END | 3)]


# --- DmaBuf ownership and fd paths -----------------------------------------------------------------------------------


def test_dmabuf_open_proc_self_dup_and_close(memfd: int) -> None:
    before = fd_count()
    with DmaBuf.open(f"/proc/self/fd/{memfd}") as buf:
        assert buf.fd != memfd and buf.size == 3 * 4096 and buf.exporter is None
        assert fcntl.fcntl(buf.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert buf.query_map_attr().kind is KernelAnswerKind.ENOTTY
        assert fd_count() == before + 1
    assert buf.closed and fd_count() == before
    buf.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        _ = buf.fd


def test_dmabuf_open_dev_fd_path(memfd: int) -> None:
    with DmaBuf.open(f"/dev/fd/{memfd}") as buf:
        os.pwrite(memfd, b"shared", 0)
        assert os.pread(buf.fd, 6, 0) == b"shared"  # the same open file, not a copy


def test_dmabuf_open_another_process_fd_with_pidfd_getfd() -> None:
    code = (
        "import os,sys\n"
        "fd=os.memfd_create('peer'); os.ftruncate(fd, 8192); os.pwrite(fd, b'peer', 0)\n"
        "print(fd, flush=True); sys.stdin.read()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        target = int(child.stdout.readline())
        with DmaBuf.open(f"/proc/{child.pid}/fd/{target}") as buf:
            assert buf.size == 8192 and os.pread(buf.fd, 4, 0) == b"peer"
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)


def test_dmabuf_open_missing_fd_raises_without_leak() -> None:
    before = fd_count()
    with pytest.raises(OSError):
        DmaBuf.open("/proc/self/fd/999999")
    with pytest.raises(OSError):
        DmaBuf.open(f"/proc/{os.getpid() + 10_000_000}/fd/3")
    assert fd_count() == before


def test_into_host_buffer_transfers_ownership(memfd: int) -> None:
    before = fd_count()
    buf = DmaBuf.open(f"/proc/self/fd/{memfd}")
    host = buf.into_host_buffer()
    assert buf.closed and host.fd >= 0 and host.allocator == "external" and not host.is_dmabuf
    assert host.size == 3 * 4096 and fd_count() == before + 1
    buf.close()  # must not close the fd the HostBuffer now owns
    assert fd_count() == before + 1
    host.close()
    assert fd_count() == before


def test_dmabuf_rejects_negative_fd() -> None:
    with pytest.raises(ValueError):
        DmaBuf(-1)
