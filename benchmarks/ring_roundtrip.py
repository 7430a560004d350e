"""Ring round trips per second through the vhost-user transport, side by side in one run:

* our transport with a no-op device (chains completed with nothing written): the transport's own cost;
* our GPU device answering GET_DISPLAY_INFO with the front end's display socket, as QEMU's back end does;
* QEMU's C back end (`/usr/lib/qemu/vhost-user-gpu`) answering GET_DISPLAY_INFO through the same front end.

Batch 1 (publish, kick, wait for one completion) and batch 64 (publish 64, kick once, wait for all).
Prints ratios against QEMU's back end and writes benchmarks/results/ring_roundtrip.json."""

from __future__ import annotations

import argparse
import os
import sys

from benchmarks.common import Rate, backend, measure, write_result
from vgpu.protocol import CtrlHdr, CtrlType, DisplayOne, GetDisplayInfo, GpuFeature, Rect, encode_command, responses
from vgpu.vhost_user.driver import GuestRam
from vgpu.vhost_user.frontend import Display, Frontend

QEMU_BACKEND = "/usr/lib/qemu/vhost-user-gpu"
ECHO_NOOP = [sys.executable, "-m", "vgpu.vhost_user.examples.echo", "--noop"]
VGPU = [sys.executable, "-m", "vgpu", "--log-level=error"]
DISPLAY_INFO = encode_command(GetDisplayInfo(CtrlHdr(CtrlType.CMD_GET_DISPLAY_INFO)))
NOOP_REQUEST = bytes(24)


def _display() -> Display:
    return Display(lambda: responses.display_info(CtrlHdr(0), [DisplayOne(Rect(0, 0, 1280, 800), True)]),
                   lambda scanout: b"")


def run_against(sock: str, label: str, request: bytes, resp: int, seconds: float, display: bool) -> list[Rate]:
    fe = Frontend.connect(sock)
    ram = GuestRam(32 << 20)
    try:
        fe.negotiate(device_features=GpuFeature.F_EDID.mask)
        fe.share_memory(ram)
        fe.setup_queue(0, 256)
        fe.setup_queue(1, 256)
        if display:
            fe.set_display(_display())
        out = []
        for batch in (1, 64):
            reqs = [request] * batch

            def one_batch(reqs: list[bytes] = reqs) -> None:
                fe.submit_batch(0, reqs, resp)

            out.append(measure(label, batch, one_batch, seconds))
        return out
    finally:
        fe.close()
        ram.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=2.0, help="measuring time per case")
    p.add_argument("--quick", action="store_true", help="tiny run to check the benchmark works")
    args = p.parse_args(argv)
    seconds = 0.05 if args.quick else args.seconds
    rates: list[Rate] = []
    with backend(ECHO_NOOP) as sock:
        rates += run_against(sock, "vgpu transport, no-op device", NOOP_REQUEST, 0, seconds, False)
    with backend(VGPU) as sock:
        rates += run_against(sock, "vgpu GET_DISPLAY_INFO", DISPLAY_INFO, 408, seconds, True)
    have_qemu = os.path.exists(QEMU_BACKEND)
    if have_qemu:
        with backend([QEMU_BACKEND]) as sock:
            rates += run_against(sock, "QEMU C vhost-user-gpu GET_DISPLAY_INFO", DISPLAY_INFO, 408, seconds, True)
    print(f"{'case':<42} {'batch':>5} {'ops/s':>10} {'p50 us':>8} {'p99 us':>8}")
    for r in rates:
        print(f"{r.name:<42} {r.batch:>5} {r.ops_per_s:>10.0f} {r.p50_us:>8.1f} {r.p99_us:>8.1f}")
    ratios: dict[str, float] = {}
    if have_qemu:
        qemu = {r.batch: r for r in rates if r.name.startswith("QEMU")}
        for r in rates:
            if not r.name.startswith("QEMU"):
                key = f"{r.name} / QEMU, batch {r.batch}"
                ratios[key] = r.ops_per_s / qemu[r.batch].ops_per_s
                print(f"ratio  {key:<52} {ratios[key]:.2f}")
    else:
        print(f"ratio  not taken: {QEMU_BACKEND} is not installed (tools/test provisions it)")
    if not args.quick:
        path = write_result("ring_roundtrip", {"rates": rates, "ratios": ratios, "seconds_per_case": seconds})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
