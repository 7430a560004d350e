"""Guest memory removed while resources still use it, driven by our front end (spec/memory-hotplug.md).

A cooperative Linux guest never lets QEMU remove memory that holds GPU buffers (tests/e2e/test_hotplug.py shows
the guest refusing the eject), but a front end may send REM_MEM_REG whenever it likes — a guest that ejects
without offlining, a buggy VMM. Our rule: the back end logs which resources lost memory, releases the region's
one fd at once, answers the next command that needs those bytes with RESP_ERR_INVALID_PARAMETER (never a read of
the removed mapping), keeps serving everything else, and lets the resource work again if memory comes back at
the same guest addresses.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import start_backend
from vgpu.conformance.process import BackendProcess
from vgpu.procfs import fd_count, open_fds, wait_until
from vgpu.protocol import (
    BlobMem,
    CtrlType,
    Format,
    MemEntries,
    Rect,
    ResourceAttachBacking,
    ResourceCreate2D,
    ResourceCreateBlob,
    ResourceDetachBacking,
    ResourceFlush,
    ResourceUnref,
    TransferToHost2D,
)
from vgpu.session import PAGE, Backing, Session, hdr, make_display, pattern, rtype, scanout_blob, updates
from vgpu.vhost_user.driver import GuestRam

E = CtrlType
GUEST = BlobMem.BLOB_MEM_GUEST
HOT_GPA = 0x1_0000_0000
HOT_SIZE = 4 << 20
HOT_UVA = 0x7A00_0000_0000  # any user address clear of the main RAM's; the back end only translates through it
W, H = 64, 32


@pytest.fixture
def vgpu(tmp_path: Path) -> Iterator[BackendProcess]:
    b = start_backend([sys.executable, "-m", "vgpu", "--scanouts=2", "--log-level=info"], tmp_path, "vgpu")
    yield b
    b.stop()


def memfds(b: BackendProcess, name: str) -> int:
    return sum(1 for target in open_fds(b.pid) if f"memfd:{name} " in target + " ")


def hot_backing(ram: GuestRam, size: int) -> Backing:
    """Pages of the plugged memory, scattered in reverse order."""
    pages = [ram.alloc(PAGE, PAGE) for _ in range((size + PAGE - 1) // PAGE)]
    return Backing([(p, PAGE) for p in pages[::-1]], size)


def write(ram: GuestRam, b: Backing, data: bytes) -> None:
    for i, (page, _) in enumerate(b.ranges):
        ram.write(page, data[i * PAGE:(i + 1) * PAGE])


def plug(g: Session, ram: GuestRam) -> None:
    g.fe.add_mem_reg(HOT_GPA, ram.size, HOT_UVA, 0, ram.fd)


def transfer(g: Session, rid: int) -> int:
    return rtype(g.cmd(TransferToHost2D(hdr(E.CMD_TRANSFER_TO_HOST_2D), Rect(0, 0, W, H), 0, rid)))


def flush(g: Session, rid: int) -> int:
    return rtype(g.cmd(ResourceFlush(hdr(E.CMD_RESOURCE_FLUSH), Rect(0, 0, W, H), rid)))


def test_removed_memory_under_live_resources(vgpu: BackendProcess) -> None:
    idle = fd_count(vgpu.pid)
    g = Session.open(vgpu.socket_path, display=make_display())
    hot = GuestRam(HOT_SIZE, gpa_base=HOT_GPA, name="vgpu-hotplug")
    try:
        plug(g, hot)
        assert memfds(vgpu, "vgpu-hotplug") == 1
        plugged = fd_count(vgpu.pid)
        px = pattern(W, H)
        # Resource 1: a 2D image whose backing is the plugged memory; resource 2: one in boot memory.
        g.ok(ResourceCreate2D(hdr(E.CMD_RESOURCE_CREATE_2D), 1, Format.FORMAT_B8G8R8X8_UNORM, W, H))
        b1 = hot_backing(hot, W * H * 4)
        g.ok(ResourceAttachBacking(hdr(E.CMD_RESOURCE_ATTACH_BACKING), 1, b1.entries))
        write(hot, b1, px.tobytes())
        g.image_2d(2, W, H, pixels=pattern(W, H, seed=9))
        # Resource 3: a guest blob in the plugged memory, shown on scanout 1 (its pixels are read at every flush).
        b3 = hot_backing(hot, W * H * 4)
        g.ok(ResourceCreateBlob(hdr(E.CMD_RESOURCE_CREATE_BLOB), 3, GUEST, 0, 0, W * H * 4, b3.entries))
        write(hot, b3, px.tobytes())
        g.ok(scanout_blob(3, W, H, W * 4, scanout=1))
        assert transfer(g, 1) == E.RESP_OK_NODATA and flush(g, 3) == E.RESP_OK_NODATA
        ((_, shown),) = updates(g, 1)
        assert np.array_equal(np.frombuffer(shown, np.uint8).reshape(H, W, 4)[..., :3], px[..., :3])

        mark = len(vgpu.log())
        g.fe.rem_mem_reg(HOT_GPA, hot.size, HOT_UVA)
        # The region's one fd is released at once (nothing in flight pins it), and the log names what it stranded.
        assert wait_until(lambda: memfds(vgpu, "vgpu-hotplug") == 0), open_fds(vgpu.pid)
        assert fd_count(vgpu.pid) == plugged - 1
        assert wait_until(lambda: "guest memory removed" in vgpu.log()[mark:])
        warning = next(line for line in vgpu.log()[mark:].splitlines() if "guest memory removed" in line)
        assert f"gpa {HOT_GPA:#x} +{HOT_SIZE:#x}" in warning and "resources 1, 3" in warning, warning

        # Commands that need the removed bytes are refused; nothing reads the old mapping.
        assert transfer(g, 1) == E.RESP_ERR_INVALID_PARAMETER
        assert flush(g, 3) == E.RESP_ERR_INVALID_PARAMETER
        # Everything else keeps working; new backing in the removed range is refused when attached.
        assert transfer(g, 2) == E.RESP_OK_NODATA
        entries_gone = MemEntries.of([(HOT_GPA, PAGE)])
        g.ok(ResourceCreate2D(hdr(E.CMD_RESOURCE_CREATE_2D), 4, Format.FORMAT_B8G8R8X8_UNORM, 32, 32))
        assert rtype(g.cmd(ResourceAttachBacking(hdr(E.CMD_RESOURCE_ATTACH_BACKING), 4, entries_gone))) \
            == E.RESP_ERR_INVALID_PARAMETER

        # Memory comes back at the same guest addresses (a new memfd): resource 1 works again, from the new pages.
        again = GuestRam(HOT_SIZE, gpa_base=HOT_GPA, name="vgpu-hotplug2")
        try:
            plug(g, again)
            px2 = pattern(W, H, seed=77)
            write(again, b1, px2.tobytes())
            assert transfer(g, 1) == E.RESP_OK_NODATA
            write(again, b3, px2.tobytes())
            assert flush(g, 3) == E.RESP_OK_NODATA
            (_, (_, shown2)) = updates(g, 2)
            assert np.array_equal(np.frombuffer(shown2, np.uint8).reshape(H, W, 4)[..., :3], px2[..., :3])
            g.fe.rem_mem_reg(HOT_GPA, again.size, HOT_UVA)
        finally:
            again.close()
        g.ok(ResourceDetachBacking(hdr(E.CMD_RESOURCE_DETACH_BACKING), 1))
        for rid in (1, 2, 3, 4):
            g.ok(ResourceUnref(hdr(E.CMD_RESOURCE_UNREF), rid))
        assert vgpu.alive()
    finally:
        g.close()
        hot.close()
    assert vgpu.settle_fds(idle) == idle, open_fds(vgpu.pid)
