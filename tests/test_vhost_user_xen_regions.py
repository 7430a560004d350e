"""XEN_MMAP on a host without Xen: who offers it, the 40-byte region layout, and every Xen region a back end must
refuse before it asks a Xen driver anything — each answered with a failure ack, its fd closed, the back end still
serving.  (Real grant and foreign mappings are exercised inside a Xen dom0: tests/e2e/test_xen.py.)"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import start_backend
from vgpu.conformance.process import BackendProcess
from vgpu.procfs import fd_count
from vgpu.vhost_user.frontend import FRONTEND_PROTOCOL_FEATURES, Frontend, FrontendError
from vgpu.vhost_user.message import PeerClosed
from vgpu.vhost_user.wire import (
    XEN_MMAP_FLAG_FOREIGN,
    XEN_MMAP_FLAG_GRANT,
    XEN_MMAP_FLAG_MAP_ON_DEMAND,
    FrontendRequest,
    ProtocolFeature,
    SingleMemoryRegion,
    XenSingleMemoryRegion,
    bit,
)
from vgpu.vhost_user.xen_memory import GRANT_ADDR_BIT

XEN = bit(ProtocolFeature.XEN_MMAP)
MIB = 1 << 20


@pytest.fixture
def xen_backend(tmp_path: Path) -> Iterator[BackendProcess]:
    b = start_backend([sys.executable, "-m", "vgpu", "--xen-mmap=on", "--log-level=info"], tmp_path, "vgpu")
    yield b
    b.stop()


def _fe(b: BackendProcess) -> Frontend:
    fe = Frontend.connect(b.socket_path)
    fe.negotiate(protocol_features=FRONTEND_PROTOCOL_FEATURES | XEN)
    assert fe.has(ProtocolFeature.XEN_MMAP)
    return fe


def _region(gpa: int = GRANT_ADDR_BIT | 0x1000 << 12, size: int = MIB, flags: int = XEN_MMAP_FLAG_GRANT,
            domid: int = 1, mmap_offset: int = 0) -> dict[str, int]:
    return dict(guest_phys_addr=gpa, memory_size=size, userspace_addr=gpa & ~GRANT_ADDR_BIT, mmap_offset=mmap_offset,
                xen_mmap_flags=flags, domid=domid)


def _char_device() -> int:
    """A character device that is no Xen driver: what gets past the back end's own checks to the mapping."""
    return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)


def test_xen_mmap_is_offered_only_where_xen_is_or_when_asked(tmp_path: Path) -> None:
    auto = start_backend([sys.executable, "-m", "vgpu"], tmp_path, "auto")
    try:
        fe = Frontend.connect(auto.socket_path)
        try:
            fe.negotiate(protocol_features=FRONTEND_PROTOCOL_FEATURES | XEN)
            assert not fe.backend_protocol_features & XEN  # this host has no /dev/xen
        finally:
            fe.close()
    finally:
        auto.stop()


@pytest.mark.parametrize("region, reason", [
    (_region(flags=XEN_MMAP_FLAG_GRANT | 0x4), "unknown xen_mmap_flags bits 0x4"),
    (_region(flags=XEN_MMAP_FLAG_GRANT | XEN_MMAP_FLAG_FOREIGN), "exactly one of FOREIGN and GRANT"),
    (_region(flags=XEN_MMAP_FLAG_MAP_ON_DEMAND), "exactly one of FOREIGN and GRANT"),
    (_region(gpa=0x100000, flags=XEN_MMAP_FLAG_FOREIGN | XEN_MMAP_FLAG_MAP_ON_DEMAND), "foreign memory is mapped"),
    (_region(mmap_offset=0x1000), "a Xen mapping has no file offset"),
    (_region(size=MIB + 100), "is not whole pages"),
    (_region(gpa=GRANT_ADDR_BIT | 0x800), "is not whole pages"),
    (_region(domid=0x10000), "not a 16-bit domain id"),
    (_region(gpa=0x1000 << 12), "bit 63 (a grant address) unset"),
    (_region(gpa=GRANT_ADDR_BIT | (0xFFFFFFFF << 12)), "grant references past 32 bits"),
    (_region(gpa=1 << 52, flags=XEN_MMAP_FLAG_FOREIGN), "past the 52-bit physical address space"),
], ids=["unknown-bit", "both-kinds", "neither-kind", "foreign-on-demand", "offset", "partial-page",
        "unaligned", "domid", "grant-without-bit63", "refs-past-32-bits", "frames-past-52-bits"])
def test_a_xen_region_the_spec_does_not_allow_is_refused(xen_backend: BackendProcess, region: dict[str, int],
                                                         reason: str) -> None:
    b = xen_backend
    fe = _fe(b)
    fd = _char_device()
    try:
        idle = fd_count(b.pid)
        with pytest.raises(FrontendError, match="ADD_MEM_REG"):
            fe.request(FrontendRequest.ADD_MEM_REG, XenSingleMemoryRegion.build({"region": region}), fds=[fd],
                       need_reply=True)
        assert fd_count(b.pid) == idle  # the region's fd was closed, not kept
        assert reason in b.log(), b.log()[-2000:]
        # Still serving this front end: a plain file region (flags 0) in the Xen layout is mapped as ever.
        ram = os.memfd_create("plain", os.MFD_CLOEXEC)
        os.ftruncate(ram, MIB)
        try:
            plain = dict(guest_phys_addr=0, memory_size=MIB, userspace_addr=0x10000000, mmap_offset=0,
                         xen_mmap_flags=0, domid=0)
            fe.request(FrontendRequest.ADD_MEM_REG, XenSingleMemoryRegion.build({"region": plain}), fds=[ram],
                       need_reply=True)
        finally:
            os.close(ram)
    finally:
        fe.close()
        os.close(fd)


def test_a_file_that_is_no_xen_device_is_refused(xen_backend: BackendProcess) -> None:
    b = xen_backend
    fe = _fe(b)
    ram = os.memfd_create("not-a-driver", os.MFD_CLOEXEC)
    os.ftruncate(ram, MIB)
    try:
        idle = fd_count(b.pid)
        with pytest.raises(FrontendError, match="ADD_MEM_REG"):
            fe.request(FrontendRequest.ADD_MEM_REG, XenSingleMemoryRegion.build({"region": _region()}), fds=[ram],
                       need_reply=True)
        assert "the fd is not a Xen device" in b.log()
        assert fd_count(b.pid) == idle
    finally:
        fe.close()
        os.close(ram)


def test_a_driver_that_is_not_gntdev_fails_the_mapping_with_its_errno(xen_backend: BackendProcess) -> None:
    """Past the checks the back end asks the driver; /dev/null answers the gntdev ioctl with ENOTTY."""
    b = xen_backend
    fe = _fe(b)
    fd = _char_device()
    try:
        idle = fd_count(b.pid)
        for flags in (XEN_MMAP_FLAG_GRANT, XEN_MMAP_FLAG_FOREIGN):
            region = _region(flags=flags, gpa=GRANT_ADDR_BIT | 0x1000 << 12 if flags == XEN_MMAP_FLAG_GRANT
                             else 0x1000 << 12)
            with pytest.raises(FrontendError, match="ADD_MEM_REG"):
                fe.request(FrontendRequest.ADD_MEM_REG, XenSingleMemoryRegion.build({"region": region}), fds=[fd],
                           need_reply=True)
            assert fd_count(b.pid) == idle
        log = b.log()
        assert "Inappropriate ioctl for device" in log or "No such device" in log, log[-2000:]
        # An on-demand grant region maps nothing up front: it is accepted, and its fd held until removed.
        on_demand = _region(flags=XEN_MMAP_FLAG_GRANT | XEN_MMAP_FLAG_MAP_ON_DEMAND)
        fe.request(FrontendRequest.ADD_MEM_REG, XenSingleMemoryRegion.build({"region": on_demand}), fds=[fd],
                   need_reply=True)
        assert fd_count(b.pid) == idle + 1
        fe.request(FrontendRequest.REM_MEM_REG, XenSingleMemoryRegion.build({"region": on_demand}),
                   need_reply=True)
        assert b.settle_fds(idle) == idle
    finally:
        fe.close()
        os.close(fd)


def test_with_xen_mmap_a_32_byte_region_closes_the_connection(xen_backend: BackendProcess) -> None:
    """Once negotiated every region is 40 bytes: the old 32-byte layout is a protocol violation."""
    b = xen_backend
    fe = _fe(b)
    fd = _char_device()
    try:
        region = {k: v for k, v in _region().items() if k not in ("xen_mmap_flags", "domid")}
        fe.send(FrontendRequest.ADD_MEM_REG, SingleMemoryRegion.build({"region": region}), fds=[fd])
        with pytest.raises(PeerClosed):
            fe.recv(timeout=10)
        assert "payload of 40 bytes, expected 48" in b.log()
    finally:
        fe.close()
        os.close(fd)
