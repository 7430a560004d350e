"""Every revision of DMA_BUF_IOCTL_INFO a kernel may implement, played by fake kernels, read by our dma-buf layer.

Why fakes: this host has no kernel with the ioctl, and no kernel of revisions v1 (2022-07-29) or v2 (2022-08-15)
exists anywhere (neither was merged); our revision 3 runs for real in tests/test_e2e_kernel_ioctl.py. Each fake
is a kernel as its revision's patch wrote it: it reads the 16-byte request, rejects what that patch rejects, and
answers with that revision's numbering. The request is real bytes through :func:`vgpu.blob.dmabuf.query_info`.

What must hold (spec/dma-buf-info.h): vgpu asks only with revision 3's param, so v1 and v2 kernels say EINVAL;
even a kernel that ignored the param and answered its own numbering is never read as an attribute (the dangerous
case: v2's COHERENT_WC = 1 is v1's CACHED = 1); a revision-3 value with an attribute, flag or bit we do not know is
"the kernel did not say"; and the resolver never maps what a changing or incoherent answer describes as if it were
fixed.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator

import pytest

from vgpu.blob import uapi
from vgpu.blob.dmabuf import KernelAnswer, KernelAnswerKind, decode_map_attr, query_info, query_map_attr
from vgpu.blob.resolve import PLACEMENT_SAFE, Resolver
from vgpu.blob.types import CacheAttr, HostBuffer, Provenance, Unresolved

TAG = uapi.DMA_BUF_MAP_REVISION << uapi.DMA_BUF_MAP_REVISION_SHIFT
FIXED = uapi.DMA_BUF_MAP_FIXED
SYNC = uapi.DMA_BUF_MAP_NEEDS_SYNC
# v1 and v2, as their patches numbered them (peers.md, "DMA_BUF_IOCTL_INFO history").
V1_PARAM, V1_WC, V1_CACHED = 1, 0, 1
V2_PARAM, V2_INCOHERENT, V2_COHERENT_WC, V2_COHERENT_CACHED = 1, 0, 1, 2

KernelIoctl = Callable[[int, int, bytearray, bool], int]


def played_kernel(answer_param: int, value: int | None = None, *, err: int | None = None,
                  ignores_param: bool = False) -> tuple[KernelIoctl, list[tuple[int, int]]]:
    """A kernel that knows ``answer_param`` and answers ``value`` (or fails with ``err``); any other param is
    EINVAL, as every revision's patch does, unless ``ignores_param`` (a buggy kernel answering regardless)."""
    seen: list[tuple[int, int]] = []

    def ioctl(fd: int, request: int, arg: bytearray, mutate: bool = True) -> int:
        assert request == uapi.DMA_BUF_IOCTL_INFO == 0xC0106202 and mutate and len(arg) == 16
        request_fields = uapi.dma_buf_info.parse(bytes(arg))
        seen.append((int(request_fields.param), int(request_fields.pad)))
        if request_fields.pad or (request_fields.param != answer_param and not ignores_param):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if err is not None:
            raise OSError(err, os.strerror(err))
        arg[:] = uapi.dma_buf_info.build({"param": request_fields.param, "pad": 0, "value": value})
        return 0

    return ioctl, seen


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("revisions", os.MFD_CLOEXEC)
    yield fd
    os.close(fd)


# --- what each revision's kernel answers to our request ---------------------------------------------------------


@pytest.mark.parametrize("value", [V1_WC, V1_CACHED])
def test_fake_v1_kernel_says_einval_to_our_request(memfd: int, value: int) -> None:
    ioctl, seen = played_kernel(V1_PARAM, value)
    answer = query_info(memfd, uapi.DMA_BUF_INFO_MAP_ATTR, ioctl=ioctl)
    assert seen == [(2, 0)]  # we ask param 2, pad 0: never v1/v2's param 1
    assert answer.kind is KernelAnswerKind.EINVAL and answer.attr is None


@pytest.mark.parametrize("value", [V2_INCOHERENT, V2_COHERENT_WC, V2_COHERENT_CACHED])
def test_fake_v2_kernel_says_einval_to_our_request(memfd: int, value: int) -> None:
    ioctl, _ = played_kernel(V2_PARAM, value)
    answer = query_info(memfd, uapi.DMA_BUF_INFO_MAP_ATTR, ioctl=ioctl)
    assert answer.kind is KernelAnswerKind.EINVAL and answer.attr is None
    assert "another revision" in answer.describe()


@pytest.mark.parametrize(
    "value",
    [V1_WC, V1_CACHED, V2_INCOHERENT, V2_COHERENT_WC, V2_COHERENT_CACHED, (2 << 56) | 1, (4 << 56) | FIXED | 1],
    ids=["v1-WC", "v1-CACHED", "v2-INCOHERENT", "v2-COHERENT_WC", "v2-COHERENT_CACHED", "tag-2", "tag-4"],
)
def test_fake_kernel_answering_another_numbering_is_never_an_attribute(memfd: int, value: int) -> None:
    """Even a kernel that ignores the param and answers with v1's, v2's or a future revision's numbering: no tag
    of ours, no attribute (v2's COHERENT_WC = 1 read as v1 would be CACHED over write-combined memory)."""
    ioctl, _ = played_kernel(V1_PARAM, value, ignores_param=True)
    answer = query_info(memfd, uapi.DMA_BUF_INFO_MAP_ATTR, ioctl=ioctl)
    assert answer.kind is KernelAnswerKind.OTHER_REVISION and answer.attr is None
    assert not answer.fixed and not answer.needs_sync
    assert answer.code == f"value={value:#x}" and "not used" in answer.describe()


@pytest.mark.parametrize(
    ("value", "attr", "fixed", "sync", "code"),
    [
        (TAG | FIXED | uapi.DMA_BUF_MAP_CACHED, CacheAttr.CACHED, True, False, "CACHED+fixed"),
        (TAG | FIXED | uapi.DMA_BUF_MAP_WC, CacheAttr.WC, True, False, "WC+fixed"),
        (TAG | FIXED | uapi.DMA_BUF_MAP_UNCACHED, CacheAttr.UNCACHED, True, False, "UNCACHED+fixed"),
        (TAG | uapi.DMA_BUF_MAP_WC, CacheAttr.WC, False, False, "WC"),
        (TAG | uapi.DMA_BUF_MAP_CACHED, CacheAttr.CACHED, False, False, "CACHED"),
        (TAG | FIXED | SYNC | uapi.DMA_BUF_MAP_CACHED, CacheAttr.CACHED, True, True, "CACHED+fixed+sync"),
    ],
)
def test_fake_revision3_kernel_answers_are_read(
    memfd: int, value: int, attr: CacheAttr, fixed: bool, sync: bool, code: str
) -> None:
    ioctl, seen = played_kernel(uapi.DMA_BUF_INFO_MAP_ATTR, value)
    answer = query_info(memfd, uapi.DMA_BUF_INFO_MAP_ATTR, ioctl=ioctl)
    assert seen == [(2, 0)]
    assert (answer.kind, answer.attr, answer.fixed, answer.needs_sync, answer.code) == (
        KernelAnswerKind.VALUE, attr, fixed, sync, code)
    assert answer.describe().startswith(f"DMA_BUF_IOCTL_INFO: {code} (")
    assert ("for the buffer's life" in answer.describe()) is fixed
    assert ("DMA_BUF_IOCTL_SYNC" in answer.describe()) is sync


@pytest.mark.parametrize(
    "value",
    [TAG, TAG | 4, TAG | 0xFF, TAG | FIXED | (1 << 10) | 1, TAG | FIXED | (1 << 16) | 1, TAG | (1 << 55) | 3],
    ids=["attr-0", "attr-4", "attr-255", "flag-bit-10", "bit-16", "bit-55"],
)
def test_fake_revision3_kernel_unknown_values_are_not_used(memfd: int, value: int) -> None:
    """Our tag, but an attribute, flag or bit revision 3 does not define: a later kernel's meaning, not ours."""
    ioctl, _ = played_kernel(uapi.DMA_BUF_INFO_MAP_ATTR, value)
    answer = query_info(memfd, uapi.DMA_BUF_INFO_MAP_ATTR, ioctl=ioctl)
    assert answer.kind is KernelAnswerKind.UNKNOWN_VALUE and answer.attr is None
    assert not answer.fixed and not answer.needs_sync and "not used" in answer.describe()


@pytest.mark.parametrize(
    ("err", "kind"),
    [(errno.ENOSYS, KernelAnswerKind.ENOSYS), (errno.ENOTTY, KernelAnswerKind.ENOTTY),
     (errno.EFAULT, KernelAnswerKind.ERROR), (errno.EIO, KernelAnswerKind.ERROR)],
)
def test_fake_revision3_kernel_errnos_are_told_apart(memfd: int, err: int, kind: KernelAnswerKind) -> None:
    ioctl, _ = played_kernel(uapi.DMA_BUF_INFO_MAP_ATTR, err=err)
    answer = query_info(memfd, uapi.DMA_BUF_INFO_MAP_ATTR, ioctl=ioctl)
    assert answer.kind is kind and answer.errno == err and answer.attr is None
    assert answer.code == errno.errorcode[err]


def test_fake_kernel_value_for_another_param_is_not_interpreted(memfd: int) -> None:
    ioctl, _ = played_kernel(99, TAG | FIXED | 1)
    answer = query_info(memfd, 99, ioctl=ioctl)
    assert answer.kind is KernelAnswerKind.UNKNOWN_VALUE and answer.attr is None


def test_real_query_on_this_host_is_enotty(memfd: int) -> None:
    """The host kernel, for real: no ioctl (and a memfd is no dma-buf)."""
    assert query_map_attr(memfd).kind is KernelAnswerKind.ENOTTY


def test_the_numbers_are_the_spec_headers() -> None:
    """Pinned against spec/dma-buf-info.h (the layout itself is checked through DWARF by tools/layoutcheck.py)."""
    header = (__import__("pathlib").Path(__file__).resolve().parent.parent / "spec" / "dma-buf-info.h").read_text()
    for name in ("DMA_BUF_INFO_MAP_ATTR", "DMA_BUF_MAP_REVISION", "DMA_BUF_MAP_REVISION_SHIFT", "DMA_BUF_MAP_CACHED",
                 "DMA_BUF_MAP_UNCACHED", "DMA_BUF_MAP_WC"):
        assert f"#define {name}\t" in header or f"#define  {name}\t" in header, name
        line = next(ln for ln in header.splitlines() if ln.split()[1:2] == [name])
        assert int(line.split()[2], 0) == getattr(uapi, name), name
    assert "#define DMA_BUF_MAP_FIXED\t\t(1ULL << 8)" in header and uapi.DMA_BUF_MAP_FIXED == 1 << 8
    assert "#define DMA_BUF_MAP_NEEDS_SYNC\t\t(1ULL << 9)" in header and uapi.DMA_BUF_MAP_NEEDS_SYNC == 1 << 9
    # The numbering of the attribute is virtio-gpu's map_info.
    assert tuple(CacheAttr) == (uapi.DMA_BUF_MAP_CACHED, uapi.DMA_BUF_MAP_UNCACHED, uapi.DMA_BUF_MAP_WC)


def test_decode_is_total() -> None:
    """Every 64-bit value decodes to exactly one kind; only tagged, fully-known values carry an attribute."""
    for value in (0, 1, 2, 3, TAG - 1, TAG, TAG | 1, TAG | FIXED | SYNC | 3, (1 << 64) - 1):
        answer = decode_map_attr(value)
        assert (answer.attr is not None) is (answer.kind is KernelAnswerKind.VALUE)


# --- what the resolver makes of each ---------------------------------------------------------------------------


def _resolver(answer: KernelAnswer, *, map_changing: bool = False) -> tuple[Resolver, list[int]]:
    asked: list[int] = []

    def kernel(fd: int) -> KernelAnswer:
        asked.append(fd)
        return answer

    return Resolver(kernel_query=kernel, map_changing=map_changing), asked


@pytest.fixture
def vgem_like() -> Iterator[HostBuffer]:
    """A buffer whose allocator would say WC (as vgem's does): the kernel's word must still decide."""
    fd = os.memfd_create("vgem-like", os.MFD_CLOEXEC)
    buffer = HostBuffer(fd=fd, size=4096, allocator="vgem", exporter="vgem-test", allocator_attr=CacheAttr.WC,
                        allocator_reason="map_wc", drm_driver="vgem")
    yield buffer
    buffer.close()


@pytest.mark.parametrize("attr", [uapi.DMA_BUF_MAP_WC, uapi.DMA_BUF_MAP_CACHED])
def test_fake_kernel_changing_answer_is_refused_by_default(vgem_like: HostBuffer, attr: int) -> None:
    resolver, _ = _resolver(decode_map_attr(TAG | attr))
    with pytest.raises(Unresolved) as exc:
        resolver.resolve(vgem_like)
    text = str(exc.value)
    assert "may change while the buffer is mapped" in text and "--map-changing-placement" in text
    assert f"DMA_BUF_IOCTL_INFO: {CacheAttr(attr).name} (for now" in text
    assert vgem_like.resolution is None  # nothing recorded: a refusal is not a resolution


@pytest.mark.parametrize("attr", [uapi.DMA_BUF_MAP_WC, uapi.DMA_BUF_MAP_CACHED])
def test_fake_kernel_changing_answer_opted_in_is_placement_safe(vgem_like: HostBuffer, attr: int) -> None:
    """Opted in, WC whatever the current placement: never the cacheable alias of a write-combined placement."""
    resolver, _ = _resolver(decode_map_attr(TAG | attr), map_changing=True)
    res = resolver.resolve(vgem_like)
    assert PLACEMENT_SAFE is CacheAttr.WC
    assert (res.attr, res.provenance) == (CacheAttr.WC, Provenance.OPERATOR)
    assert res.detail.startswith("--map-changing-placement: mapped WC")
    assert f"kernel: DMA_BUF_IOCTL_INFO: {CacheAttr(attr).name} (for now" in res.detail


@pytest.mark.parametrize("map_changing", [False, True])
@pytest.mark.parametrize("fixed", [0, FIXED])
def test_fake_kernel_needs_sync_is_always_refused(vgem_like: HostBuffer, map_changing: bool, fixed: int) -> None:
    """Incoherent: no opt-in, allocator or rule maps a buffer whose CPU access needs DMA_BUF_IOCTL_SYNC."""
    resolver, _ = _resolver(decode_map_attr(TAG | fixed | SYNC | uapi.DMA_BUF_MAP_CACHED), map_changing=map_changing)
    with pytest.raises(Unresolved, match=r"needs cache maintenance \(DMA_BUF_IOCTL_SYNC\)"):
        resolver.resolve(vgem_like)


def test_fake_kernel_fixed_answer_is_the_kernels(vgem_like: HostBuffer) -> None:
    resolver, _ = _resolver(decode_map_attr(TAG | FIXED | uapi.DMA_BUF_MAP_CACHED), map_changing=True)
    res = resolver.resolve(vgem_like)
    assert (res.attr, res.provenance) == (CacheAttr.CACHED, Provenance.KERNEL)  # outranks the allocator's WC
    assert res.detail == "DMA_BUF_IOCTL_INFO: CACHED+fixed (for the buffer's life)"


@pytest.mark.parametrize("value", [V1_CACHED, V2_COHERENT_WC, TAG | 9])
def test_fake_kernel_of_another_revision_falls_back_to_what_we_know(vgem_like: HostBuffer, value: int) -> None:
    """Another revision's value is "the kernel did not say": the allocator decides, naming what the kernel said."""
    resolver, _ = _resolver(decode_map_attr(value))
    res = resolver.resolve(vgem_like)
    assert (res.attr, res.provenance) == (CacheAttr.WC, Provenance.ALLOCATOR)
    assert f"kernel: DMA_BUF_IOCTL_INFO: value={value:#x}" in res.detail


def test_resolver_asks_the_kernel_at_every_call(vgem_like: HostBuffer) -> None:
    """Never an answer cached across calls: each resolve asks again (the device resolves at every MAP_BLOB)."""
    answers = iter([decode_map_attr(TAG | FIXED | uapi.DMA_BUF_MAP_WC),
                    decode_map_attr(TAG | FIXED | uapi.DMA_BUF_MAP_CACHED)])
    asked: list[int] = []

    def kernel(fd: int) -> KernelAnswer:
        asked.append(fd)
        return next(answers)

    resolver = Resolver(kernel_query=kernel)
    assert resolver.resolve(vgem_like).attr is CacheAttr.WC
    assert resolver.resolve(vgem_like).attr is CacheAttr.CACHED
    assert asked == [vgem_like.fd, vgem_like.fd]
