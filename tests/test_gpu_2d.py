"""2D resources, scanouts, flushes and the cursor, through a real back-end process: what reaches the display
socket and the PNG pictures is compared byte for byte with what the guest drew; every malformed command gets its
error and changes nothing."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from vgpu.conformance.process import BackendProcess
from vgpu.gpu import png
from vgpu.procfs import fd_count, wait_until
from vgpu.protocol import (
    CtrlFlag,
    CtrlHdr,
    CtrlType,
    CursorPos,
    Format,
    MemEntries,
    MoveCursor,
    Rect,
    ResourceAssignUuid,
    ResourceAttachBacking,
    ResourceCreate2D,
    ResourceDetachBacking,
    ResourceFlush,
    ResourceUnref,
    SetScanout,
    TransferToHost2D,
    UpdateCursor,
)
from vgpu.session import Session, hdr, make_display, pattern, rtype, updates
from vgpu.vhost_user.wire import GpuRequest

E = CtrlType
pytestmark = pytest.mark.vgpu("--scanouts=2", "--scanout-png={tmp}/png", "--png-rate=1000", "--max-host-memory=64M",
                              "--max-resources=64", display=True)


def test_transfer_set_scanout_flush_reaches_the_display_exactly(gpu: Session, tmp_path: Path) -> None:
    w, h = 320, 200
    px = pattern(w, h)
    gpu.image_2d(1, w, h, Format.FORMAT_B8G8R8X8_UNORM, px)
    gpu.show(1, 0, Rect(0, 0, w, h))
    assert gpu.display is not None
    (scan,) = gpu.display.wait_for(GpuRequest.SCANOUT)
    assert struct.unpack("<III", scan.payload) == (0, w, h)
    gpu.flush(1, Rect(0, 0, w, h))
    ((rect, data),) = updates(gpu, 1)
    assert rect == (0, 0, 0, w, h)
    got = np.frombuffer(data, np.uint8).reshape(h, w, 4)
    # x8r8g8b8: the resource's bytes as they are, its X byte included (the display ignores it, as QEMU's does).
    assert np.array_equal(got, px)
    # The picture shows the same pixels (PNG is R, G, B).
    pic = png.decode((tmp_path / "png" / "scanout-0.png").read_bytes())
    assert np.array_equal(pic, px[..., [2, 1, 0]])


def test_partial_transfer_uses_offset_and_the_resource_stride(gpu: Session) -> None:
    w, h = 64, 32
    b = gpu.image_2d(2, w, h, Format.FORMAT_B8G8R8A8_UNORM, np.zeros((h, w, 4), np.uint8))
    new = pattern(w, h, seed=9)
    gpu.write_backing(b, new.tobytes())
    # Rect (8, 4, 16, 10): the guest passes offset = y * stride + x * 4; row i is read at offset + i * stride.
    r = Rect(8, 4, 16, 10)
    gpu.ok(TransferToHost2D(hdr(E.CMD_TRANSFER_TO_HOST_2D), r, 4 * w * 4 + 8 * 4, 2))
    gpu.show(2, 0, Rect(0, 0, w, h))
    gpu.flush(2, Rect(0, 0, w, h))
    ((_, data),) = updates(gpu, 1)
    got = np.frombuffer(data, np.uint8).reshape(h, w, 4)
    expect = np.zeros((h, w, 4), np.uint8)
    expect[4:14, 8:24] = new[4:14, 8:24]
    assert np.array_equal(got, expect)


def test_formats_are_converted_for_the_display(gpu: Session) -> None:
    w, h = 16, 8
    px = pattern(w, h)
    gpu.image_2d(3, w, h, Format.FORMAT_R8G8B8A8_UNORM, px)
    gpu.show(3, 0, Rect(0, 0, w, h))
    gpu.flush(3, Rect(0, 0, w, h))
    ((_, data),) = updates(gpu, 1)
    got = np.frombuffer(data, np.uint8).reshape(h, w, 4)
    assert np.array_equal(got[..., 0], px[..., 2]) and np.array_equal(got[..., 2], px[..., 0])
    assert np.array_equal(got[..., 1], px[..., 1])


def test_flush_is_clipped_and_mirrored(gpu: Session) -> None:
    w, h = 100, 80
    px = pattern(w, h)
    gpu.image_2d(4, w, h, Format.FORMAT_B8G8R8X8_UNORM, px)
    gpu.show(4, 0, Rect(0, 0, 50, 40))
    gpu.show(4, 1, Rect(40, 30, 60, 50))
    gpu.flush(4, Rect(30, 20, 30, 30))  # overlaps both scanouts partly
    got = {u[0][0]: u for u in updates(gpu, 2)}
    assert got[0][0] == (0, 30, 20, 20, 20)   # clipped to scanout 0's 50x40
    assert got[1][0] == (1, 0, 0, 20, 20)     # relative to scanout 1's origin (40, 30)
    data1 = np.frombuffer(got[1][1], np.uint8).reshape(20, 20, 4)
    assert np.array_equal(data1[..., :3], px[30:50, 40:60, :3])


def test_unref_of_a_shown_resource_disables_the_scanout(gpu: Session) -> None:
    gpu.image_2d(5, 32, 32)
    gpu.show(5, 0, Rect(0, 0, 32, 32))
    gpu.ok(ResourceUnref(hdr(E.CMD_RESOURCE_UNREF), 5))
    assert gpu.display is not None
    scans = gpu.display.wait_for(GpuRequest.SCANOUT, 2)
    assert struct.unpack("<III", scans[-1].payload) == (0, 0, 0)
    gpu.image_2d(5, 16, 16)  # the id is free again


def test_cursor(gpu: Session) -> None:
    px = pattern(64, 64)
    gpu.image_2d(6, 64, 64, Format.FORMAT_B8G8R8A8_UNORM, px)
    gpu.ok(UpdateCursor(hdr(E.CMD_UPDATE_CURSOR), CursorPos(0, 10, 20), 6, 3, 4), queue=1)
    assert gpu.display is not None
    (cu,) = gpu.display.wait_for(GpuRequest.CURSOR_UPDATE)
    assert len(cu.payload) == 16404
    assert struct.unpack_from("<5I", cu.payload) == (0, 10, 20, 3, 4)
    assert cu.payload[20:] == px.tobytes()
    gpu.ok(MoveCursor(hdr(E.CMD_MOVE_CURSOR), CursorPos(0, 99, 98)), queue=1)
    (pos,) = gpu.display.wait_for(GpuRequest.CURSOR_POS)
    assert struct.unpack("<III", pos.payload) == (0, 99, 98)
    gpu.ok(UpdateCursor(hdr(E.CMD_UPDATE_CURSOR), CursorPos(0, 1, 2), 0, 0, 0), queue=1)
    gpu.display.wait_for(GpuRequest.CURSOR_POS_HIDE)
    # A resource that is not 64x64, or unknown: an error, and no cursor message.
    gpu.image_2d(7, 32, 32)
    assert gpu.err(UpdateCursor(hdr(E.CMD_UPDATE_CURSOR), CursorPos(0, 0, 0), 7, 0, 0), queue=1) == \
        E.RESP_ERR_INVALID_PARAMETER
    assert gpu.err(UpdateCursor(hdr(E.CMD_UPDATE_CURSOR), CursorPos(0, 0, 0), 77, 0, 0), queue=1) == \
        E.RESP_ERR_INVALID_RESOURCE_ID
    assert len(gpu.display.of(GpuRequest.CURSOR_UPDATE)) == 1
    # Cursor commands belong on the cursor queue.
    assert gpu.err(MoveCursor(hdr(E.CMD_MOVE_CURSOR), CursorPos(0, 1, 1)), queue=0) == E.RESP_ERR_UNSPEC


def test_fenced_transfer_is_done_when_answered(gpu: Session) -> None:
    w, h = 32, 32
    b = gpu.image_2d(8, w, h)
    gpu.show(8, 0, Rect(0, 0, w, h))
    px = pattern(w, h, seed=3)
    gpu.write_backing(b, px.tobytes())
    resp = gpu.cmd(TransferToHost2D(CtrlHdr(E.CMD_TRANSFER_TO_HOST_2D, CtrlFlag.FLAG_FENCE, 41), Rect(0, 0, w, h),
                                    0, 8))
    assert struct.unpack_from("<IIQ", resp) == (E.RESP_OK_NODATA, CtrlFlag.FLAG_FENCE, 41)
    gpu.flush(8, Rect(0, 0, w, h))
    ((_, data),) = updates(gpu, 1)
    assert np.array_equal(np.frombuffer(data, np.uint8).reshape(h, w, 4)[..., :3], px[..., :3])


def test_assign_uuid_is_stable(gpu: Session) -> None:
    gpu.image_2d(9, 16, 16)
    a = gpu.cmd(ResourceAssignUuid(hdr(E.CMD_RESOURCE_ASSIGN_UUID), 9), 40)
    b = gpu.cmd(ResourceAssignUuid(hdr(E.CMD_RESOURCE_ASSIGN_UUID), 9), 40)
    assert rtype(a) == E.RESP_OK_RESOURCE_UUID and a[24:] == b[24:] and a[24:] != bytes(16)
    assert gpu.err(ResourceAssignUuid(hdr(E.CMD_RESOURCE_ASSIGN_UUID), 99)) == E.RESP_ERR_INVALID_RESOURCE_ID


C2D = E.CMD_RESOURCE_CREATE_2D
X = Format.FORMAT_B8G8R8X8_UNORM


def test_create_errors(gpu: Session) -> None:
    assert gpu.err(ResourceCreate2D(hdr(C2D), 0, X, 16, 16)) == E.RESP_ERR_INVALID_RESOURCE_ID
    gpu.ok(ResourceCreate2D(hdr(C2D), 10, X, 16, 16))
    assert gpu.err(ResourceCreate2D(hdr(C2D), 10, X, 16, 16)) == E.RESP_ERR_INVALID_RESOURCE_ID
    assert gpu.err(ResourceCreate2D(hdr(C2D), 11, 5, 16, 16)) == E.RESP_ERR_INVALID_PARAMETER
    assert gpu.err(ResourceCreate2D(hdr(C2D), 11, X, 0, 16)) == E.RESP_ERR_INVALID_PARAMETER
    assert gpu.err(ResourceCreate2D(hdr(C2D), 11, X, 16, 0)) == E.RESP_ERR_INVALID_PARAMETER
    assert gpu.err(ResourceUnref(hdr(E.CMD_RESOURCE_UNREF), 12345)) == E.RESP_ERR_INVALID_RESOURCE_ID


def test_backing_errors(gpu: Session) -> None:
    A = E.CMD_RESOURCE_ATTACH_BACKING
    assert gpu.err(ResourceAttachBacking(hdr(A), 99, MemEntries.of([(0x10000, 4096)]))) == \
        E.RESP_ERR_INVALID_RESOURCE_ID
    gpu.ok(ResourceCreate2D(hdr(C2D), 20, X, 16, 16))
    outside = gpu.ram.size + 0x1000
    assert gpu.err(ResourceAttachBacking(hdr(A), 20, MemEntries.of([(outside, 4096)]))) == \
        E.RESP_ERR_INVALID_PARAMETER
    straddle = gpu.ram.size - 2048
    assert gpu.err(ResourceAttachBacking(hdr(A), 20, MemEntries.of([(straddle, 4096)]))) == \
        E.RESP_ERR_INVALID_PARAMETER
    ring = gpu.fe.queues[0].desc_gpa
    assert gpu.err(ResourceAttachBacking(hdr(A), 20, MemEntries.of([(ring, 4096)]))) == \
        E.RESP_ERR_INVALID_PARAMETER
    b = gpu.backing(16 * 16 * 4)
    gpu.ok(ResourceAttachBacking(hdr(A), 20, b.entries))
    assert gpu.err(ResourceAttachBacking(hdr(A), 20, b.entries)) == E.RESP_ERR_INVALID_PARAMETER
    gpu.ok(ResourceDetachBacking(hdr(E.CMD_RESOURCE_DETACH_BACKING), 20))
    assert gpu.err(ResourceDetachBacking(hdr(E.CMD_RESOURCE_DETACH_BACKING), 20)) == E.RESP_ERR_INVALID_PARAMETER
    assert gpu.err(ResourceDetachBacking(hdr(E.CMD_RESOURCE_DETACH_BACKING), 21)) == E.RESP_ERR_INVALID_RESOURCE_ID
    # Without backing a transfer fails.
    assert gpu.err(TransferToHost2D(hdr(E.CMD_TRANSFER_TO_HOST_2D), Rect(0, 0, 16, 16), 0, 20)) == \
        E.RESP_ERR_UNSPEC


def test_transfer_and_scanout_bounds(gpu: Session) -> None:
    T = E.CMD_TRANSFER_TO_HOST_2D
    gpu.image_2d(30, 64, 64)
    for r in (Rect(0, 0, 65, 1), Rect(60, 0, 5, 1), Rect(0, 64, 1, 1), Rect(0xFFFFFFFF, 0, 2, 1),
              Rect(1, 1, 0xFFFFFFFF, 1), Rect(0, 0xFFFFFFF0, 1, 0x20)):
        assert gpu.err(TransferToHost2D(hdr(T), r, 0, 30)) == E.RESP_ERR_INVALID_PARAMETER, r
    # offset + span past the backing
    assert gpu.err(TransferToHost2D(hdr(T), Rect(0, 0, 64, 64), 4, 30)) == E.RESP_ERR_INVALID_PARAMETER
    assert gpu.err(TransferToHost2D(hdr(T), Rect(0, 0, 1, 1), 0xFFFFFFFFFFFFFF00, 30)) == \
        E.RESP_ERR_INVALID_PARAMETER
    SS = E.CMD_SET_SCANOUT
    assert gpu.err(SetScanout(hdr(SS), Rect(0, 0, 8, 8), 2, 30)) == E.RESP_ERR_INVALID_SCANOUT_ID
    assert gpu.err(SetScanout(hdr(SS), Rect(0, 0, 8, 8), 0, 31)) == E.RESP_ERR_INVALID_RESOURCE_ID
    assert gpu.err(SetScanout(hdr(SS), Rect(0, 0, 65, 8), 0, 30)) == E.RESP_ERR_INVALID_PARAMETER
    assert gpu.err(SetScanout(hdr(SS), Rect(60, 0, 8, 8), 0, 30)) == E.RESP_ERR_INVALID_PARAMETER
    gpu.ok(SetScanout(hdr(SS), Rect(0, 0, 0, 0), 0, 0))  # resource 0 disables
    assert gpu.err(ResourceFlush(hdr(E.CMD_RESOURCE_FLUSH), Rect(0, 0, 1, 1), 32)) == E.RESP_ERR_INVALID_RESOURCE_ID
    assert gpu.err(ResourceFlush(hdr(E.CMD_RESOURCE_FLUSH), Rect(0, 0, 65, 1), 30)) == E.RESP_ERR_INVALID_PARAMETER


def test_limits_refuse_without_allocating(gpu: Session, vgpu: BackendProcess) -> None:
    # 64 MiB of host memory: a 4096x4096 image (64 MiB) fits exactly once.
    gpu.ok(ResourceCreate2D(hdr(C2D), 40, X, 4096, 4096))
    assert gpu.err(ResourceCreate2D(hdr(C2D), 41, X, 16, 16)) == E.RESP_ERR_OUT_OF_MEMORY
    assert gpu.err(ResourceCreate2D(hdr(C2D), 42, X, 16384, 16384)) == E.RESP_ERR_OUT_OF_MEMORY
    gpu.ok(ResourceUnref(hdr(E.CMD_RESOURCE_UNREF), 40))
    gpu.ok(ResourceCreate2D(hdr(C2D), 41, X, 16, 16))
    # 64 resources at most.
    for rid in range(100, 163):
        gpu.ok(ResourceCreate2D(hdr(C2D), rid, X, 1, 1))
    assert gpu.err(ResourceCreate2D(hdr(C2D), 200, X, 1, 1)) == E.RESP_ERR_OUT_OF_MEMORY
    assert vgpu.alive()


def test_everything_is_released_after_disconnect(vgpu: BackendProcess) -> None:
    baseline = fd_count(vgpu.pid)
    for _ in range(3):
        g = Session.open(vgpu.socket_path, display=make_display())
        g.image_2d(1, 256, 256, X, pattern(256, 256))
        g.show(1, 0, Rect(0, 0, 256, 256))
        g.flush(1, Rect(0, 0, 256, 256))
        g.close()
    assert wait_until(lambda: fd_count(vgpu.pid) == baseline), fd_count(vgpu.pid)
