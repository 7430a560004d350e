"""Guest blobs (BLOB_MEM_GUEST): the pixels stay in guest memory and SET_SCANOUT_BLOB says how to read them; what
the display shows on flush is read from there.  Plus the blob checks of the conformance checklist."""

from __future__ import annotations

import numpy as np
import pytest

from vgpu.conformance.process import BackendProcess
from vgpu.protocol import (
    BlobMem,
    CtrlType,
    Format,
    GpuFeature,
    MemEntries,
    Rect,
    ResourceAttachBacking,
    ResourceCreateBlob,
    ResourceDetachBacking,
    ResourceFlush,
    TransferToHost2D,
)
from vgpu.session import ALL_FEATURES, PAGE, Session, hdr, pattern, scanout_blob, updates

pytestmark = pytest.mark.vgpu(display=True)

E = CtrlType
CB = E.CMD_RESOURCE_CREATE_BLOB
GUEST = BlobMem.BLOB_MEM_GUEST
XRGB = Format.FORMAT_B8G8R8X8_UNORM


def test_guest_blob_scanout_reads_guest_memory(gpu: Session) -> None:
    w, h, stride, offset = 200, 100, 1024, 4096
    size = offset + stride * h
    b = gpu.backing(size)
    gpu.ok(ResourceCreateBlob(hdr(CB), 1, GUEST, 0, 0, size, b.entries))
    px = pattern(w, h)
    rows = np.zeros((h, stride), np.uint8)
    rows[:, :w * 4] = px.reshape(h, w * 4)
    gpu.write_backing(b, rows.tobytes(), offset)
    gpu.ok(scanout_blob(1, w, h, stride, offset))
    # A transfer on a guest blob is accepted and changes nothing (there is no host copy).
    gpu.ok(TransferToHost2D(hdr(E.CMD_TRANSFER_TO_HOST_2D), Rect(0, 0, w, h), 0, 1))
    gpu.flush(1, Rect(10, 20, 30, 40))
    ((rect, data),) = updates(gpu, 1)
    assert rect == (0, 10, 20, 30, 40)
    got = np.frombuffer(data, np.uint8).reshape(40, 30, 4)
    assert np.array_equal(got[..., :3], px[20:60, 10:40, :3])
    # The guest draws again: the next flush shows the new pixels without any transfer.
    px2 = pattern(w, h, seed=50)
    rows[:, :w * 4] = px2.reshape(h, w * 4)
    gpu.write_backing(b, rows.tobytes(), offset)
    gpu.flush(1, Rect(0, 0, w, h))
    (_, (_, data2)) = updates(gpu, 2)
    assert np.array_equal(np.frombuffer(data2, np.uint8).reshape(h, w, 4)[..., :3], px2[..., :3])


def test_guest_blob_without_entries_gets_backing_later(gpu: Session) -> None:
    size = 64 * 64 * 4
    gpu.ok(ResourceCreateBlob(hdr(CB), 2, GUEST, 0, 0, size, MemEntries.of([])))
    assert gpu.err(scanout_blob(2, 64, 64, 256)) == E.RESP_ERR_INVALID_PARAMETER  # nothing to show yet
    b = gpu.backing(size)
    gpu.ok(ResourceAttachBacking(hdr(E.CMD_RESOURCE_ATTACH_BACKING), 2, b.entries))
    gpu.ok(scanout_blob(2, 64, 64, 256))
    gpu.ok(ResourceDetachBacking(hdr(E.CMD_RESOURCE_DETACH_BACKING), 2))
    # Detaching the pixels of a shown blob takes it off the scanout; a flush then shows nothing.
    gpu.ok(ResourceFlush(hdr(E.CMD_RESOURCE_FLUSH), Rect(0, 0, 64, 64), 2))


def test_blob_checklist(gpu: Session) -> None:
    page = MemEntries.of([(gpu.ram.alloc(PAGE, PAGE), PAGE)])
    for blob_mem in (0, 4, 0xFFFF):
        assert gpu.err(ResourceCreateBlob(hdr(CB), 3, blob_mem, 0, 0, PAGE, page)) == E.RESP_ERR_INVALID_PARAMETER
    # HOST3D blobs need VIRGL, which is not offered without a context type (checklist 47).
    assert gpu.err(ResourceCreateBlob(hdr(CB), 3, BlobMem.BLOB_MEM_HOST3D, 1, 5, PAGE, page)) == \
        E.RESP_ERR_INVALID_PARAMETER
    assert gpu.err(ResourceCreateBlob(hdr(CB), 3, GUEST, 0, 0, 2 * PAGE, page)) == E.RESP_ERR_INVALID_PARAMETER
    assert gpu.err(ResourceCreateBlob(hdr(CB), 3, GUEST, 0x80, 0, PAGE, page)) == E.RESP_ERR_INVALID_PARAMETER
    assert gpu.err(ResourceCreateBlob(hdr(CB), 3, GUEST, 0, 9, PAGE, page)) == E.RESP_ERR_INVALID_PARAMETER
    assert gpu.err(ResourceCreateBlob(hdr(CB), 0, GUEST, 0, 0, PAGE, page)) == E.RESP_ERR_INVALID_RESOURCE_ID
    gpu.ok(ResourceCreateBlob(hdr(CB), 3, GUEST, 1, 0, PAGE, page))
    # SET_SCANOUT_BLOB: unknown format, image past the blob, rect outside the image, a non-blob resource.
    assert gpu.err(scanout_blob(3, 16, 16, 64, fmt=99)) == E.RESP_ERR_INVALID_PARAMETER
    assert gpu.err(scanout_blob(3, 32, 33, 128)) == E.RESP_ERR_INVALID_PARAMETER
    assert gpu.err(scanout_blob(3, 16, 16, 64, offset=PAGE)) == E.RESP_ERR_INVALID_PARAMETER
    assert gpu.err(scanout_blob(3, 16, 16, 32)) == E.RESP_ERR_INVALID_PARAMETER  # stride < width * 4
    assert gpu.err(scanout_blob(3, 16, 16, 64, r=Rect(8, 8, 16, 16))) == E.RESP_ERR_INVALID_PARAMETER
    assert gpu.err(scanout_blob(3, 16, 16, 64, scanout=5)) == E.RESP_ERR_INVALID_SCANOUT_ID
    gpu.image_2d(4, 16, 16)
    assert gpu.err(scanout_blob(4, 16, 16, 64)) == E.RESP_ERR_INVALID_PARAMETER
    gpu.ok(scanout_blob(3, 16, 16, 64))


def test_blob_commands_need_the_feature(vgpu: BackendProcess) -> None:
    g = Session.open(vgpu.socket_path, features=ALL_FEATURES & ~GpuFeature.F_RESOURCE_BLOB.mask)
    try:
        page = MemEntries.of([(g.ram.alloc(PAGE, PAGE), PAGE)])
        assert g.err(ResourceCreateBlob(hdr(CB), 1, GUEST, 0, 0, PAGE, page)) == E.RESP_ERR_UNSPEC
        assert g.err(scanout_blob(1, 16, 16, 64)) == E.RESP_ERR_UNSPEC
    finally:
        g.close()
