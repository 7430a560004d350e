"""Every branch of the resolver: kernel → allocator → operator rule → legacy heuristic → Unresolved.

The host's own kernel answers ENOTTY (real, on real memfds). Kernel answers that cannot exist on this machine
(a revision-3 value, ENOSYS, EINVAL, an unknown value; every revision in tests/test_blob_uapi_revisions.py) and
buffers with an exporter name (there is no dma-buf exporter here) are played by fakes, in tests whose names say
"fake".
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vgpu.blob import allocators, uapi
from vgpu.blob.dmabuf import KernelAnswer, KernelAnswerKind, decode_map_attr
from vgpu.blob.resolve import Resolver, legacy_heuristic, map_info
from vgpu.blob.rules import parse_rules
from vgpu.blob.types import CacheAttr, HostBuffer, Provenance, Resolution, Unresolved

ENOTTY = KernelAnswer(KernelAnswerKind.ENOTTY, errno=errno.ENOTTY)
ENOSYS = KernelAnswer(KernelAnswerKind.ENOSYS, errno=errno.ENOSYS)
EINVAL = KernelAnswer(KernelAnswerKind.EINVAL, errno=errno.EINVAL)
TAG = uapi.DMA_BUF_MAP_REVISION << uapi.DMA_BUF_MAP_REVISION_SHIFT
WC = decode_map_attr(TAG | uapi.DMA_BUF_MAP_FIXED | uapi.DMA_BUF_MAP_WC)
CACHED = decode_map_attr(TAG | uapi.DMA_BUF_MAP_FIXED | uapi.DMA_BUF_MAP_CACHED)
UNKNOWN = KernelAnswer(KernelAnswerKind.UNKNOWN_VALUE, value=7)

RULES = parse_rules('[exporters]\ndrm = "uncached"\nsystem = "cached"\n[drm_drivers]\nvgem = "wc"\n', "cache.toml")


def fake_kernel(answer: KernelAnswer) -> tuple[Resolver, list[int]]:
    asked: list[int] = []

    def query(fd: int) -> KernelAnswer:
        asked.append(fd)
        return answer

    return Resolver(kernel_query=query), asked


@pytest.fixture
def memfd_buffer() -> Iterator[HostBuffer]:
    with allocators.MemfdAllocator() as allocator:
        buf = allocator.allocate(4096)
    yield buf
    buf.close()


@pytest.fixture
def bare() -> Iterator[HostBuffer]:
    """A buffer nobody knows anything about: a memfd without allocator knowledge."""
    fd = os.memfd_create("bare", os.MFD_CLOEXEC)
    buf = HostBuffer(fd=fd, size=0, allocator="external")
    yield buf
    buf.close()


def fake_dmabuf(bare: HostBuffer, exporter: str, driver: str | None = None) -> HostBuffer:
    """Describe the bare memfd as a dma-buf of `exporter` (no exporter exists on this host)."""
    bare.exporter = exporter
    bare.drm_driver = driver
    return bare


# --- 1. the kernel ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("answer", "attr"), [(WC, CacheAttr.WC), (CACHED, CacheAttr.CACHED)])
def test_fake_kernel_answer_wins_over_allocator(
    memfd_buffer: HostBuffer, answer: KernelAnswer, attr: CacheAttr
) -> None:
    resolver, asked = fake_kernel(answer)
    resolver.rules = RULES
    resolver.legacy_heuristic = True
    res = resolver.resolve(memfd_buffer)  # the allocator says CACHED; a WC kernel answer must still win
    assert res == Resolution(attr, Provenance.KERNEL, answer.describe())
    assert asked == [memfd_buffer.fd] and memfd_buffer.resolution is res


def test_fake_kernel_answer_wins_over_rules(bare: HostBuffer) -> None:
    resolver, _ = fake_kernel(CACHED)
    resolver.rules = RULES
    res = resolver.resolve(fake_dmabuf(bare, "drm", "vgem"))
    assert res.attr is CacheAttr.CACHED and res.provenance is Provenance.KERNEL


# --- 2. the allocator --------------------------------------------------------------------------------------------


def test_real_enotty_falls_through_to_allocator(memfd_buffer: HostBuffer) -> None:
    res = Resolver().resolve(memfd_buffer)  # the real kernel query
    assert res.attr is CacheAttr.CACHED and res.provenance is Provenance.ALLOCATOR
    assert res.detail.startswith("memfd: shmem pages")
    assert "kernel: DMA_BUF_IOCTL_INFO: ENOTTY" in res.detail
    assert map_info(res) == 1


@pytest.mark.parametrize(("answer", "said"), [(ENOSYS, "ENOSYS"), (EINVAL, "EINVAL"), (UNKNOWN, "value=0x7")])
def test_fake_kernel_non_answers_fall_through_and_are_reported(
    memfd_buffer: HostBuffer, answer: KernelAnswer, said: str
) -> None:
    resolver, _ = fake_kernel(answer)
    res = resolver.resolve(memfd_buffer)
    assert res.provenance is Provenance.ALLOCATOR and res.attr is CacheAttr.CACHED
    assert f"kernel: DMA_BUF_IOCTL_INFO: {said}" in res.detail


def test_fake_allocator_knowledge_wins_over_rules_and_heuristic(bare: HostBuffer) -> None:
    buf = fake_dmabuf(bare, "drm", "vgem")
    buf.allocator, buf.allocator_attr, buf.allocator_reason = "vgem", CacheAttr.WC, "map_wc"
    resolver = Resolver(rules=parse_rules('[drm_drivers]\nvgem = "cached"\n'), legacy_heuristic=True)
    res = resolver.resolve(buf)
    assert (res.attr, res.provenance) == (CacheAttr.WC, Provenance.ALLOCATOR)
    assert res.detail.startswith("vgem: map_wc; kernel: DMA_BUF_IOCTL_INFO: ENOTTY")


# --- 3. operator rules ---------------------------------------------------------------------------------------------


def test_fake_dmabuf_operator_rule_by_exporter(bare: HostBuffer) -> None:
    res = Resolver(rules=RULES).resolve(fake_dmabuf(bare, "system"))
    assert (res.attr, res.provenance) == (CacheAttr.CACHED, Provenance.OPERATOR)
    assert res.detail.startswith("rule exporters.system = cached in cache.toml; kernel: DMA_BUF_IOCTL_INFO: ENOTTY")


def test_fake_dmabuf_driver_rule_is_more_specific_than_exporter_rule(bare: HostBuffer) -> None:
    res = Resolver(rules=RULES).resolve(fake_dmabuf(bare, "drm", "vgem"))
    assert (res.attr, res.provenance) == (CacheAttr.WC, Provenance.OPERATOR)
    assert "drm_drivers.vgem = wc" in res.detail


def test_fake_dmabuf_exporter_rule_when_driver_unnamed_in_rules(bare: HostBuffer) -> None:
    res = Resolver(rules=RULES).resolve(fake_dmabuf(bare, "drm", "i915"))
    assert (res.attr, res.provenance) == (CacheAttr.UNCACHED, Provenance.OPERATOR)
    assert map_info(res) == 2


def test_fake_dmabuf_rules_win_over_heuristic(bare: HostBuffer) -> None:
    res = Resolver(rules=RULES, legacy_heuristic=True).resolve(fake_dmabuf(bare, "system"))
    assert res.provenance is Provenance.OPERATOR


def test_rules_file_loaded_from_disk(tmp_path: Path, bare: HostBuffer) -> None:
    from vgpu.blob.rules import load_rules

    path = tmp_path / "cache.toml"
    path.write_text('[exporters]\nudmabuf = "WC"\n')
    res = Resolver(rules=load_rules(path)).resolve(fake_dmabuf(bare, "udmabuf"))
    assert res.attr is CacheAttr.WC and str(path) in res.detail


# --- 4. the legacy heuristic -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exporter", "driver", "attr"),
    [("drm", None, CacheAttr.WC), ("drm", "i915", CacheAttr.CACHED), ("i915", None, CacheAttr.CACHED),
     ("udmabuf", None, CacheAttr.WC), ("drm", "vgem", CacheAttr.WC)],
)
def test_fake_dmabuf_legacy_heuristic_when_enabled(
    bare: HostBuffer, exporter: str, driver: str | None, attr: CacheAttr
) -> None:
    res = Resolver(legacy_heuristic=True).resolve(fake_dmabuf(bare, exporter, driver))
    assert (res.attr, res.provenance) == (attr, Provenance.HEURISTIC)
    assert repr(driver or exporter) in res.detail and "kernel: DMA_BUF_IOCTL_INFO: ENOTTY" in res.detail
    assert map_info(res) in (1, 3)


def test_legacy_heuristic_function() -> None:
    assert legacy_heuristic("i915") is CacheAttr.CACHED
    assert legacy_heuristic("I915") is CacheAttr.WC  # virglrenderer compares exactly
    assert legacy_heuristic("amdgpu") is CacheAttr.WC


def test_legacy_heuristic_does_not_guess_for_non_dmabufs(bare: HostBuffer) -> None:
    with pytest.raises(Unresolved, match="only guesses for dma-bufs"):
        Resolver(legacy_heuristic=True).resolve(bare)


# --- 5. Unresolved ---------------------------------------------------------------------------------------------------


def test_unresolved_without_any_source_says_which_buffer_and_why(bare: HostBuffer) -> None:
    with pytest.raises(Unresolved) as exc:
        Resolver().resolve(bare)
    msg = str(exc.value)
    assert f"buffer fd {bare.fd} (external, not a dma-buf, 0 bytes)" in msg
    assert "DMA_BUF_IOCTL_INFO: ENOTTY" in msg and "no operator rules are configured" in msg
    assert "legacy heuristic is disabled" in msg
    assert bare.resolution is None


def test_fake_dmabuf_unresolved_names_the_unmatched_exporter_and_driver(bare: HostBuffer) -> None:
    with pytest.raises(Unresolved) as exc:
        Resolver(rules=RULES).resolve(fake_dmabuf(bare, "virtio_gpu", "virtio_gpu"))
    msg = str(exc.value)
    assert "exporter 'virtio_gpu'" in msg and "no rule in cache.toml for exporter 'virtio_gpu' or DRM driver" in msg


def test_fake_kernel_unknown_value_without_fallback_is_unresolved(bare: HostBuffer) -> None:
    resolver, _ = fake_kernel(UNKNOWN)
    with pytest.raises(Unresolved, match="value=0x7"):
        resolver.resolve(fake_dmabuf(bare, "future"))


def test_closed_buffer_is_refused(bare: HostBuffer) -> None:
    bare.close()
    with pytest.raises(ValueError, match="closed"):
        Resolver().resolve(bare)


def test_map_info_is_exactly_the_enum_value() -> None:
    for attr in CacheAttr:
        assert map_info(Resolution(attr, Provenance.OPERATOR, "x")) == attr.value
    assert sorted(a.value for a in CacheAttr) == [1, 2, 3]
