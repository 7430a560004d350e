"""The main job: a real Linux guest maps a host-visible blob from the vgpu back end, and we show what it got.

QEMU 11.1 boots the Debian 6.12 guest (TCG) against `vhost-user-vgpu --context-types=cross-domain`; the guest
program asks the cross-domain context for a 256x256 XRGB8888 buffer, creates the HOST3D blob, maps it and writes a
pattern; the host finds that pattern in the back end's buffer and writes one back for the guest to read.  Printed:
the map_info the guest was told, why (provenance), the memory type the guest kernel then used (its PAT list), the
round trip, that the back end released everything, and last what the back end's status query (`vgpu-status`)
showed while the guest held the mapping.  Exit status 0 only if every one of those holds.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from vgpu.status import header_lines, mapping_lines, quota_lines, resource_line
from vgpu_lab.hostblob import PAT_TYPE, HostBlobRun, run_host_blob
from vgpu_lab.provision import Provisioner

NAMES = {1: "CACHED", 2: "UNCACHED", 3: "WC"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--allocator", default="auto", help="host buffer allocator for the back end (default auto)")
    p.add_argument("--cache-rules", type=Path, help="operator rules file passed to the back end")
    p.add_argument("--size", default="256x256", help="image size the guest asks for (WxH)")
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    backend_args = [f"--allocator={args.allocator}"]
    if args.cache_rules:
        backend_args.append(f"--cache-rules={args.cache_rules.resolve()}")
    prov = Provisioner()
    q11, kernel = prov.qemu11(), prov.guest_kernel()
    with tempfile.TemporaryDirectory(prefix="vgpu-demo-") as d:
        run = run_host_blob(prov, Path(d), backend_args=tuple(backend_args), width=width, height=height)
    steps = run.steps
    features = re.search(r"\[drm\] features: (.*)", run.guest.dmesg)
    allocator = re.search(r"allocator (\S+);", run.backend_output)
    reqs = re.search(r"stride=(\d+) size=(\d+) blob_id=(\d+) map_info=(\d+)", steps.get("reqs", ""))
    m = run.map_log
    print("vgpu main job: a real Linux guest maps a host-visible blob from the vgpu back end\n")
    print(f"back end    : vhost-user-vgpu --context-types=cross-domain {' '.join(backend_args)}"
          f" (allocator in use: {allocator.group(1) if allocator else '?'})")
    print(f"VMM         : QEMU {q11.version} (sid chroot), -device vhost-user-test-device-pci, TCG")
    print(f"guest       : Linux {kernel.release}; [drm] features: {features.group(1).strip() if features else '?'}")
    window = run.window
    if window:
        print(f"window      : host-visible region at {window[0]:#x}, {window[1] >> 20} MiB")
    ok = not run.guest.timed_out and run.guest.returncode == 0 and run.guest.guest_status == 0
    if reqs:
        print(f"buffer      : {width}x{height} XR24, stride {reqs[1]}, {reqs[2]} bytes, blob_id {reqs[3]}, "
              f"map_info {reqs[4]} ({NAMES.get(int(reqs[4]), '?')}) in the image requirements")
    if m is None or window is None:
        print("mapping     : none — the guest did not map the blob")
        print(run.describe()[-3000:])
        return 1
    offset, length, attr = int(m[2], 16), int(m[3], 16), m[4]
    print(f"mapping     : blob {m[1]} at window offset {offset:#x}, {length} bytes -> RESP_OK_MAP_INFO {attr}")
    print(f"provenance  : {m[5]}")
    start = window[0] + offset
    pat = {t for a, b, t in run.pat if a <= start and start + length <= b}
    want = PAT_TYPE[{v: k for k, v in NAMES.items()}[attr]]
    pat_ok = pat == {want}
    print(f"guest PAT   : [{start:#x}, +{length:#x}) {', '.join(sorted(pat)) or 'not listed'}"
          f" ({'matches' if pat_ok else 'DOES NOT match'} {attr}: {want})")
    guest_read = steps.get("host", "").startswith("ok")
    host_ok = run.host.saw_guest_pattern and guest_read
    print(f"round trip  : guest's pattern in the back end's buffer ({run.host.buffer or '?'}): "
          f"{'yes' if run.host.saw_guest_pattern else 'no'}; host's pattern read by the guest: "
          f"{'yes' if guest_read else 'no'}{'  ' + run.host.error if run.host.error else ''}")
    print(f"teardown    : {'unmapped' if 'unmapped blob' in run.backend_output else 'NOT unmapped'}; back end "
          f"back to its idle fds: {'yes' if run.released else 'no'}")
    print(f"time        : {run.wall:.1f} s from QEMU start to guest poweroff")
    status_ok = show_status(run)
    good = ok and pat_ok and host_ok and run.released and status_ok
    if not good:
        print("\nsomething did not hold; the guest's serial log and the back end's log follow:\n")
        print(run.describe()[-4000:])
    return 0 if good else 1


def show_status(run: HostBlobRun) -> bool:
    """The operator's view: `vgpu-status` on the back end's status socket while the guest held the mapping, in
    its text form (the mapped blob's lines).  True if it shows the mapping the log describes."""
    doc, sm, m = run.host.status, run.status_mapping, run.map_log
    if doc is None or sm is None or m is None:
        print(f"status      : no mapping in the status query: {run.host.status_error or doc}")
        return False
    print("status      : vgpu-status while the guest held the mapping:")
    rid = sm["resource_id"]
    lines = header_lines(doc)[:1] + quota_lines(doc)[:1]
    lines += [resource_line(r) for r in doc["device"]["resources"] if r["id"] == rid] + mapping_lines(sm)
    for line in lines:
        print(f"    {line}")
    return (sm["offset"], sm["map_info_name"], f"{sm['provenance']}: {sm['detail']}") == (int(m[2], 16), m[4], m[5])


if __name__ == "__main__":
    sys.exit(main())
