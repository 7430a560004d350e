"""What an arm64 guest is sent for an uncached buffer: WC (Normal non-cacheable), not UNCACHED (Device memory, where
unaligned accesses and memcpy fault); every other answer and every other guest as resolved.  Checked on the policy
itself and on the wire of a real back-end process (image requirements, RESP_OK_MAP_INFO, the log, the status)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import VGPU, host_blob_options, start_backend
from vgpu.blob.allocators import MemfdAllocator
from vgpu.blob.guest_arch import (
    AARCH64_UNCACHED,
    GuestArch,
    GuestResolver,
    for_guest,
    host_guest_arch,
    parse_guest_arch,
)
from vgpu.blob.resolve import Resolver
from vgpu.blob.rules import load_rules
from vgpu.blob.types import CacheAttr, Provenance, Resolution
from vgpu.conformance.process import BackendProcess
from vgpu.protocol import CtrlType
from vgpu.protocol import structs as s
from vgpu.session import CROSS_DOMAIN_FEATURES, CrossDomainGuest, Session
from vgpu.status import query

A = CacheAttr


@pytest.mark.parametrize(("arch", "attr", "sent"), [
    (GuestArch.AARCH64, A.UNCACHED, A.WC),
    (GuestArch.AARCH64, A.WC, A.WC),
    (GuestArch.AARCH64, A.CACHED, A.CACHED),
    (GuestArch.X86_64, A.UNCACHED, A.UNCACHED),
    (GuestArch.X86_64, A.WC, A.WC),
    (GuestArch.X86_64, A.CACHED, A.CACHED),
    (GuestArch.OTHER, A.UNCACHED, A.UNCACHED),
])
def test_only_uncached_for_an_arm64_guest_changes(arch: GuestArch, attr: CacheAttr, sent: CacheAttr) -> None:
    truth = Resolution(attr, Provenance.KERNEL, "DMA_BUF_IOCTL_INFO: x")
    answer = for_guest(truth, arch)
    assert (answer.attr, answer.provenance) == (sent, Provenance.KERNEL)
    if sent is attr:
        assert answer is truth
    else:
        # The log keeps what the host maps and says why the guest was told otherwise.
        assert answer.detail == f"DMA_BUF_IOCTL_INFO: x; host mapping UNCACHED, {AARCH64_UNCACHED}"
    # Never the dangerous direction: nothing the host maps uncached or WC becomes cached in the guest.
    assert (answer.attr is A.CACHED) == (attr is A.CACHED)


def test_names_and_the_host_default() -> None:
    assert [parse_guest_arch(t) for t in ("x86_64", "amd64", "aarch64", "arm64", "other")] == \
        [GuestArch.X86_64, GuestArch.X86_64, GuestArch.AARCH64, GuestArch.AARCH64, GuestArch.OTHER]
    with pytest.raises(ValueError, match="unknown guest architecture 'arm'"):
        parse_guest_arch("arm")
    assert host_guest_arch("aarch64") is GuestArch.AARCH64 and host_guest_arch("x86_64") is GuestArch.X86_64
    assert host_guest_arch("riscv64") is GuestArch.OTHER


def test_the_resolver_records_what_the_guest_is_told(tmp_path: Path) -> None:
    rules = tmp_path / "r.toml"
    rules.write_text('[allocator_overrides]\nmemfd = "uncached"\n')
    resolver = GuestResolver(Resolver(rules=load_rules(rules)), GuestArch.AARCH64)
    with MemfdAllocator() as alloc:
        buffer = alloc.allocate(4096)
        try:
            r = resolver.resolve(buffer)
            assert buffer.resolution is r and r.attr is A.WC and r.provenance is Provenance.OPERATOR
            assert r.detail.startswith("rule allocator_overrides.memfd = uncached") and AARCH64_UNCACHED in r.detail
        finally:
            buffer.close()


@pytest.fixture(params=["aarch64", "x86_64"])
def uncached_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, BackendProcess]]:
    rules = tmp_path / "r.toml"
    rules.write_text('[allocator_overrides]\nmemfd = "uncached"\n')
    arch = str(request.param)
    b = start_backend([*VGPU, *host_blob_options(**{"--cache-rules": str(rules), "--guest-arch": arch}),
                       f"--status-socket={tmp_path / 'status.sock'}"], tmp_path, "vgpu")
    yield arch, b
    b.stop()


def test_a_real_back_end_tells_the_guest(uncached_backend: tuple[str, BackendProcess], tmp_path: Path) -> None:
    arch, vgpu = uncached_backend
    sent = {"aarch64": A.WC, "x86_64": A.UNCACHED}[arch]
    g = Session.open(vgpu.socket_path, features=CROSS_DOMAIN_FEATURES)
    try:
        g.fe.reserve_shm()
        client = CrossDomainGuest(g)
        client.start()
        # Up front, in the image requirements, and again in the MAP_BLOB answer: the same value.
        reqs = client.requirements(64, 64)
        assert reqs.map_info == sent  # type: ignore[attr-defined]
        client.create_blob(1, reqs)
        resp = s.resp_map_info.parse(client.map(1, 0))
        assert (resp.hdr.type, resp.map_info) == (CtrlType.RESP_OK_MAP_INFO, sent)
        doc = query(str(tmp_path / "status.sock"))
        assert doc["guest_arch"] == arch
        (m,) = doc["device"]["mappings"]
        assert (m["map_info"], m["map_info_name"], m["provenance"]) == (int(sent), sent.name, "operator rule")
        assert (AARCH64_UNCACHED in m["detail"]) == (arch == "aarch64")
    finally:
        g.close()
    log = vgpu.log()
    assert f"guest architecture {arch} (--guest-arch)" in log
    assert f"map blob 1 at 0x0 +0x4000: map_info {sent.name} (operator rule: " in log
