"""A deliberately broken vgpu, for proving that conformance checks fail when a back end misbehaves.

`python -m tests.conformance_broken_vgpu --mode=MODE --socket-path=PATH` serves our GPU device with one fault:
`wrong-type` answers RESP_OK_NODATA successes as RESP_OK_DISPLAY_INFO, `drop-fence` answers fenced requests
without FLAG_FENCE and fence_id, `leak-fd` opens (and never closes) a file per command, `slow-exit` serves one
front end as QEMU's C back end does and then takes 1.5 s to exit (not a fault: the runner must cope), `none` is the
device as it is (the control that shows the same checks pass without the fault).
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import time

from vgpu.gpu.config import GpuConfig
from vgpu.gpu.device import GpuDevice
from vgpu.protocol import CtrlFlag, CtrlType
from vgpu.vhost_user.device import Device
from vgpu.vhost_user.server import StopSignal, serve, serve_connection

MODES = ("none", "wrong-type", "drop-fence", "leak-fd", "slow-exit")
#: How long `slow-exit` lingers after its front end left: longer than the conformance probe's 1 s wait.
SLOW_EXIT_S = 1.5


class DeliberatelyBrokenGpu(GpuDevice):
    def __init__(self, config: GpuConfig, mode: str) -> None:
        super().__init__(config)
        self.mode = mode
        self.leaked: list[int] = []

    def _execute(self, request: bytes | memoryview, cursor: bool) -> bytes:
        resp = bytearray(super()._execute(request, cursor))
        if self.mode == "wrong-type" and struct.unpack_from("<I", resp)[0] == CtrlType.RESP_OK_NODATA:
            struct.pack_into("<I", resp, 0, CtrlType.RESP_OK_DISPLAY_INFO)
        elif self.mode == "drop-fence":
            flags = struct.unpack_from("<I", resp, 4)[0]
            struct.pack_into("<IQ", resp, 4, flags & ~int(CtrlFlag.FLAG_FENCE), 0)
        elif self.mode == "leak-fd":
            self.leaked.append(os.open("/dev/null", os.O_RDONLY))  # the fault: never closed
        return bytes(resp)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--socket-path", required=True)
    args = p.parse_args()
    config = GpuConfig(num_scanouts=2)

    def factory() -> Device:
        return DeliberatelyBrokenGpu(config, args.mode)

    stop = StopSignal()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as listener:
            listener.bind(args.socket_path)
            listener.listen(1)
            try:
                if args.mode == "slow-exit":
                    # One front end, then no listener (a later connect is refused) and a slow exit.
                    conn, _ = listener.accept()
                    listener.close()
                    serve_connection(factory(), conn, stop.r)
                    time.sleep(SLOW_EXIT_S)
                else:
                    serve(factory, listener, stop.r)
            finally:
                os.unlink(args.socket_path)
    finally:
        stop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
