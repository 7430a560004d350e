"""The main job, as far as it reaches today: start the vgpu back end, drive it with our own front end the way QEMU
does, and show what was negotiated and one command round trip.  (Once host-visible blobs land this boots a real
guest and shows the mapped blob with its map_info and provenance.)"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from vgpu.protocol import CtrlFlag, CtrlHdr, CtrlType, GetDisplayInfo, GpuFeature, encode_command, structs
from vgpu.vhost_user.driver import GuestRam
from vgpu.vhost_user.frontend import Frontend
from vgpu.vhost_user.wire import ProtocolFeature


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        sock = os.path.join(d, "vgpu.sock")
        backend = subprocess.Popen([sys.executable, "-m", "vgpu", f"--socket-path={sock}", "--log-level=warning"])
        try:
            fe = Frontend.connect(sock)
            fe.negotiate(device_features=GpuFeature.F_EDID.mask)
            gpu = [f.name for f in GpuFeature if fe.features & f.mask]
            proto = [f.name for f in ProtocolFeature if fe.protocol_features & (1 << f)]
            print(f"back end      : vhost-user-vgpu (pid {backend.pid}) on {sock}")
            print(f"virtio        : features {fe.features:#x}; virtio-gpu {' '.join(gpu) or '-'}")
            print(f"protocol      : {' '.join(proto)}")
            cfg = structs.config.parse(fe.get_config(0, 16))
            print(f"config space  : num_scanouts={cfg.num_scanouts} num_capsets={cfg.num_capsets}")
            ram = GuestRam(16 << 20)
            fe.share_memory(ram)
            fe.setup_queue(0, 256)
            fe.setup_queue(1, 256)
            req = encode_command(GetDisplayInfo(CtrlHdr(CtrlType.CMD_GET_DISPLAY_INFO, CtrlFlag.FLAG_FENCE, 1)))
            t0 = time.perf_counter()
            raw = fe.submit(0, req, structs.resp_display_info.sizeof())
            dt = time.perf_counter() - t0
            resp = structs.resp_display_info.parse(raw)
            m = resp.pmodes[0]
            print(
                f"round trip    : GET_DISPLAY_INFO (fenced, id 1) -> {CtrlType(resp.hdr.type).name} "
                f"fence {resp.hdr.fence_id}, scanout 0 {m.r.width}x{m.r.height} enabled={m.enabled} "
                f"in {dt * 1e3:.2f} ms"
            )
            fe.close()
            ram.close()
        finally:
            backend.terminate()
            backend.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
