"""Our back end driven as crosvm drives a vhost-user GPU (``vgpu.vhost_user.profiles.CROSVM``, read from crosvm's
source: spec/crosvm-profile.md), with no guest: the set-up messages reach the back end in crosvm's order and
none is refused (crosvm asks no REPLY_ACK of its own requests, so a refusal would pass silently and leave the
guest without rings); a 2D frame is shown with no display socket, so its pixels are read from the back end's
``--scanout-png`` picture; a cross-domain context hands out a host blob that MAP_BLOB maps through SHMEM_MAP (9)
with its map_info and UNMAP_BLOB unmaps through SHMEM_UNMAP (10); a mapping crosvm refuses (it answers -EINVAL)
costs the guest one error, not the device.  No crosvm binary runs here: crosvm is not packaged for Debian."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import WINDOW, backend_buffer_with, start_backend
from vgpu.conformance.process import BackendProcess
from vgpu.gpu import png
from vgpu.procfs import wait_until
from vgpu.protocol import CtrlType, Format, Rect, ResourceUnmapBlob
from vgpu.protocol import structs as s
from vgpu.session import CROSS_DOMAIN_FEATURES, CrossDomainGuest, Session, hdr, pattern, rtype
from vgpu.vhost_user.frontend import FrontendError
from vgpu.vhost_user.profiles import CROSVM
from vgpu.vhost_user.shm_window import ShmMapping
from vgpu.vhost_user.wire import MAX_QUEUE_SIZE, BackendRequest, ProtocolFeature, bit

E = CtrlType
# The requests crosvm sends a GPU back end before the guest's first command, in its order (spec/crosvm-profile.md).
RING = ["SET_VRING_NUM", "SET_VRING_ADDR", "SET_VRING_BASE", "SET_VRING_CALL", "SET_VRING_KICK", "SET_VRING_ENABLE"]
CROSVM_SET_UP = ["SET_OWNER", "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "SET_BACKEND_REQ_FD",
                 "GET_QUEUE_NUM", "GET_SHMEM_CONFIG", "GET_CONFIG", "GET_CONFIG", "SET_FEATURES", "SET_MEM_TABLE",
                 *RING, *RING]
RECEIVED = re.compile(r"DEBUG <- (\w+) flags (0x[0-9a-f]+) size (\d+) fds (\d+)")


@pytest.fixture
def vgpu(tmp_path: Path) -> Iterator[BackendProcess]:
    args = [sys.executable, "-m", "vgpu", "--context-types=cross-domain", "--allocator=memfd",
            f"--host-visible-size={WINDOW}", "--max-host-memory=32M", "--map-timeout=2", "--log-level=debug",
            f"--scanout-png={tmp_path / 'png'}", "--png-rate=1000"]
    b = start_backend(args, tmp_path, "vgpu")
    yield b
    b.stop()


@pytest.fixture
def gpu(vgpu: BackendProcess) -> Iterator[Session]:
    g = Session.open(vgpu.socket_path, features=CROSS_DOMAIN_FEATURES, ram_size=48 << 20, profile=CROSVM)
    yield g
    g.close()


def received(b: BackendProcess) -> list[tuple[str, int, int, int]]:
    """The front-end requests the back end logged, in arrival order: (name, flags, size, fds)."""
    return [(m[1], int(m[2], 16), int(m[3]), int(m[4])) for m in RECEIVED.finditer(b.log())]


def test_crosvm_set_up_reaches_the_back_end_in_order_and_nothing_is_refused(gpu: Session, vgpu: BackendProcess) -> None:
    # crosvm waits for no ack, so the last requests may still be on their way to the log.
    assert wait_until(lambda: len(received(vgpu)) >= len(CROSVM_SET_UP))
    got = received(vgpu)
    assert [name for name, *_ in got] == CROSVM_SET_UP
    # No NEED_REPLY on any of them, no display socket; guest RAM as two entries of one memfd, an fd each; the
    # driver's two 4-byte config reads carry crosvm's flags word 1.
    assert {flags for _, flags, _, _ in got} == {0x1}
    assert ("SET_MEM_TABLE", 0x1, 8 + 2 * 32, 2) in got
    assert [size for name, _, size, _ in got if name == "GET_CONFIG"] == [16, 16]
    # (The start-up line names the policy for buffers that may move, "refused" by default: not a request.)
    refusals = [line for line in vgpu.log().splitlines() if "refused" in line and "buffers that may move" not in line]
    assert refusals == [] and "WARNING" not in vgpu.log()
    # What was negotiated: crosvm's ask less DEVICE_STATE (we do not offer it); SHMEM on bit 22; no INDIRECT_DESC.
    want = {ProtocolFeature.CONFIG, ProtocolFeature.MQ, ProtocolFeature.BACKEND_REQ, ProtocolFeature.SHMEM,
            ProtocolFeature.REPLY_ACK}
    assert gpu.fe.protocol_features == sum(bit(f) for f in want)
    assert not gpu.fe.features & bit(28) and gpu.fe.features & bit(29)
    # The rings are the size crosvm's guest ends up with, and they work.
    assert all(q.size == MAX_QUEUE_SIZE for q in gpu.fe.queues.values())
    assert gpu.fe.shm[1].size == WINDOW
    assert s.config.parse(gpu.fe.get_config(0, 16, CROSVM.config_flags)).num_capsets == 1


def test_a_2d_frame_without_a_display_socket(gpu: Session, tmp_path: Path) -> None:
    w, h_ = 96, 64
    px = pattern(w, h_)
    gpu.image_2d(1, w, h_, Format.FORMAT_B8G8R8X8_UNORM, px)
    gpu.show(1, 0, Rect(0, 0, w, h_))
    gpu.flush(1, Rect(0, 0, w, h_))
    picture = tmp_path / "png" / "scanout-0.png"
    want = px[..., [2, 1, 0]]  # B8G8R8X8 in memory; the picture is R, G, B

    def shown() -> bool:
        try:
            return bool(np.array_equal(png.decode(picture.read_bytes()), want))
        except (OSError, ValueError):
            return False

    assert wait_until(shown, 10), "scanout-0.png never showed the guest's pixels"


def test_host_blob_mapped_through_shmem_map_and_unmapped_through_shmem_unmap(gpu: Session,
                                                                             vgpu: BackendProcess) -> None:
    client = CrossDomainGuest(gpu)
    client.start()
    reqs = client.requirements(128, 64)
    assert reqs.map_info == 1  # type: ignore[attr-defined]
    assert rtype(client.create_blob(1, reqs)) == E.RESP_OK_NODATA
    resp = s.resp_map_info.parse(client.map(1, 0x100000))
    assert (resp.hdr.type, resp.map_info) == (E.RESP_OK_MAP_INFO, 1)
    window = gpu.fe.shm[1]
    assert [(k, m.shm_offset, m.length) for k, m in window.log] == [("map", 0x100000, 128 * 64 * 4)]
    window.write(0x100000 + 64, b"crosvm profile: written through the window")
    assert backend_buffer_with(vgpu.pid, b"crosvm profile: written through the window") is not None
    assert rtype(gpu.cmd(ResourceUnmapBlob(hdr(E.CMD_RESOURCE_UNMAP_BLOB, ctx_id=1), 1))) == E.RESP_OK_NODATA
    assert [k for k, _ in window.log] == ["map", "unmap"] and window.mappings == {}
    # Both went over the back-end channel as the standard requests 9 and 10, and nothing else did.
    assert [r for r, _ in gpu.fe.backend_requests] == [BackendRequest.SHMEM_MAP, BackendRequest.SHMEM_UNMAP]
    assert not gpu.fe.service_errors


def test_a_mapping_crosvm_refuses_costs_the_guest_one_error(gpu: Session, vgpu: BackendProcess) -> None:
    client = CrossDomainGuest(gpu)
    client.start()
    refuse = [True]

    def kvm_says_no(m: ShmMapping, fd: int) -> None:
        if refuse.pop():
            raise FrontendError("the VMM could not add the memory slot")

    gpu.fe.on_shmem_map = kvm_says_no
    reqs = client.requirements(64, 64)
    assert rtype(client.create_blob(1, reqs)) == E.RESP_OK_NODATA
    assert rtype(client.map(1, 0)) == E.RESP_ERR_UNSPEC
    # crosvm's answer is -EINVAL as a u64, and the back end read it as the refusal it is.
    assert wait_until(lambda: "front end refused SHMEM_MAP (ack -EINVAL)" in vgpu.log())
    # The device goes on: the next map of the same blob works.
    refuse.append(False)
    resp = s.resp_map_info.parse(client.map(1, 0))
    assert (resp.hdr.type, resp.map_info) == (E.RESP_OK_MAP_INFO, 1)
    assert [k for k, _ in gpu.fe.shm[1].log] == ["map"]
