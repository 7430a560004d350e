"""Host buffer allocators: where blob memory comes from, and what each source knows about its cacheability.

Why several: a dma-buf from a real exporter is what a VMM (and, on a kernel with ``DMA_BUF_IOCTL_INFO``, the
kernel) can reason about, but which exporters exist depends on the host kernel — this project's host has none
of them, a 6.12 guest has all three. Each allocator states, with the kernel fact behind it, how user mappings of
its buffers are cached; that statement is the resolver's second source after the kernel itself.

Ownership: an allocator owns at most one device fd (``/dev/udmabuf``, the heap, the vgem node), opened on first
use and closed by :meth:`close`; every buffer it returns owns exactly its own fd. No path — a size over the cap,
a failing ioctl, an unreadable fdinfo — leaves an fd behind.
"""

from __future__ import annotations

import abc
import fcntl
import glob
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from . import uapi
from .dmabuf import drm_version, fd_size, read_fdinfo
from .types import CacheAttr, FdOwner, HostBuffer

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: Per-buffer cap when the caller gives none: large enough for a 4K RGBA frame, small enough that a guest
#: cannot make us pin a large share of host memory with one request.
DEFAULT_MAX_SIZE = 256 << 20

UDMABUF_DEVICE = "/dev/udmabuf"
DMA_HEAP_SYSTEM = "/dev/dma_heap/system"
DRM_CARD_GLOB = "/dev/dri/card*"


class AllocationError(Exception):
    """A buffer could not be made; the message says which allocator and why."""


class AllocatorUnavailable(AllocationError):
    """The allocator's kernel facility does not exist here (or we may not use it)."""


class SizeLimitExceeded(AllocationError):
    """The (page-rounded) size is over the cap the caller set."""


@dataclass(frozen=True)
class Availability:
    """Whether an allocator can work on this machine, and if not, the reason to show an operator."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


def page_round(size: int) -> int:
    return -(-size // PAGE_SIZE) * PAGE_SIZE


def _device_availability(path: str, missing: str) -> Availability:
    if not os.path.exists(path):
        return Availability(False, f"no {path} ({missing})")
    if not os.access(path, os.R_OK | os.W_OK):
        return Availability(False, f"{path} exists but this process may not open it read-write")
    return Availability(True, f"{path}")


def _close_on_error(fd: int, build: Callable[[], HostBuffer]) -> HostBuffer:
    try:
        return build()
    except BaseException:
        os.close(fd)
        raise


def _sealed_memfd(name: str, size: int, seals: int) -> int:
    """A memfd of ``size`` bytes whose size nobody can change afterwards (a VMM mapping it must not SIGBUS)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


class BaseAllocator(FdOwner, abc.ABC):
    """What every allocator shares: size checks, the device fd's life, and turning a new fd into a HostBuffer.

    Subclasses set :attr:`name`, :attr:`cache_attr` and :attr:`cache_reason` and implement :meth:`_make`, which
    returns one new fd owned by the caller (plus the DRM driver name for PRIME exports).
    """

    name: str
    cache_attr: CacheAttr
    cache_reason: str
    device_path: str | None = None
    #: Whether the fds made are dma-bufs, whose exporter the kernel names (fdinfo's exp_name); a memfd has none,
    #: so its allocator does not ask /proc for every buffer (an open, a read and a parse: 15-20 us).
    makes_dmabufs: bool = True

    def __init__(self, *, max_size: int = DEFAULT_MAX_SIZE) -> None:
        if max_size < PAGE_SIZE:
            raise ValueError(f"max_size {max_size} is below one page ({PAGE_SIZE})")
        self.max_size = max_size
        self._owned = -1

    @classmethod
    @abc.abstractmethod
    def available(cls) -> Availability:
        """Whether this machine's kernel offers what the allocator needs, without allocating anything."""

    def checked_size(self, size: int) -> int:
        """``size`` page-rounded, refused when not positive or over the cap (before anything is allocated)."""
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise AllocationError(f"{self.name}: size must be a positive integer, got {size!r}")
        rounded = page_round(size)
        if rounded > self.max_size:
            raise SizeLimitExceeded(
                f"{self.name}: {size} bytes (page-rounded {rounded}) is over the cap of {self.max_size}"
            )
        return rounded

    def allocate(self, size: int) -> HostBuffer:
        rounded = self.checked_size(size)
        fd, drm_driver = self._make(rounded)
        return _close_on_error(fd, lambda: self._wrap(fd, rounded, drm_driver))

    @abc.abstractmethod
    def _make(self, size: int) -> tuple[int, str | None]:
        """Make one buffer of exactly ``size`` (page-rounded) bytes; the returned fd belongs to the caller."""

    def _wrap(self, fd: int, size: int, drm_driver: str | None) -> HostBuffer:
        actual = fd_size(fd)
        if actual < size:
            raise AllocationError(f"{self.name}: asked for {size} bytes, the kernel made {actual}")
        return HostBuffer(
            fd=fd,
            size=actual,
            allocator=self.name,
            exporter=read_fdinfo(fd).exporter if self.makes_dmabufs else None,
            allocator_attr=self.cache_attr,
            allocator_reason=self.cache_reason,
            drm_driver=drm_driver,
        )

    def _device_fd(self) -> int:
        """The allocator's device, opened once; unavailable devices raise AllocatorUnavailable."""
        if self._owned < 0:
            state = self.available()
            if not state:
                raise AllocatorUnavailable(f"{self.name}: {state.reason}")
            assert self.device_path is not None
            self._owned = os.open(self.device_path, os.O_RDWR | os.O_CLOEXEC)
        return self._owned

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} max_size={self.max_size}>"


class MemfdAllocator(BaseAllocator):
    """A sealed memfd: not a dma-buf, works on every Linux.

    Cacheability: memfd is shmem; an mmap of it faults in ordinary page-cache pages with the VMA's default
    pgprot (shmem_fault → finish_fault → set_pte with vma->vm_page_prot), i.e. write-back → CACHED.
    """

    name = "memfd"
    cache_attr = CacheAttr.CACHED
    cache_reason = "shmem pages are mapped with the VMA's default pgprot (write-back)"
    makes_dmabufs = False

    @classmethod
    def available(cls) -> Availability:
        if not hasattr(os, "memfd_create"):
            return Availability(False, "os.memfd_create is missing (not Linux)")
        return Availability(True, "memfd_create(2)")

    def _make(self, size: int) -> tuple[int, str | None]:
        seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        return _sealed_memfd("vgpu-blob", size, seals), None


class UdmabufAllocator(BaseAllocator):
    """A memfd turned into a dma-buf by ``UDMABUF_CREATE`` (exp_name ``udmabuf``).

    Cacheability: udmabuf's vm_fault handler inserts the memfd's shmem (or hugetlb) pfns with vmf_insert_pfn
    and the VMA's default pgprot, the same memory type as the memfd itself → CACHED. The memfd must carry
    F_SEAL_SHRINK and must not carry F_SEAL_WRITE; udmabuf pins the pages, so the memfd is closed right after.
    Debian's udmabuf caps one buffer at ``size_limit_mb`` (64 MiB by default): bigger asks get the kernel's EINVAL.
    """

    name = "udmabuf"
    cache_attr = CacheAttr.CACHED
    cache_reason = "udmabuf faults in the memfd's shmem pages with the VMA's default pgprot (write-back)"
    device_path = UDMABUF_DEVICE

    @classmethod
    def available(cls) -> Availability:
        return _device_availability(UDMABUF_DEVICE, "kernel without CONFIG_UDMABUF")

    def _make(self, size: int) -> tuple[int, str | None]:
        device = self._device_fd()
        memfd = _sealed_memfd("vgpu-udmabuf", size, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        try:
            arg = bytearray(
                uapi.udmabuf_create.build(
                    {"memfd": memfd, "flags": uapi.UDMABUF_FLAGS_CLOEXEC, "offset": 0, "size": size}
                )
            )
            try:
                fd = fcntl.ioctl(device, uapi.UDMABUF_CREATE, arg, True)
            except OSError as exc:
                raise AllocationError(f"udmabuf: UDMABUF_CREATE of {size} bytes: {exc.strerror}") from exc
        finally:
            os.close(memfd)
        return fd, None


class DmaHeapAllocator(BaseAllocator):
    """A buffer from the system dma-heap (exp_name ``system``, the heap's name).

    Cacheability: system_heap_mmap maps its pages with remap_pfn_range and the VMA's default pgprot → CACHED.
    """

    name = "dma-heap"
    cache_attr = CacheAttr.CACHED
    cache_reason = "the system heap remap_pfn_range()s its pages with the VMA's default pgprot (write-back)"
    device_path = DMA_HEAP_SYSTEM

    @classmethod
    def available(cls) -> Availability:
        return _device_availability(DMA_HEAP_SYSTEM, "kernel without CONFIG_DMABUF_HEAPS_SYSTEM")

    def _make(self, size: int) -> tuple[int, str | None]:
        device = self._device_fd()
        arg = bytearray(
            uapi.dma_heap_allocation_data.build(
                {"len": size, "fd": 0, "fd_flags": os.O_RDWR | os.O_CLOEXEC, "heap_flags": 0}
            )
        )
        try:
            fcntl.ioctl(device, uapi.DMA_HEAP_IOCTL_ALLOC, arg, True)
        except OSError as exc:
            raise AllocationError(f"dma-heap: DMA_HEAP_IOCTL_ALLOC of {size} bytes: {exc.strerror}") from exc
        return int(uapi.dma_heap_allocation_data.parse(bytes(arg)).fd), None


def find_drm_node(driver: str) -> tuple[str | None, list[str]]:
    """The first ``/dev/dri/card*`` whose DRM_IOCTL_VERSION name is ``driver``, and the names seen on the way.

    Card nodes, not render nodes: DRM_IOCTL_MODE_CREATE_DUMB is not allowed on render nodes.
    """
    seen: list[str] = []
    for path in sorted(glob.glob(DRM_CARD_GLOB)):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            seen.append(f"{path}: {exc.strerror}")
            continue
        try:
            name = drm_version(fd).name
        except OSError as exc:
            seen.append(f"{path}: DRM_IOCTL_VERSION {exc.strerror}")
            continue
        finally:
            os.close(fd)
        if name == driver:
            return path, seen
        seen.append(f"{path}: {name}")
    return None, seen


class VgemAllocator(BaseAllocator):
    """A DRM dumb buffer on the vgem device, exported with PRIME (exp_name ``drm``, driver ``vgem``).

    Cacheability: vgem's GEM objects are GEM-shmem objects with ``map_wc = true``; drm_gem_shmem_mmap then uses
    pgprot_writecombine for the VMA, and on x86 the helper also marks the pages WC (set_pages_array_wc), so the
    user PTE really is write-combined → WC.
    """

    name = "vgem"
    cache_attr = CacheAttr.WC
    cache_reason = "vgem's GEM-shmem objects set map_wc, so mmaps use pgprot_writecombine"
    driver = "vgem"

    @classmethod
    def available(cls) -> Availability:
        if not glob.glob(DRM_CARD_GLOB):
            return Availability(False, "no /dev/dri/card* (no DRM devices; the vgem module is not loaded)")
        path, seen = find_drm_node(cls.driver)
        if path is None:
            return Availability(False, f"no DRM card node is vgem ({'; '.join(seen)})")
        return Availability(True, path)

    def _device_fd(self) -> int:
        if self._owned < 0:
            path, seen = find_drm_node(self.driver)
            if path is None:
                raise AllocatorUnavailable(f"vgem: no DRM card node is vgem ({'; '.join(seen) or 'none found'})")
            self.device_path = path
            self._owned = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        return self._owned

    def _make(self, size: int) -> tuple[int, str | None]:
        device = self._device_fd()
        # One row per page at 32 bpp: pitch == PAGE_SIZE, so the dumb buffer is exactly `size` bytes.
        create = bytearray(
            uapi.drm_mode_create_dumb.build(
                {
                    "height": size // PAGE_SIZE,
                    "width": PAGE_SIZE // 4,
                    "bpp": 32,
                    "flags": 0,
                    "handle": 0,
                    "pitch": 0,
                    "size": 0,
                }
            )
        )
        try:
            fcntl.ioctl(device, uapi.DRM_IOCTL_MODE_CREATE_DUMB, create, True)
        except OSError as exc:
            raise AllocationError(f"vgem: DRM_IOCTL_MODE_CREATE_DUMB of {size} bytes: {exc.strerror}") from exc
        handle = int(uapi.drm_mode_create_dumb.parse(bytes(create)).handle)
        fd = -1
        try:
            prime = bytearray(
                uapi.drm_prime_handle.build({"handle": handle, "flags": uapi.DRM_CLOEXEC | uapi.DRM_RDWR, "fd": -1})
            )
            try:
                fcntl.ioctl(device, uapi.DRM_IOCTL_PRIME_HANDLE_TO_FD, prime, True)
            except OSError as exc:
                raise AllocationError(f"vgem: DRM_IOCTL_PRIME_HANDLE_TO_FD: {exc.strerror}") from exc
            fd = int(uapi.drm_prime_handle.parse(bytes(prime)).fd)
        finally:
            # The dma-buf holds its own reference to the GEM object; the handle is no longer needed either way.
            try:
                destroy = uapi.drm_mode_destroy_dumb.build({"handle": handle})
                fcntl.ioctl(device, uapi.DRM_IOCTL_MODE_DESTROY_DUMB, destroy)
            except OSError:
                if fd >= 0:
                    os.close(fd)
                raise
        return fd, self.driver


#: Every allocator by its name (the names a CLI option or config file uses).
ALLOCATORS: Mapping[str, type[BaseAllocator]] = {
    cls.name: cls for cls in (MemfdAllocator, UdmabufAllocator, DmaHeapAllocator, VgemAllocator)
}
#: auto(): the dma-buf exporters, best first (udmabuf and the heap are plain CACHED memory; vgem is WC), then memfd.
AUTO_ORDER = ("udmabuf", "dma-heap", "vgem", "memfd")
AUTO = "auto"


def availability() -> dict[str, Availability]:
    """Each allocator's availability on this machine, in auto() order."""
    return {name: ALLOCATORS[name].available() for name in AUTO_ORDER}


def auto(*, max_size: int = DEFAULT_MAX_SIZE) -> BaseAllocator:
    """The best available allocator: a real dma-buf exporter when the kernel has one, else memfd."""
    reasons = []
    for name in AUTO_ORDER:
        state = ALLOCATORS[name].available()
        if state:
            return ALLOCATORS[name](max_size=max_size)
        reasons.append(f"{name}: {state.reason}")
    raise AllocatorUnavailable("no allocator is available: " + "; ".join(reasons))


def open_allocator(name: str, *, max_size: int = DEFAULT_MAX_SIZE) -> BaseAllocator:
    """The allocator called ``name`` (or ``"auto"``); unknown names raise ValueError listing the known ones.

    The allocator is returned even when unavailable (its ``allocate`` then raises AllocatorUnavailable with the
    reason), so a configuration naming one is not silently swapped for another.
    """
    if name == AUTO:
        return auto(max_size=max_size)
    try:
        cls = ALLOCATORS[name]
    except KeyError:
        known = ", ".join([AUTO, *ALLOCATORS])
        raise ValueError(f"unknown allocator {name!r} (known: {known})") from None
    return cls(max_size=max_size)


__all__ = [
    "ALLOCATORS",
    "AUTO",
    "AUTO_ORDER",
    "DEFAULT_MAX_SIZE",
    "PAGE_SIZE",
    "AllocationError",
    "AllocatorUnavailable",
    "Availability",
    "BaseAllocator",
    "DmaHeapAllocator",
    "MemfdAllocator",
    "SizeLimitExceeded",
    "UdmabufAllocator",
    "VgemAllocator",
    "auto",
    "availability",
    "find_drm_node",
    "open_allocator",
    "page_round",
]
