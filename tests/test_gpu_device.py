"""The GPU device's first commands through a real back-end process: display info, EDID, config space, and the one
error boundary (unknown, short and feature-gated commands) with the header echo rules."""

from __future__ import annotations

import struct

import pytest

from vgpu.conformance.process import BackendProcess
from vgpu.procfs import wait_until
from vgpu.protocol import (
    CtrlFlag,
    CtrlHdr,
    CtrlType,
    DisplayOne,
    GetDisplayInfo,
    GetEdid,
    GpuFeature,
    Rect,
    build_edid,
    encode_command,
    responses,
)
from vgpu.protocol import structs as s
from vgpu.protocol.edid import edid_checksum, parse_dtd
from vgpu.session import Session
from vgpu.vhost_user.frontend import Display, FrontendError

pytestmark = pytest.mark.vgpu("--scanouts=2", "--resolution=1024x768")


def test_config_space(gpu: Session) -> None:
    cfg = s.config.parse(gpu.fe.get_config(0, 16))
    assert (cfg.events_read, cfg.num_scanouts, cfg.num_capsets) == (0, 2, 0)
    with pytest.raises(FrontendError):
        gpu.fe.set_config(8, b"\x05\x00\x00\x00")  # num_scanouts is read-only
    gpu.fe.set_config(4, b"\x01\x00\x00\x00")  # events_clear is writable


def test_display_info_defaults_and_fence_echo(gpu: Session) -> None:
    hdr = CtrlHdr(CtrlType.CMD_GET_DISPLAY_INFO, CtrlFlag.FLAG_FENCE, fence_id=0xDEADBEEF, ctx_id=3)
    resp = s.resp_display_info.parse(gpu.cmd(encode_command(GetDisplayInfo(hdr)), 408))
    assert resp.hdr.type == CtrlType.RESP_OK_DISPLAY_INFO
    assert (resp.hdr.flags, resp.hdr.fence_id, resp.hdr.ctx_id) == (1, 0xDEADBEEF, 3)
    assert (resp.pmodes[0].r.width, resp.pmodes[0].r.height, resp.pmodes[0].enabled) == (1024, 768, 1)
    assert resp.pmodes[1].enabled == 0
    assert all(m.r.width == 0 and m.enabled == 0 for m in resp.pmodes[2:])


def test_display_info_from_the_front_ends_display(gpu: Session) -> None:
    gpu.fe.set_display(Display(lambda: responses.display_info(CtrlHdr(0), [DisplayOne(Rect(0, 0, 1920, 1080),
                                                                                     True)])))
    resp = s.resp_display_info.parse(gpu.cmd(encode_command(GetDisplayInfo(CtrlHdr(
        CtrlType.CMD_GET_DISPLAY_INFO))), 408))
    assert (resp.pmodes[0].r.width, resp.pmodes[0].r.height) == (1920, 1080)


def test_edid_is_valid_for_each_scanout(gpu: Session) -> None:
    for scanout in (0, 1):
        resp = s.resp_edid.parse(gpu.cmd(encode_command(GetEdid(CtrlHdr(CtrlType.CMD_GET_EDID), scanout)), 1056))
        assert resp.hdr.type == CtrlType.RESP_OK_EDID and resp.size == 128
        block = bytes(resp.edid[:128])
        assert block[:8] == bytes.fromhex("00ffffffffffff00")
        assert sum(block) % 256 == 0 and edid_checksum(block) == block[127]
        assert parse_dtd(block[54:72])[:2] == (1024, 768)
    bad = gpu.cmd(encode_command(GetEdid(CtrlHdr(CtrlType.CMD_GET_EDID), 2)), 1056)
    assert struct.unpack_from("<I", bad)[0] == CtrlType.RESP_ERR_INVALID_SCANOUT_ID


def test_unknown_and_short_commands(gpu: Session) -> None:
    unknown = gpu.cmd(struct.pack("<IIQIB3x", 0x0999, 1, 5, 0, 0), 24)
    assert struct.unpack_from("<IIQ", unknown) == (CtrlType.RESP_ERR_UNSPEC, 1, 5)
    short = gpu.cmd(struct.pack("<IIQIB3x", CtrlType.CMD_RESOURCE_CREATE_2D, 0, 0, 0, 0), 24)
    assert struct.unpack_from("<I", short)[0] == CtrlType.RESP_ERR_INVALID_PARAMETER
    tiny = gpu.cmd(b"\x00\x01", 24)
    assert struct.unpack_from("<I", tiny)[0] == CtrlType.RESP_ERR_INVALID_PARAMETER


def test_response_buffer_smaller_than_the_response(gpu: Session) -> None:
    out = gpu.cmd(encode_command(GetDisplayInfo(CtrlHdr(CtrlType.CMD_GET_DISPLAY_INFO))), 30)
    assert len(out) == 30 and struct.unpack_from("<I", out)[0] == CtrlType.RESP_OK_DISPLAY_INFO
    # and the device still answers properly afterwards
    assert len(gpu.cmd(encode_command(GetDisplayInfo(CtrlHdr(CtrlType.CMD_GET_DISPLAY_INFO))), 408)) == 408


def test_edid_needs_the_feature(vgpu: BackendProcess) -> None:
    g = Session.open(vgpu.socket_path, features=0)
    try:
        assert not g.fe.features & GpuFeature.F_EDID.mask
        out = g.cmd(encode_command(GetEdid(CtrlHdr(CtrlType.CMD_GET_EDID), 0)), 1056)
        assert struct.unpack_from("<I", out)[0] == CtrlType.RESP_ERR_UNSPEC
    finally:
        g.close()


def test_capsets_and_3d_commands_without_a_context_type(gpu: Session) -> None:
    from vgpu.protocol import CtxCreate, GetCapset, GetCapsetInfo

    out = gpu.cmd(encode_command(GetCapsetInfo(CtrlHdr(CtrlType.CMD_GET_CAPSET_INFO), 0)), 40)
    assert struct.unpack_from("<I", out)[0] == CtrlType.RESP_ERR_INVALID_PARAMETER
    out = gpu.cmd(encode_command(GetCapset(CtrlHdr(CtrlType.CMD_GET_CAPSET), 5, 0)), 40)
    assert struct.unpack_from("<I", out)[0] == CtrlType.RESP_ERR_INVALID_PARAMETER
    out = gpu.cmd(encode_command(CtxCreate(CtrlHdr(CtrlType.CMD_CTX_CREATE, ctx_id=1), 1, 5, b"x")), 24)
    assert struct.unpack_from("<I", out)[0] == CtrlType.RESP_ERR_UNSPEC


def test_the_front_ends_edid_wins(gpu: Session) -> None:
    theirs = build_edid(2560, 1440, serial=77)
    gpu.fe.set_display(Display(
        lambda: responses.display_info(CtrlHdr(0), [DisplayOne(Rect(0, 0, 2560, 1440), True)]),
        lambda scanout: responses.edid(CtrlHdr(0), theirs)))
    resp = s.resp_edid.parse(gpu.cmd(encode_command(GetEdid(CtrlHdr(CtrlType.CMD_GET_EDID), 0)), 1056))
    assert bytes(resp.edid[:resp.size]) == theirs


def test_a_new_display_layout_raises_the_display_event(gpu: Session) -> None:
    gpu.cmd(encode_command(GetDisplayInfo(CtrlHdr(CtrlType.CMD_GET_DISPLAY_INFO))), 408)
    assert gpu.fe.config_changes == 0
    gpu.fe.set_display(Display(lambda: responses.display_info(CtrlHdr(0), [DisplayOne(Rect(0, 0, 800, 600),
                                                                                     True)])))
    assert wait_until(lambda: gpu.fe.config_changes == 1)
    assert s.config.parse(gpu.fe.get_config(0, 16)).events_read == 1
    gpu.fe.set_config(4, b"\x01\x00\x00\x00")
    assert s.config.parse(gpu.fe.get_config(0, 16)).events_read == 0
    resp = s.resp_display_info.parse(gpu.cmd(encode_command(GetDisplayInfo(CtrlHdr(
        CtrlType.CMD_GET_DISPLAY_INFO))), 408))
    assert (resp.pmodes[0].r.width, resp.pmodes[0].r.height) == (800, 600)
