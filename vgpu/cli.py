"""`vhost-user-vgpu`: the back-end program QEMU (or crosvm) launches, following vhost-user's "Backend program
conventions": --socket-path or --fd (never both), --print-capabilities, no daemonizing, prompt exit on SIGTERM."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

from .gpu.config import GpuConfig
from .gpu.device import GpuDevice
from .gpu.resources import Limits
from .vhost_user.backend import StopSignal, serve, serve_connection
from .vhost_user.device import Device

log = logging.getLogger("vgpu")

# Neither "virgl" nor "render-node": we do not run virglrenderer and need no render node.  The list says what a
# management tool may pass us, so it is honest rather than aspirational.
CAPABILITIES: dict[str, object] = {"type": "gpu", "features": []}


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhost-user-vgpu", description=__doc__)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", help="listen on this Unix socket (serves one VMM at a time)")
    where.add_argument("--fd", type=int, metavar="FDNUM", help="serve this already-connected socket, then exit")
    p.add_argument("--print-capabilities", action="store_true", help="print the capabilities JSON and exit")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--scanouts", type=int, default=1, help="number of scanouts (1..16)")
    p.add_argument("--resolution", type=_size, default=(1280, 800), metavar="WxH",
                   help="display size when the VMM gives none")
    p.add_argument("--no-edid", action="store_true", help="do not offer VIRTIO_GPU_F_EDID")
    p.add_argument("--no-resource-uuid", action="store_true", help="do not offer VIRTIO_GPU_F_RESOURCE_UUID")
    p.add_argument("--no-blob", action="store_true", help="do not offer VIRTIO_GPU_F_RESOURCE_BLOB")
    p.add_argument("--scanout-png", type=Path, metavar="DIR",
                   help="write what each scanout shows to DIR/scanout-N.png on flush")
    p.add_argument("--png-rate", type=float, default=5.0, metavar="N", help="at most N pictures a second per scanout")
    p.add_argument("--png-history", action="store_true", help="also keep every picture, numbered")
    lim = p.add_argument_group("limits a guest cannot exceed")
    lim.add_argument("--max-resources", type=int, default=Limits.max_resources)
    lim.add_argument("--max-host-memory", type=_bytes, default=Limits.max_host_bytes, metavar="BYTES",
                     help="host memory for resource storage (suffixes K, M, G; default 1G)")
    lim.add_argument("--max-backing-entries", type=int, default=Limits.max_backing_entries,
                     help="scatter-list entries per resource")
    lim.add_argument("--max-contexts", type=int, default=Limits.max_contexts)
    return p


def _bytes(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 512M, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES, separators=(",", ":")))
        return 0
    if args.socket_path is None and args.fd is None:
        parser().error("one of --socket-path or --fd is required")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        limits = Limits(max_resources=args.max_resources, max_host_bytes=args.max_host_memory,
                        max_backing_entries=args.max_backing_entries, max_contexts=args.max_contexts)
        config = GpuConfig(num_scanouts=args.scanouts, width=args.resolution[0], height=args.resolution[1],
                           edid=not args.no_edid, resource_uuid=not args.no_resource_uuid, blob=not args.no_blob,
                           limits=limits, png_dir=args.scanout_png, png_rate=args.png_rate,
                           png_history=args.png_history)
    except ValueError as e:
        parser().error(str(e))

    def factory() -> Device:
        return GpuDevice(config)

    stop = StopSignal()
    try:
        if args.fd is not None:
            try:
                mode = os.fstat(args.fd).st_mode
            except OSError as e:
                log.error("--fd %d: %s", args.fd, e)
                return 1
            if not stat.S_ISSOCK(mode):
                log.error("--fd %d is not a socket", args.fd)
                return 1
            serve_connection(factory(), socket.socket(fileno=args.fd), stop.r)
            return 0
        path = args.socket_path
        if os.path.exists(path):
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                log.error("%s exists and is not a socket", path)
                return 1
            os.unlink(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as listener:
            listener.bind(path)
            listener.listen(1)
            log.info("listening on %s", path)
            try:
                serve(factory, listener, stop.r)
            finally:
                os.unlink(path)
        log.info("stopped")
        return 0
    finally:
        stop.close()


if __name__ == "__main__":
    sys.exit(main())
