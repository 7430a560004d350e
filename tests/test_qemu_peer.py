"""Our front end brings QEMU's own C back end (`/usr/lib/qemu/vhost-user-gpu`) through negotiation, the memory
table, ring set-up, the display socket and a GET_DISPLAY_INFO round trip: proof that the front end speaks the
protocol as QEMU does, which is what lets benchmarks and conformance runs compare us against it."""

from __future__ import annotations

from vgpu.conformance.process import BackendProcess
from vgpu.protocol import CtrlHdr, CtrlType, DisplayOne, GetDisplayInfo, GpuFeature, Rect, encode_command, responses
from vgpu.protocol import structs as s
from vgpu.vhost_user.driver import GuestRam
from vgpu.vhost_user.frontend import Display, Frontend
from vgpu.vhost_user.wire import GpuRequest, ProtocolFeature


def test_get_display_info_round_trip_through_qemus_backend(qemu_gpu_backend: BackendProcess) -> None:
    fe = Frontend.connect(qemu_gpu_backend.socket_path)
    ram = GuestRam(16 << 20)
    display = Display(
        display_info=lambda: responses.display_info(
            CtrlHdr(0), [DisplayOne(Rect(0, 0, 1024, 768), True), DisplayOne(Rect(1024, 0, 800, 600), True)]),
    )
    try:
        fe.negotiate(device_features=GpuFeature.F_EDID.mask)
        assert fe.has(ProtocolFeature.REPLY_ACK) and fe.has(ProtocolFeature.CONFIG)
        cfg = s.config.parse(fe.get_config(0, 16))
        # QEMU's vhost-user-gpu front end overrides num_scanouts and the events fields ("managed by qemu"), so
        # its C back end leaves them 0: a generic front end (vhost-user-test-device) would show the guest 0.
        assert (cfg.events_read, cfg.num_scanouts) == (0, 0)
        fe.share_memory(ram)
        fe.setup_queue(0, 256)
        fe.setup_queue(1, 256)
        fe.set_display(display)
        req = encode_command(GetDisplayInfo(CtrlHdr(CtrlType.CMD_GET_DISPLAY_INFO)))
        raw = fe.submit(0, req, s.resp_display_info.sizeof())
        resp = s.resp_display_info.parse(raw)
        assert resp.hdr.type == CtrlType.RESP_OK_DISPLAY_INFO
        assert (resp.pmodes[0].r.width, resp.pmodes[0].r.height, resp.pmodes[0].enabled) == (1024, 768, 1)
        asked = [e.request for e in display.events]
        assert asked[:3] == [GpuRequest.GET_PROTOCOL_FEATURES, GpuRequest.SET_PROTOCOL_FEATURES,
                             GpuRequest.GET_DISPLAY_INFO]
        assert fe.get_vring_base(0) == 1
    finally:
        fe.close()
        ram.close()
    assert qemu_gpu_backend.alive() or qemu_gpu_backend.process.returncode == 0
