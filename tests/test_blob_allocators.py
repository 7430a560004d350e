"""Allocators on this host: memfd works; udmabuf, dma-heap and vgem report why they cannot (this host kernel has
none of them — the guest test exercises them for real); every path, failing ones included, leaves no fd behind."""

from __future__ import annotations

import fcntl
import mmap
import os
import resource
from collections.abc import Iterator

import pytest

from vgpu.blob import allocators as al
from vgpu.blob.types import Allocator, CacheAttr

PAGE = al.PAGE_SIZE


def fds() -> set[str]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            out.add(f"{name}->{os.readlink(f'/proc/self/fd/{name}')}")
        except FileNotFoundError:
            pass  # the fd listdir itself used
    return out


@pytest.fixture
def no_leak() -> Iterator[None]:
    before = fds()
    yield
    assert fds() == before


# --- availability ------------------------------------------------------------------------------------------------


def test_memfd_is_available() -> None:
    state = al.MemfdAllocator.available()
    assert state and state.ok and "memfd_create" in state.reason


@pytest.mark.parametrize(
    ("cls", "path", "why"),
    [
        (al.UdmabufAllocator, "/dev/udmabuf", "CONFIG_UDMABUF"),
        (al.DmaHeapAllocator, "/dev/dma_heap/system", "CONFIG_DMABUF_HEAPS_SYSTEM"),
    ],
)
def test_device_allocators_say_why_unavailable(cls: type[al.BaseAllocator], path: str, why: str) -> None:
    state = cls.available()
    if os.path.exists(path):
        pytest.skip(reason=f"{path} exists here, so the unavailable case cannot happen (the guest test covers it)")
    assert not state and path in state.reason and why in state.reason


def test_vgem_says_why_unavailable() -> None:
    state = al.VgemAllocator.available()
    if state.ok:
        pytest.skip(reason="this machine has a vgem node, so the no-vgem case cannot happen")
    assert "vgem" in state.reason


@pytest.mark.parametrize("name", ["udmabuf", "dma-heap", "vgem"])
def test_unavailable_allocator_raises_with_reason_and_no_leak(name: str, no_leak: None) -> None:
    if al.ALLOCATORS[name].available():
        pytest.skip(reason=f"{name} is available here, so its unavailable case cannot happen")
    with al.open_allocator(name) as allocator, pytest.raises(al.AllocatorUnavailable, match=name):
        allocator.allocate(PAGE)


def test_availability_in_auto_order() -> None:
    states = al.availability()
    assert list(states) == ["udmabuf", "dma-heap", "vgem", "memfd"]
    assert states["memfd"].ok


def test_auto_picks_first_available_exporter_else_memfd() -> None:
    with al.auto() as allocator:
        expected = next(n for n in al.AUTO_ORDER if al.ALLOCATORS[n].available())
        assert allocator.name == expected
    with al.open_allocator("auto") as allocator:
        assert allocator.name == expected


def test_open_allocator_unknown_name_lists_known() -> None:
    with pytest.raises(ValueError, match="known: auto, memfd, udmabuf, dma-heap, vgem"):
        al.open_allocator("ion")


# --- memfd, the one allocator this host has -----------------------------------------------------------------


def test_memfd_buffer_is_page_rounded_sealed_and_knows_its_cacheability(no_leak: None) -> None:
    with al.MemfdAllocator() as allocator:
        allocator_proto: Allocator = allocator  # satisfies the shared protocol
        buf = allocator_proto.allocate(PAGE + 1)
        try:
            assert buf.size == 2 * PAGE and os.fstat(buf.fd).st_size == 2 * PAGE
            assert buf.allocator == "memfd" and buf.exporter is None and not buf.is_dmabuf
            assert buf.allocator_attr is CacheAttr.CACHED and "pgprot" in buf.allocator_reason
            assert buf.drm_driver is None
            seals = fcntl.fcntl(buf.fd, fcntl.F_GET_SEALS)
            assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
            with pytest.raises(PermissionError):
                os.ftruncate(buf.fd, PAGE)  # nobody can shrink it under a VMM's mapping
            assert fcntl.fcntl(buf.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            with mmap.mmap(buf.fd, buf.size) as m:
                m[:5] = b"hello"
            assert os.pread(buf.fd, 5, 0) == b"hello"
        finally:
            buf.close()
        assert buf.fd == -1


@pytest.mark.parametrize("size", [0, -4096, 1.5, True, "4096"])
def test_bad_sizes_are_refused(size: object, no_leak: None) -> None:
    with al.MemfdAllocator() as allocator, pytest.raises(al.AllocationError, match="positive integer"):
        allocator.allocate(size)  # type: ignore[arg-type]


def test_size_cap_applies_to_the_rounded_size(no_leak: None) -> None:
    with al.MemfdAllocator(max_size=4 * PAGE) as allocator:
        allocator.allocate(4 * PAGE).close()
        with pytest.raises(al.SizeLimitExceeded, match="over the cap"):
            allocator.allocate(4 * PAGE + 1)


def test_cap_below_a_page_is_refused() -> None:
    with pytest.raises(ValueError, match="below one page"):
        al.MemfdAllocator(max_size=100)


def test_size_cap_is_checked_before_any_device_is_touched(no_leak: None) -> None:
    # Even an unavailable allocator refuses an oversized request as oversized: the guest learns nothing else.
    with al.UdmabufAllocator(max_size=PAGE) as allocator, pytest.raises(al.SizeLimitExceeded):
        allocator.allocate(2 * PAGE)


def test_kernel_failure_mid_allocation_leaks_nothing(no_leak: None) -> None:
    # A real kernel refusal: with RLIMIT_FSIZE below the size, ftruncate of the new memfd fails with EFBIG
    # (Python ignores SIGXFSZ), after memfd_create succeeded — that fd must be closed.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (PAGE, hard))
    try:
        with al.MemfdAllocator() as allocator, pytest.raises(OSError) as exc:
            allocator.allocate(4 * PAGE)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert exc.value.errno == 27  # EFBIG


def test_many_buffers_each_own_one_fd(no_leak: None) -> None:
    with al.MemfdAllocator() as allocator:
        before = len(fds())
        bufs = [allocator.allocate(PAGE) for _ in range(20)]
        assert len({b.fd for b in bufs}) == 20 and len(fds()) == before + 20
        for b in bufs:
            b.close()
            b.close()  # closing twice is harmless


def test_page_round() -> None:
    assert [al.page_round(n) for n in (1, PAGE, PAGE + 1)] == [PAGE, PAGE, 2 * PAGE]
