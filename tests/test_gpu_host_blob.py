"""Host blobs end to end through our front end: a cross-domain context hands out a host buffer, the guest makes a
HOST3D blob of it and maps it; the back end resolves the cache attribute, SHMEM_MAPs the buffer's fd into the
front end's window and answers RESP_OK_MAP_INFO.  What the front end maps is the back end's buffer (checked
through /proc), and every failure path answers an error, keeps serving and leaks nothing."""

from __future__ import annotations

import struct
import threading
from pathlib import Path

import pytest

from tests.conftest import VGPU, WINDOW, backend_buffer_with, host_blob_options, start_backend
from vgpu.conformance.process import BackendProcess
from vgpu.procfs import fd_count, wait_until
from vgpu.protocol import (
    BlobFlag,
    BlobMem,
    CtrlHdr,
    CtrlType,
    CtxCreate,
    CtxDestroy,
    GetCapset,
    GetCapsetInfo,
    GpuFeature,
    MemEntries,
    ResourceCreateBlob,
    ResourceMapBlob,
    ResourceUnmapBlob,
    ResourceUnref,
    SubmitCmd,
)
from vgpu.protocol import structs as s
from vgpu.protocol.cross_domain import (
    CrossDomainCapabilities,
    CrossDomainGetImageRequirements,
)
from vgpu.session import (
    CROSS_DOMAIN_FEATURES,
    MAPPABLE,
    PAGE,
    XR24,
    CrossDomainGuest,
    Session,
    hdr,
    make_display,
    pattern,
    rtype,
    updates,
)
from vgpu.vhost_user.shm_window import ShmMapping

pytestmark = pytest.mark.vgpu(*host_blob_options())

E = CtrlType
CTX = 1


def h(t: CtrlType, ctx: int = CTX) -> CtrlHdr:
    return hdr(t, ctx_id=ctx)


def test_capset_and_config(client: CrossDomainGuest) -> None:
    g = client.sess
    assert g.fe.features & GpuFeature.F_VIRGL.mask and g.fe.features & GpuFeature.F_CONTEXT_INIT.mask
    assert s.config.parse(g.fe.get_config(0, 16)).num_capsets == 1
    info = s.resp_capset_info.parse(g.cmd(GetCapsetInfo(h(E.CMD_GET_CAPSET_INFO, 0), 0), 40))
    assert (info.hdr.type, info.capset_id, info.capset_max_version, info.capset_max_size) == \
        (E.RESP_OK_CAPSET_INFO, 5, 0, 16)
    raw = g.cmd(GetCapset(h(E.CMD_GET_CAPSET, 0), 5, 0), 24 + 16)
    assert rtype(raw) == E.RESP_OK_CAPSET
    caps = CrossDomainCapabilities.parse(raw[24:])
    assert (caps.version, caps.supported_channels, caps.supports_dmabuf) == (1, 0, 0)  # memfd: no dma-buf
    assert g.err(GetCapsetInfo(h(E.CMD_GET_CAPSET_INFO, 0), 1)) == E.RESP_ERR_INVALID_PARAMETER
    assert g.err(GetCapset(h(E.CMD_GET_CAPSET, 0), 5, 1)) == E.RESP_ERR_INVALID_PARAMETER
    assert g.fe.shmem_config() == {1: WINDOW}


def test_map_a_host_blob(client: CrossDomainGuest, vgpu: BackendProcess) -> None:
    reqs = client.requirements(256, 256)
    assert (reqs.strides[0], reqs.size, reqs.map_info) == (1024, 256 * 1024, 1)  # type: ignore[attr-defined]
    assert rtype(client.create_blob(1, reqs)) == E.RESP_OK_NODATA
    resp = s.resp_map_info.parse(client.map(1, 0x200000))
    assert (resp.hdr.type, resp.map_info) == (E.RESP_OK_MAP_INFO, 1)
    window = client.sess.fe.shm[1]
    assert [(k, m.shm_offset, m.length) for k, m in window.log] == [("map", 0x200000, 256 * 1024)]
    # What the VMM mapped is the back end's buffer: a write through the window is in the back end's memfd.
    window.write(0x200000 + 4096, b"written by the guest through the window")
    data = backend_buffer_with(vgpu.pid, b"written by the guest through the window")
    assert data is not None and len(data) == 256 * 1024
    assert "map blob 1 at 0x200000 +0x40000: map_info CACHED (allocator: " in vgpu.log()
    assert rtype(client.sess.cmd(ResourceUnmapBlob(h(E.CMD_RESOURCE_UNMAP_BLOB), 1))) == E.RESP_OK_NODATA
    assert [k for k, _ in window.log] == ["map", "unmap"] and window.mappings == {}


def test_unref_of_a_mapped_blob_unmaps_first_and_frees(client: CrossDomainGuest, vgpu: BackendProcess) -> None:
    before = fd_count(vgpu.pid)
    reqs = client.requirements(64, 64)
    client.create_blob(2, reqs)
    assert rtype(client.map(2, 0)) == E.RESP_OK_MAP_INFO
    client.sess.fe.shm[1].write(0, b"marker-2")
    assert backend_buffer_with(vgpu.pid, b"marker-2") is not None
    client.sess.ok(ResourceUnref(h(E.CMD_RESOURCE_UNREF, 0), 2))
    assert [k for k, _ in client.sess.fe.shm[1].log] == ["map", "unmap"]
    assert wait_until(lambda: fd_count(vgpu.pid) == before)


def test_blob_and_map_errors(client: CrossDomainGuest) -> None:
    g = client.sess
    reqs = client.requirements(64, 64)
    # A blob_id the context never produced, or the wrong size.
    bad = ResourceCreateBlob(h(E.CMD_RESOURCE_CREATE_BLOB), 3, BlobMem.BLOB_MEM_HOST3D, MAPPABLE, 999,
                             reqs.size, MemEntries.of([]))  # type: ignore[attr-defined]
    assert g.err(bad) == E.RESP_ERR_INVALID_PARAMETER
    wrong = ResourceCreateBlob(h(E.CMD_RESOURCE_CREATE_BLOB), 3, BlobMem.BLOB_MEM_HOST3D, MAPPABLE,
                               reqs.blob_id, reqs.size + PAGE, MemEntries.of([]))  # type: ignore[attr-defined]
    assert g.err(wrong) == E.RESP_ERR_INVALID_PARAMETER
    # From an unknown context.
    other = ResourceCreateBlob(h(E.CMD_RESOURCE_CREATE_BLOB, 9), 3, BlobMem.BLOB_MEM_HOST3D, MAPPABLE,
                               reqs.blob_id, reqs.size, MemEntries.of([]))  # type: ignore[attr-defined]
    assert g.err(other) == E.RESP_ERR_INVALID_CONTEXT_ID
    # A blob that is not MAPPABLE cannot be mapped; nor a guest blob; nor twice; nor overlapping; nor outside.
    assert rtype(client.create_blob(3, reqs, flags=int(BlobFlag.BLOB_FLAG_USE_SHAREABLE))) == E.RESP_OK_NODATA
    assert g.err(ResourceMapBlob(h(E.CMD_RESOURCE_MAP_BLOB), 3, 0)) == E.RESP_ERR_INVALID_PARAMETER
    assert g.err(ResourceMapBlob(h(E.CMD_RESOURCE_MAP_BLOB), 100, 0)) == E.RESP_ERR_INVALID_PARAMETER
    r2 = client.requirements(64, 64)
    assert rtype(client.create_blob(4, r2)) == E.RESP_OK_NODATA
    assert g.err(ResourceMapBlob(h(E.CMD_RESOURCE_MAP_BLOB), 4, 0x1001)) == E.RESP_ERR_INVALID_PARAMETER
    assert g.err(ResourceMapBlob(h(E.CMD_RESOURCE_MAP_BLOB), 4, WINDOW - PAGE)) == E.RESP_ERR_INVALID_PARAMETER
    assert rtype(client.map(4, 0x10000)) == E.RESP_OK_MAP_INFO
    assert g.err(ResourceMapBlob(h(E.CMD_RESOURCE_MAP_BLOB), 4, 0x80000)) == E.RESP_ERR_INVALID_PARAMETER
    r3 = client.requirements(64, 64)
    assert rtype(client.create_blob(5, r3)) == E.RESP_OK_NODATA
    assert g.err(ResourceMapBlob(h(E.CMD_RESOURCE_MAP_BLOB), 5, 0x10000 + PAGE)) == E.RESP_ERR_INVALID_PARAMETER
    assert g.err(ResourceUnmapBlob(h(E.CMD_RESOURCE_UNMAP_BLOB), 5)) == E.RESP_ERR_INVALID_PARAMETER
    assert g.err(ResourceUnmapBlob(h(E.CMD_RESOURCE_UNMAP_BLOB), 77)) == E.RESP_ERR_INVALID_RESOURCE_ID
    # Only the one good mapping reached the front end.
    assert [(k, m.shm_offset) for k, m in g.fe.shm[1].log] == [("map", 0x10000)]


def test_quota_refuses_before_allocating(client: CrossDomainGuest, vgpu: BackendProcess) -> None:
    before = fd_count(vgpu.pid)
    g = client.sess
    # 32 MiB of host memory: a 4096x4096 XRGB image (64 MiB) is refused and nothing is allocated.
    req = CrossDomainGetImageRequirements.build(dict(hdr=dict(cmd=2, ring_idx=0, cmd_size=24), width=4096,
                                                     height=4096, drm_format=XR24, flags=0))
    assert g.err(SubmitCmd(h(E.CMD_SUBMIT_3D), bytes(req))) == E.RESP_ERR_OUT_OF_MEMORY
    assert fd_count(vgpu.pid) == before
    client.requirements(1024, 1024)  # 4 MiB: fine
    # Destroying the context gives back the buffer it never turned into a resource.
    g.ok(CtxDestroy(h(E.CMD_CTX_DESTROY)))
    assert wait_until(lambda: fd_count(vgpu.pid) == before)


def test_cross_domain_bad_commands(client: CrossDomainGuest) -> None:
    g = client.sess
    for data in (b"\x02\x00", struct.pack("<BBHI", 2, 0, 0, 0) + bytes(16),   # cmd_size 0 would loop
                 struct.pack("<BBHI", 2, 0, 200, 0) + bytes(16),                    # past the stream
                 struct.pack("<BBHI", 7, 0, 8, 0),                                  # unknown command
                 struct.pack("<BBHI", 1, 0, 24, 0) + bytes(16),                     # INIT of 24 bytes
                 struct.pack("<BBHI", 1, 0, 20, 0) + struct.pack("<III", 999, 0, 0),  # ring not attached
                 struct.pack("<BBHI", 1, 0, 20, 0) + struct.pack("<III", 100, 0, 1),  # a Wayland channel
                 struct.pack("<BBHI", 2, 0, 24, 0) + struct.pack("<IIII", 16, 16, 0x12345678, 0)):  # format
        assert g.err(SubmitCmd(h(E.CMD_SUBMIT_3D), data)) in (E.RESP_ERR_INVALID_PARAMETER,
                                                               E.RESP_ERR_INVALID_RESOURCE_ID), data
    assert g.err(SubmitCmd(h(E.CMD_SUBMIT_3D, 7), b"")) == E.RESP_ERR_INVALID_CONTEXT_ID
    assert g.err(CtxCreate(h(E.CMD_CTX_CREATE), 0, 5, b"")) == E.RESP_ERR_INVALID_CONTEXT_ID  # duplicate
    assert g.err(CtxCreate(h(E.CMD_CTX_CREATE, 2), 0, 4, b"")) == E.RESP_ERR_INVALID_PARAMETER  # venus: no
    client.requirements(16, 16)  # and the context still works


def test_no_deadlock_when_the_vmm_adds_the_region_before_acking(client: CrossDomainGuest) -> None:
    """QEMU 11.1 sends ADD_MEM_REG (NEED_REPLY) for the new mapping before it acks SHMEM_MAP."""
    fe = client.sess.fe
    window = fe.shm[1]

    def add_region(m: ShmMapping, fd: int) -> None:
        fe.add_mem_reg(0x1_0000_0000 + m.shm_offset, m.length, window.base + m.shm_offset, m.fd_offset, fd)

    fe.on_shmem_map = add_region
    reqs = client.requirements(64, 64)
    client.create_blob(6, reqs)
    assert rtype(client.map(6, 0)) == E.RESP_OK_MAP_INFO


def test_a_vmm_that_never_acks(client: CrossDomainGuest, vgpu: BackendProcess) -> None:
    gate = threading.Event()
    client.sess.fe.on_shmem_map = lambda m, fd: gate.wait(3)
    reqs = client.requirements(64, 64)
    client.create_blob(7, reqs)
    assert client.sess.err(ResourceMapBlob(h(E.CMD_RESOURCE_MAP_BLOB), 7, 0)) == E.RESP_ERR_UNSPEC
    gate.set()
    client.sess.fe.on_shmem_map = None
    assert "SHMEM_MAP of blob 7 failed" in vgpu.log()
    client.requirements(16, 16)  # still serving


def test_without_shmem_there_is_no_region(vgpu: BackendProcess) -> None:
    from vgpu.vhost_user.frontend import FRONTEND_PROTOCOL_FEATURES
    from vgpu.vhost_user.wire import ProtocolFeature

    g = Session.open(vgpu.socket_path, features=CROSS_DOMAIN_FEATURES,
                     protocol_features=FRONTEND_PROTOCOL_FEATURES & ~(1 << ProtocolFeature.SHMEM))
    try:
        c = CrossDomainGuest(g)
        c.start()
        reqs = c.requirements(64, 64)
        c.create_blob(1, reqs)
        assert g.err(ResourceMapBlob(h(E.CMD_RESOURCE_MAP_BLOB), 1, 0)) == E.RESP_ERR_UNSPEC
    finally:
        g.close()


def test_features_without_context_types(tmp_path: Path) -> None:
    b = start_backend([*VGPU, *host_blob_options(**{"--context-types": ""})], tmp_path, "plain")
    try:
        g = Session.open(b.socket_path, features=CROSS_DOMAIN_FEATURES)
        try:
            assert not g.fe.features & GpuFeature.F_VIRGL.mask
            assert g.err(CtxCreate(h(E.CMD_CTX_CREATE), 0, 5, b"")) == E.RESP_ERR_UNSPEC
        finally:
            g.close()
    finally:
        b.stop()


def test_a_host_blob_on_a_scanout(tmp_path: Path) -> None:
    """A cross-domain buffer shown with SET_SCANOUT_BLOB: its pixels come from the host buffer (copy path)."""
    import numpy as np

    from vgpu.protocol import Format, Rect, ResourceFlush, SetScanoutBlob

    b = start_backend([*VGPU, *host_blob_options()], tmp_path, "vgpu")
    g = Session.open(b.socket_path, features=CROSS_DOMAIN_FEATURES, display=make_display(), shm=True)
    try:
        c = CrossDomainGuest(g)
        c.start()
        reqs = c.requirements(128, 64)
        c.create_blob(1, reqs)
        assert rtype(c.map(1, 0)) == E.RESP_OK_MAP_INFO
        px = pattern(128, 64)
        stride = reqs.strides[0]  # type: ignore[attr-defined]
        rows = np.zeros((64, stride), np.uint8)
        rows[:, :128 * 4] = px.reshape(64, 128 * 4)
        g.fe.shm[1].write(0, rows.tobytes())  # the guest draws through its mapping of the window
        g.ok(SetScanoutBlob(h(E.CMD_SET_SCANOUT_BLOB, 0), Rect(0, 0, 128, 64), 0, 1, 128, 64,
                            Format.FORMAT_B8G8R8X8_UNORM, (stride, 0, 0, 0), (0, 0, 0, 0)))
        g.ok(ResourceFlush(h(E.CMD_RESOURCE_FLUSH, 0), Rect(0, 0, 128, 64), 1))
        ((rect, data),) = updates(g, 1)
        assert rect == (0, 0, 0, 128, 64)
        assert np.array_equal(np.frombuffer(data, np.uint8).reshape(64, 128, 4)[..., :3], px[..., :3])
    finally:
        g.close()
        b.stop()


def test_host3d_guest_blob_transfers_both_ways(client: CrossDomainGuest) -> None:
    from vgpu.protocol import Box, TransferFromHost3D, TransferToHost3D

    g = client.sess
    reqs = client.requirements(64, 64)
    size = int(reqs.size)  # type: ignore[attr-defined]
    shadow = g.backing(size)
    short = MemEntries.of(shadow.ranges[:-1])
    assert g.err(ResourceCreateBlob(h(E.CMD_RESOURCE_CREATE_BLOB), 8, BlobMem.BLOB_MEM_HOST3D_GUEST, MAPPABLE,
                                    reqs.blob_id, size, short)) == E.RESP_ERR_INVALID_PARAMETER  # type: ignore
    g.ok(ResourceCreateBlob(h(E.CMD_RESOURCE_CREATE_BLOB), 8, BlobMem.BLOB_MEM_HOST3D_GUEST, MAPPABLE,
                            reqs.blob_id, size, shadow.entries))  # type: ignore[attr-defined]
    assert rtype(client.map(8, 0)) == E.RESP_OK_MAP_INFO
    half = size // 2
    guest_bytes = bytes((i * 13 + 5) & 0xFF for i in range(half))
    g.write_backing(shadow, guest_bytes)
    g.ok(TransferToHost3D(h(E.CMD_TRANSFER_TO_HOST_3D), Box(0, 0, 0, half, 1, 1), 0, 8, 0, 0, 0))
    assert g.fe.shm[1].read(0, half) == guest_bytes  # the host buffer now holds the guest's shadow
    host_bytes = bytes((i * 7 + 1) & 0xFF for i in range(half))
    g.fe.shm[1].write(half, host_bytes)
    g.ok(TransferFromHost3D(h(E.CMD_TRANSFER_FROM_HOST_3D), Box(half, 0, 0, half, 1, 1), half, 8, 0, 0, 0))
    got = b"".join(g.ram.read(p, n) for p, n in shadow.ranges)[half:size]
    assert got == host_bytes
    # One row of bytes only, inside the blob and its shadow; and only blobs with a shadow.
    for box, off in ((Box(0, 1, 0, 16, 1, 1), 0), (Box(0, 0, 0, 16, 2, 1), 0), (Box(size - 8, 0, 0, 16, 1, 1), 0),
                     (Box(0, 0, 0, 16, 1, 1), size)):
        assert g.err(TransferToHost3D(h(E.CMD_TRANSFER_TO_HOST_3D), box, off, 8, 0, 0, 0)) == \
            E.RESP_ERR_INVALID_PARAMETER, (box, off)
    r2 = client.requirements(16, 16)
    client.create_blob(9, r2)
    assert g.err(TransferToHost3D(h(E.CMD_TRANSFER_TO_HOST_3D), Box(0, 0, 0, 16, 1, 1), 0, 9, 0, 0, 0)) == \
        E.RESP_ERR_INVALID_PARAMETER
