"""dma-buf fds as the kernel presents them: size, exporter name, CPU-access sync, and the cache-attribute query.

Why a layer of its own: the question "how is a host mapping of this buffer cached?" is asked of the kernel, and
only the kernel's answers decide what the rest of vgpu may do with a buffer. This module turns each kernel answer
into a typed value and never invents one: a stock kernel has no ``DMA_BUF_IOCTL_INFO`` (ENOTTY), an exporter may
lack the hook (ENOSYS), a kernel of another revision does not know our param (EINVAL), or a kernel may return a
value of another revision or one we do not know — all of these are told apart and none of them is ever passed on
as a cache attribute.

The free functions *borrow* an fd (the caller keeps owning it, e.g. a :class:`~vgpu.blob.types.HostBuffer`);
:class:`DmaBuf` *owns* one and closes it deterministically.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import fcntl
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from ..vhost_user.layout import struct_of
from . import uapi
from .types import CacheAttr, FdOwner, HostBuffer

# ---------------------------------------------------------------------------------------------------------------
# size and /proc/<pid>/fdinfo


def fd_size(fd: int) -> int:
    """The buffer's size in bytes, as ``lseek(SEEK_END)`` reports it.

    dma-buf's llseek supports exactly SEEK_END (to learn the size) and SEEK_SET 0, which is what this does, so
    it works for dma-bufs and memfds alike; the offset is put back to 0 because the fd may be shared.
    """
    size = os.lseek(fd, 0, os.SEEK_END)
    os.lseek(fd, 0, os.SEEK_SET)
    return size


@dataclass(frozen=True)
class FdInfo:
    """What ``/proc/<pid>/fdinfo/<fd>`` says about an fd.

    A dma-buf's fdinfo (``dma_buf_show_fdinfo``) has ``size:``, ``count:`` and ``exp_name:`` — the exporter's
    module name, e.g. ``udmabuf``, ``system`` (the heap's name) or ``drm`` for every DRM PRIME export. Any other
    fd has no ``exp_name``: that is how a dma-buf is told from a memfd without ioctls.
    """

    fields: Mapping[str, str]

    @property
    def exporter(self) -> str | None:
        return self.fields.get("exp_name")

    @property
    def size(self) -> int | None:
        raw = self.fields.get("size")
        return int(raw) if raw is not None and raw.isdigit() else None

    @property
    def is_dmabuf(self) -> bool:
        return self.exporter is not None


def parse_fdinfo(text: str) -> FdInfo:
    """``key:<tab>value`` lines; later lines of a repeated key (e.g. per-lock ``lock:``) keep the first."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key and not key.startswith(" "):
            fields.setdefault(key.strip(), value.strip())
    return FdInfo(fields)


def read_fdinfo(fd: int, pid: int | str = "self") -> FdInfo:
    with open(f"/proc/{pid}/fdinfo/{fd}", encoding="utf-8", errors="replace") as f:
        return parse_fdinfo(f.read())


# ---------------------------------------------------------------------------------------------------------------
# DMA_BUF_IOCTL_SYNC


def sync(fd: int, flags: int) -> None:
    """One ``DMA_BUF_IOCTL_SYNC`` call; raises OSError (ENOTTY for a non-dma-buf, EINVAL for bad flags)."""
    fcntl.ioctl(fd, uapi.DMA_BUF_IOCTL_SYNC, uapi.dma_buf_sync.build({"flags": flags}))


def _access_flags(read: bool, write: bool) -> int:
    flags = (uapi.DMA_BUF_SYNC_READ if read else 0) | (uapi.DMA_BUF_SYNC_WRITE if write else 0)
    if not flags:
        raise ValueError("CPU access must read, write or both")
    return flags


@contextlib.contextmanager
def cpu_access(fd: int, *, read: bool = True, write: bool = False) -> Iterator[None]:
    """Bracket CPU access to an mmap of the dma-buf with SYNC_START/SYNC_END of the same direction.

    Exporters with non-coherent caches flush/invalidate here; the END must be issued even when the body
    raises, or the exporter's view of who owns the buffer stays wrong.
    """
    flags = _access_flags(read, write)
    sync(fd, uapi.DMA_BUF_SYNC_START | flags)
    try:
        yield
    finally:
        sync(fd, uapi.DMA_BUF_SYNC_END | flags)


# ---------------------------------------------------------------------------------------------------------------
# DMA_BUF_IOCTL_INFO


class KernelAnswerKind(enum.Enum):
    """The distinguishable outcomes of ``DMA_BUF_IOCTL_INFO``."""

    VALUE = "value"  # a revision-3 answer every bit of which this code knows
    OTHER_REVISION = "other revision"  # a value without our revision's tag: v1/v2 numbering, or a later revision
    UNKNOWN_VALUE = "unknown value"  # our revision (or another param) with an attribute or flag we do not know
    ENOTTY = "ENOTTY"  # no such ioctl: every stock kernel (the proposal was never merged), or not a dma-buf
    ENOSYS = "ENOSYS"  # the kernel has the ioctl but this exporter has no mmap_info hook
    EINVAL = "EINVAL"  # the kernel does not know the param: also what a v1 or v2 kernel says to ours
    ERROR = "error"  # any other errno: reported, never interpreted


_EXPLAIN = {
    KernelAnswerKind.ENOTTY: "no such ioctl: a kernel without DMA_BUF_IOCTL_INFO, or not a dma-buf",
    KernelAnswerKind.ENOSYS: "the exporter does not say: it has no mmap_info hook",
    KernelAnswerKind.EINVAL: "the kernel does not know this param (a kernel of another revision)",
}

_MAP_ATTR = {
    uapi.DMA_BUF_MAP_CACHED: CacheAttr.CACHED,
    uapi.DMA_BUF_MAP_UNCACHED: CacheAttr.UNCACHED,
    uapi.DMA_BUF_MAP_WC: CacheAttr.WC,
}
#: Bits 55:16 are not defined by revision 3: a value with any of them set is not one we can read.
_REVISION_BITS = ((1 << 64) - 1) & ~((1 << uapi.DMA_BUF_MAP_REVISION_SHIFT) - 1)
_DEFINED_BITS = _REVISION_BITS | uapi.DMA_BUF_MAP_ATTR_MASK | uapi.DMA_BUF_MAP_FLAGS


@dataclass(frozen=True)
class KernelAnswer:
    """The kernel's answer to ``DMA_BUF_IOCTL_INFO(DMA_BUF_INFO_MAP_ATTR)``, one of :class:`KernelAnswerKind`.

    Only ``VALUE`` carries a cache attribute (:attr:`attr`) and flags (:attr:`fixed`, :attr:`needs_sync`); every
    other kind is "the kernel did not say". Whether an attribute that may change or that needs cache maintenance
    can be mapped is the resolver's decision, not this layer's.
    """

    kind: KernelAnswerKind
    value: int | None = None
    errno: int | None = None

    @property
    def attr(self) -> CacheAttr | None:
        """The attribute the exporter's mmap installs now; None unless the kernel said it in our revision."""
        if self.kind is KernelAnswerKind.VALUE and self.value is not None:
            return _MAP_ATTR[self.value & uapi.DMA_BUF_MAP_ATTR_MASK]
        return None

    def _flag(self, flag: int) -> bool:
        return self.kind is KernelAnswerKind.VALUE and bool((self.value or 0) & flag)

    @property
    def fixed(self) -> bool:
        """The exporter says the attribute holds for the buffer's life (pinned, or one attribute everywhere)."""
        return self._flag(uapi.DMA_BUF_MAP_FIXED)

    @property
    def needs_sync(self) -> bool:
        """The exporter says CPU access is coherent only inside DMA_BUF_IOCTL_SYNC (cache maintenance)."""
        return self._flag(uapi.DMA_BUF_MAP_NEEDS_SYNC)

    @property
    def code(self) -> str:
        """A short machine-readable form: ``WC+fixed``, ``CACHED`` (may change), ``CACHED+fixed+sync``, the errno
        name, or ``value=0x...`` for a value we do not read (the guest program prints the same forms)."""
        if self.kind is KernelAnswerKind.VALUE and self.attr is not None:
            flags = ("+fixed" if self.fixed else "") + ("+sync" if self.needs_sync else "")
            return f"{self.attr.name}{flags}"
        if self.kind in (KernelAnswerKind.OTHER_REVISION, KernelAnswerKind.UNKNOWN_VALUE):
            return f"value={self.value:#x}" if self.value is not None else "value=?"
        return errno.errorcode.get(self.errno or 0, f"errno {self.errno}")

    def describe(self) -> str:
        text = f"DMA_BUF_IOCTL_INFO: {self.code}"
        if self.kind is KernelAnswerKind.VALUE:
            said = ["for the buffer's life" if self.fixed else "for now: the exporter may move the buffer"]
            if self.needs_sync:
                said.append("CPU access needs cache maintenance (DMA_BUF_IOCTL_SYNC)")
            return f"{text} ({'; '.join(said)})"
        if self.kind is KernelAnswerKind.OTHER_REVISION:
            revision = (self.value or 0) >> uapi.DMA_BUF_MAP_REVISION_SHIFT
            return (f"{text}, not tagged with revision {uapi.DMA_BUF_MAP_REVISION} (tag {revision}): another "
                    "revision's numbering, not used")
        if self.kind is KernelAnswerKind.UNKNOWN_VALUE:
            return text + ", an attribute or flag this vgpu does not know (not used)"
        if self.kind in _EXPLAIN:
            return f"{text}, {_EXPLAIN[self.kind]}"
        return f"{text}, {os.strerror(self.errno or 0)}"

    def __str__(self) -> str:
        return self.describe()


def decode_map_attr(value: int) -> KernelAnswer:
    """Read a value the kernel wrote for ``DMA_BUF_INFO_MAP_ATTR``: only revision 3, and only bits it defines.

    Why this strict: the dangerous misreading is a value of another numbering taken for ours (v2's COHERENT_WC = 1
    read as v1's CACHED = 1 maps write-combined memory cached), so a value without our tag, with bits revision 3
    leaves undefined, or with an attribute or flag we do not know is "the kernel did not say", never a guess.
    """
    if value >> uapi.DMA_BUF_MAP_REVISION_SHIFT != uapi.DMA_BUF_MAP_REVISION:
        return KernelAnswer(KernelAnswerKind.OTHER_REVISION, value=value)
    if value & ~_DEFINED_BITS or value & uapi.DMA_BUF_MAP_ATTR_MASK not in _MAP_ATTR:
        return KernelAnswer(KernelAnswerKind.UNKNOWN_VALUE, value=value)
    return KernelAnswer(KernelAnswerKind.VALUE, value=value)


_ERRNO_KIND = {
    errno.ENOTTY: KernelAnswerKind.ENOTTY,
    errno.ENOSYS: KernelAnswerKind.ENOSYS,
    errno.EINVAL: KernelAnswerKind.EINVAL,
}

#: ``fcntl.ioctl``'s shape for a mutable buffer argument (the default); tests pass kernels of each revision.
Ioctl = Callable[[int, int, bytearray, bool], object]

# The struct codec of dma_buf_info, derived from its construct layout: MAP_BLOB asks the kernel every time, and
# construct's build and parse cost some 30 us of that question.
_INFO = struct_of(uapi.dma_buf_info)


def query_info(fd: int, param: int, *, ioctl: Ioctl | None = None) -> KernelAnswer:
    """Issue ``DMA_BUF_IOCTL_INFO`` for ``param`` (16-byte struct, pad 0) and read the answer.

    Only a ``DMA_BUF_INFO_MAP_ATTR`` answer is interpreted (:func:`decode_map_attr`); a value answered to any
    other param is reported as unknown. EBADF is a bug in the caller (a closed fd), not a kernel answer, so it
    propagates as OSError.
    """
    arg = bytearray(_INFO.pack(param, 0, 0))
    try:
        (ioctl or fcntl.ioctl)(fd, uapi.DMA_BUF_IOCTL_INFO, arg, True)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise
        return KernelAnswer(_ERRNO_KIND.get(exc.errno or 0, KernelAnswerKind.ERROR), errno=exc.errno)
    value: int = _INFO.unpack(arg)[2]
    if param == uapi.DMA_BUF_INFO_MAP_ATTR:
        return decode_map_attr(value)
    return KernelAnswer(KernelAnswerKind.UNKNOWN_VALUE, value=value)


def query_map_attr(fd: int) -> KernelAnswer:
    """Ask the exporter how user-space mappings of the buffer are cached, and whether that holds
    (``DMA_BUF_INFO_MAP_ATTR``, revision 3). Never asks v1/v2's param 1: see :func:`decode_map_attr`."""
    return query_info(fd, uapi.DMA_BUF_INFO_MAP_ATTR)


# ---------------------------------------------------------------------------------------------------------------
# DRM driver identity


@dataclass(frozen=True)
class DrmVersion:
    """``DRM_IOCTL_VERSION`` of a DRM node: the only way to tell which driver made a PRIME export.

    The dma-buf of every DRM PRIME export reports ``exp_name: drm`` (the module name of drm_prime.c), so the
    exporter name cannot distinguish vgem from i915 or virtio_gpu; the allocator records this at export time.
    """

    name: str
    major: int
    minor: int
    patchlevel: int
    date: str
    desc: str


def drm_version(fd: int) -> DrmVersion:
    """Two calls, as libdrm does: the first learns the string lengths, the second fills our buffers."""
    arg = bytearray(uapi.drm_version.build(dict.fromkeys(_DRM_VERSION_FIELDS, 0)))
    fcntl.ioctl(fd, uapi.DRM_IOCTL_VERSION, arg, True)
    lengths = uapi.drm_version.parse(bytes(arg))
    bufs = {k: ctypes.create_string_buffer(int(lengths[f"{k}_len"]) + 1) for k in ("name", "date", "desc")}
    request = {f: 0 for f in _DRM_VERSION_FIELDS}
    for key, buf in bufs.items():
        request[f"{key}_len"] = len(buf) - 1
        request[key] = ctypes.addressof(buf)
    arg = bytearray(uapi.drm_version.build(request))
    fcntl.ioctl(fd, uapi.DRM_IOCTL_VERSION, arg, True)
    out = uapi.drm_version.parse(bytes(arg))

    def text(key: str) -> str:
        n = min(int(out[f"{key}_len"]), len(bufs[key]) - 1)
        return bufs[key].raw[:n].decode("utf-8", "replace")

    return DrmVersion(
        name=text("name"),
        major=int(out.version_major),
        minor=int(out.version_minor),
        patchlevel=int(out.version_patchlevel),
        date=text("date"),
        desc=text("desc"),
    )


_DRM_VERSION_FIELDS = (
    "version_major",
    "version_minor",
    "version_patchlevel",
    "name_len",
    "name",
    "date_len",
    "date",
    "desc_len",
    "desc",
)

# ---------------------------------------------------------------------------------------------------------------
# getting hold of someone else's fd

_PIDFD_GETFD = 438  # same number on every architecture (the unified syscall table)
_FD_PATH = re.compile(r"^/(?:proc/(?P<pid>self|thread-self|\d+)/fd|dev/fd)/(?P<fd>\d+)$")


def _pidfd_getfd(pid: int, target: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        fd = int(libc.syscall(_PIDFD_GETFD, pidfd, target, 0))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd(pid {pid}, fd {target}): {os.strerror(err)}")
        return fd  # the kernel sets O_CLOEXEC on it
    finally:
        os.close(pidfd)


def open_fd_path(path: str) -> int:
    """A new fd (close-on-exec) for what ``path`` names, owned by the caller.

    ``/proc/PID/fd/N`` of a dma-buf cannot be re-opened through the path (dma-buf inodes have no ``open``;
    the kernel answers ENXIO), so such paths duplicate the *same* open file instead: ``F_DUPFD_CLOEXEC`` for our
    own process, ``pidfd_getfd(2)`` for another (needs ptrace rights over it, like reading its memory would).
    Any other path is opened read-write, or read-only when that is all we may do.
    """
    match = _FD_PATH.match(os.path.normpath(path))
    if match:
        pid_text, target = match.group("pid"), int(match.group("fd"))
        if pid_text in (None, "self", "thread-self") or int(pid_text) == os.getpid():
            return fcntl.fcntl(target, fcntl.F_DUPFD_CLOEXEC, 0)
        return _pidfd_getfd(int(pid_text), target)
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


# ---------------------------------------------------------------------------------------------------------------
# the owning object


class DmaBuf(FdOwner):
    """Owns one fd of a (possibly) dma-buf and closes it exactly once.

    ``drm_driver`` is the DRM driver that exported it, when whoever made the buffer knew (see
    :class:`DrmVersion`); it cannot be learnt from the fd afterwards.
    """

    def __init__(self, fd: int, *, drm_driver: str | None = None) -> None:
        if fd < 0:
            raise ValueError(f"invalid fd {fd}")
        self._owned = fd
        self.drm_driver = drm_driver

    @classmethod
    def open(cls, path: str) -> DmaBuf:
        """Take hold of ``/proc/PID/fd/N`` (any process we may ptrace), ``/dev/fd/N``, or a file path."""
        return cls(open_fd_path(path))

    @property
    def fd(self) -> int:
        if self._owned < 0:
            raise ValueError("DmaBuf is closed")
        return self._owned

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self._owned < 0

    @property
    def size(self) -> int:
        return fd_size(self.fd)

    def fdinfo(self) -> FdInfo:
        return read_fdinfo(self.fd)

    @property
    def exporter(self) -> str | None:
        return self.fdinfo().exporter

    def query_map_attr(self) -> KernelAnswer:
        return query_map_attr(self.fd)

    def cpu_access(self, *, read: bool = True, write: bool = False) -> contextlib.AbstractContextManager[None]:
        return cpu_access(self.fd, read=read, write=write)

    def into_host_buffer(self, allocator: str = "external") -> HostBuffer:
        """Hand the fd over to a :class:`HostBuffer` (which then owns it); this object is closed afterwards.

        A buffer that came from outside carries no allocator knowledge: only the kernel, operator rules or the
        legacy heuristic can then decide its cache attribute.
        """
        fd = self.fd
        info = read_fdinfo(fd)
        buffer = HostBuffer(
            fd=fd, size=fd_size(fd), allocator=allocator, exporter=info.exporter, drm_driver=self.drm_driver
        )
        self._owned = -1
        return buffer

    def __repr__(self) -> str:
        return f"DmaBuf(fd={self._owned}, drm_driver={self.drm_driver!r})"
