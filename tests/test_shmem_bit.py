"""Which protocol-feature bit our back end offers SHMEM on (spec/shmem-bit-21.md): bit 22 unless the operator asks
for 21 with --shmem-feature-bit=21, for front ends on rust-vmm vhost 0.16 or crosvm from 2026-03-09 to 2026-08-03.
Such a front end (crosvm's sequence with SHMEM on bit 21) then maps host blobs; a front end that says SHMEM on
bit 22 gets no SHMEM from that back end, and MAP_BLOB answers it an error while the device keeps serving; bit 21
is never offered unasked."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import WINDOW, start_backend
from vgpu.conformance.process import BackendProcess
from vgpu.gpu.config import GpuConfig
from vgpu.protocol import CtrlType
from vgpu.protocol import structs as s
from vgpu.session import CROSS_DOMAIN_FEATURES, CrossDomainGuest, Session, rtype
from vgpu.vhost_user.frontend import Frontend
from vgpu.vhost_user.profiles import CROSVM, Profile
from vgpu.vhost_user.wire import LEGACY_SHMEM_BIT, FrontendRequest, ProtocolFeature, bit

E = CtrlType
SHMEM_22 = bit(ProtocolFeature.SHMEM)
SHMEM_21 = bit(LEGACY_SHMEM_BIT)
# crosvm's sequence as it was from a6bc3bc1b (2026-03-09) to 8ae81e773 (2026-08-04): SHMEM asked on bit 21.
CROSVM_BIT_21 = dataclasses.replace(CROSVM, name="crosvm-bit-21", shmem_bit=LEGACY_SHMEM_BIT,
                                    protocol_features=CROSVM.protocol_features & ~SHMEM_22 | SHMEM_21)


def backend(tmp_path: Path, *extra: str) -> BackendProcess:
    return start_backend([sys.executable, "-m", "vgpu", "--context-types=cross-domain", "--allocator=memfd",
                          f"--host-visible-size={WINDOW}", "--log-level=info", *extra], tmp_path, "vgpu")


@pytest.fixture
def legacy(tmp_path: Path) -> Iterator[BackendProcess]:
    b = backend(tmp_path, "--shmem-feature-bit=21")
    yield b
    b.stop()


def offered(b: BackendProcess) -> int:
    with Frontend.connect(b.socket_path) as fe:
        return fe.u64(FrontendRequest.GET_PROTOCOL_FEATURES)


def session(b: BackendProcess, profile: Profile) -> Session:
    return Session.open(b.socket_path, features=CROSS_DOMAIN_FEATURES, ram_size=48 << 20, profile=profile)


def test_bit_22_by_default_and_bit_21_never_unasked(tmp_path: Path) -> None:
    b = backend(tmp_path)
    try:
        features = offered(b)
    finally:
        b.stop()
    assert features & SHMEM_22 and not features & SHMEM_21


def test_a_bit_21_peer_maps_host_blobs_when_the_operator_asks(legacy: BackendProcess) -> None:
    features = offered(legacy)
    assert features & SHMEM_21 and not features & SHMEM_22
    g = session(legacy, CROSVM_BIT_21)
    try:
        assert g.fe.protocol_features & SHMEM_21 and g.fe.shm[1].size == WINDOW
        client = CrossDomainGuest(g)
        client.start()
        reqs = client.requirements(64, 64)
        assert rtype(client.create_blob(1, reqs)) == E.RESP_OK_NODATA
        resp = s.resp_map_info.parse(client.map(1, 0))
        assert (resp.hdr.type, resp.map_info) == (E.RESP_OK_MAP_INFO, 1)
        assert [k for k, _ in g.fe.shm[1].log] == ["map"]
    finally:
        g.close()
    assert "WARNING" not in legacy.log()


def test_a_bit_22_peer_of_a_bit_21_back_end_gets_no_shmem_and_an_error(legacy: BackendProcess) -> None:
    g = session(legacy, CROSVM)
    try:
        assert not g.fe.protocol_features & (SHMEM_21 | SHMEM_22) and g.fe.shm == {}
        client = CrossDomainGuest(g)
        client.start()
        reqs = client.requirements(64, 64)
        assert rtype(client.create_blob(1, reqs)) == E.RESP_OK_NODATA
        assert rtype(client.map(1, 0)) >= 0x1200
        client.requirements(32, 32)  # still serving
    finally:
        g.close()


def test_only_bits_22_and_21_spell_shmem() -> None:
    assert GpuConfig(shmem_feature_bit=21).shmem_feature_bit == 21
    with pytest.raises(ValueError, match="bit 22 or 21"):
        GpuConfig(shmem_feature_bit=20)
