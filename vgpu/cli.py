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
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .blob.allocators import AllocationError, open_allocator
from .blob.guest_arch import GuestArch, GuestResolver, host_guest_arch, parse_guest_arch
from .blob.resolve import Resolver
from .blob.rules import load_rules
from .blob.types import Allocator
from .display.sink import Sink
from .gpu import status as gpu_status
from .gpu.blobs import CONTEXT_TYPES
from .gpu.config import GpuConfig
from .gpu.device import GpuDevice
from .gpu.resources import Limits
from .vhost_user.control import ControlError, ControlServer
from .vhost_user.device import Device
from .vhost_user.polling import DEFAULT_MAX_US, MAX_POLL_US
from .vhost_user.server import Serving, StopSignal, serve, serve_connection
from .vhost_user.services import LoopService
from .vhost_user.shmem_bit import SHMEM_BITS

if TYPE_CHECKING:
    from .display.wayland import WaylandDisplay as WaylandSink
from .vhost_user.xen_memory import DEFAULT_MAX_GRANT_PAGES, MemoryPolicy, xen_present

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


def _poll_us(text: str) -> float:
    try:
        us = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected microseconds, got {text!r}") from None
    if not 0 <= us <= MAX_POLL_US:
        raise argparse.ArgumentTypeError(f"{us:g} us is outside 0..{MAX_POLL_US}")
    return us


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vhost-user-vgpu", description=__doc__)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", help="listen on this Unix socket (serves one VMM at a time)")
    where.add_argument("--fd", type=int, metavar="FDNUM", help="serve this already-connected socket, then exit")
    p.add_argument("--print-capabilities", action="store_true", help="print the capabilities JSON and exit")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--status-socket", metavar="PATH",
                   help="answer status queries (vgpu-status PATH) on this Unix socket, mode 0600")
    p.add_argument("--poll-max-us", type=_poll_us, default=DEFAULT_MAX_US, metavar="US",
                   help="look for the next request without sleeping for up to US microseconds, a window earned "
                        "only while requests come that close together (0: always sleep; default %(default)s)")
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
    p.add_argument("--display", type=_displays, default=("vmm",), metavar="LIST",
                   help="where scanouts are shown, comma-separated: vmm (the VMM's display socket, when it hands "
                        "one over; the default), wayland (a window per scanout on the host's Wayland compositor)")
    p.add_argument("--wayland-display", metavar="NAME",
                   help="the compositor's socket (default $WAYLAND_DISPLAY, else wayland-0, in $XDG_RUNTIME_DIR)")
    blobs = p.add_argument_group("blobs and host-visible memory")
    blobs.add_argument("--context-types", default="", metavar="LIST",
                       help="context types to offer, comma-separated: cross-domain (offering any also offers "
                            "VIRGL and CONTEXT_INIT, which the Linux guest needs for host blobs)")
    blobs.add_argument("--host-visible-size", type=_bytes, default=GpuConfig.host_visible_size, metavar="BYTES",
                       help="size of the host-visible region (shared-memory id 1); 0 offers none (default 1G)")
    blobs.add_argument("--allocator", default="auto",
                       help="host buffer allocator: auto, memfd, udmabuf, dma-heap or vgem (default auto)")
    blobs.add_argument("--cache-rules", type=Path, metavar="FILE",
                       help="TOML rules mapping exporter names to cached/wc/uncached")
    blobs.add_argument("--legacy-cache-heuristic", action="store_true",
                       help="allow virglrenderer's guess (exporter i915 cached, anything else WC) as a last resort")
    blobs.add_argument("--guest-arch", type=_guest_arch, default=None, metavar="ARCH",
                       help="the guest's CPU architecture, which decides what it makes of map_info: x86_64, aarch64 "
                            "(an UNCACHED buffer is sent as WC, since aarch64's uncached is Device memory) or other "
                            "(default: the host's, as under KVM)")
    blobs.add_argument("--shmem-feature-bit", type=int, choices=SHMEM_BITS, default=GpuConfig.shmem_feature_bit,
                       help="protocol-feature bit to offer SHMEM on: 22 (the spec; QEMU 11.1, crosvm since "
                            "2026-08) or 21 for front ends on rust-vmm vhost 0.16 (never QEMU 11.1: bit 21 is its "
                            "GPA_ADDRESSES)")
    blobs.add_argument("--map-changing-placement", action="store_true",
                       help="map buffers whose exporter says their attribute may change (a buffer it may move) WC, "
                            "non-cacheable in the guest whatever the placement, instead of refusing them")
    blobs.add_argument("--map-timeout", type=float, default=GpuConfig.map_timeout, metavar="SECONDS",
                       help="how long to wait for the VMM to ack a blob mapping")
    xen = p.add_argument_group("Xen (VHOST_USER_PROTOCOL_F_XEN_MMAP: guest memory as foreign frames or grants)")
    xen.add_argument("--xen-mmap", choices=["auto", "on", "off"], default="auto",
                     help="offer XEN_MMAP: auto = when /dev/xen/privcmd or /dev/xen/gntdev exists (default)")
    xen.add_argument("--max-grant-pages", type=int, default=DEFAULT_MAX_GRANT_PAGES, metavar="N",
                     help="grant pages a guest may have mapped at once through on-demand regions "
                          f"(default {DEFAULT_MAX_GRANT_PAGES})")
    lim = p.add_argument_group("limits a guest cannot exceed")
    lim.add_argument("--max-resources", type=int, default=Limits.max_resources)
    lim.add_argument("--max-host-memory", type=_bytes, default=Limits.max_host_bytes, metavar="BYTES",
                     help="host memory for resource storage (suffixes K, M, G; default 1G)")
    lim.add_argument("--max-backing-entries", type=int, default=Limits.max_backing_entries,
                     help="scatter-list entries per resource")
    lim.add_argument("--max-contexts", type=int, default=Limits.max_contexts)
    return p


DISPLAYS = ("vmm", "wayland")


def _displays(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in DISPLAYS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown display {', '.join(unknown) or text!r} (known: vmm, wayland)")
    return names


def _bytes(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 512M, got {text!r}") from None


def _guest_arch(text: str) -> GuestArch:
    try:
        return parse_guest_arch(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _context_type(name: str) -> int:
    try:
        return CONTEXT_TYPES[name.strip()]
    except KeyError:
        raise ValueError(f"unknown context type {name.strip()!r} (known: {', '.join(CONTEXT_TYPES)})") from None


#: Bumped when a field of the status document changes meaning or disappears (adding fields does not bump it).
STATUS_FORMAT = 1


def _status_answer(serving: Serving, config: GpuConfig, allocator: Allocator, args: argparse.Namespace,
                   sinks: Sequence[Sink] = ()) -> Callable[[Mapping[str, Any]], Mapping[str, object]]:
    """The answer to {"query": "status"}: the program's own facts, then the transport's and the device's."""
    started = time.monotonic()
    names: dict[int, str] = {int(capset): name for name, capset in CONTEXT_TYPES.items()}

    def answer(request: Mapping[str, Any]) -> Mapping[str, object]:
        query = request.get("query")
        if query != "status":
            raise ControlError(f"unknown query {query!r} (known: \"status\")")
        live = serving.status()
        device = live["device"]
        # The quotas are the device's use against the configured limits; with no VMM connected, nothing is used.
        quotas = device.pop("quotas") if isinstance(device, dict) else gpu_status.quotas(config.limits)
        return {
            "status_format": STATUS_FORMAT, "program": "vhost-user-vgpu", "version": __version__,
            "pid": os.getpid(), "uptime_s": round(time.monotonic() - started, 3),
            "socket_path": args.socket_path,
            "state": "connected" if live["vmm_connected"] else "idle",
            "allocator": allocator.name, "cache_rules": str(args.cache_rules) if args.cache_rules else None,
            "legacy_cache_heuristic": args.legacy_cache_heuristic,
            "guest_arch": _guest_arch_of(args).value,
            "map_changing_placement": args.map_changing_placement,
            "context_types": [names.get(c, str(c)) for c in config.context_types],
            "quotas": quotas, "displays": [dict(sink.status()) for sink in sinks], **live,
        }
    return answer


@contextmanager
def _listening(path: str, mode: int | None = None) -> Iterator[socket.socket]:
    """A Unix socket listening at `path` (a stale socket there is replaced), removed again on the way out.  With
    `mode`, the socket is created with it (umask around bind), so there is no moment at which others may connect."""
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise OSError(f"{path} exists and is not a socket")
        os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        old = os.umask(0o777 & ~mode) if mode is not None else None
        try:
            sock.bind(path)
        finally:
            if old is not None:
                os.umask(old)
        try:
            sock.listen(8)
            yield sock
        finally:
            os.unlink(path)


@contextmanager
def _status_service(args: argparse.Namespace, serving: Serving, config: GpuConfig, allocator: Allocator,
                    sinks: Sequence[Sink]) -> Iterator[list[LoopService]]:
    if args.status_socket is None:
        yield []
        return
    with _listening(args.status_socket, 0o600) as sock:
        server = ControlServer(sock, _status_answer(serving, config, allocator, args, sinks))
        log.info("status queries on %s", args.status_socket)
        try:
            yield [server]
        finally:
            server.close()


def _open_wayland(name: str | None) -> WaylandSink:
    """The compositor's connection (RuntimeError saying why there is none).  pywayland is imported only here:
    a back end without --display wayland does not need it installed."""
    try:
        from .display.wayland import WaylandDisplay, WaylandError
    except ImportError as e:
        raise RuntimeError(f"needs pywayland (pip install 'vgpu[wayland]'): {e}") from None
    try:
        return WaylandDisplay(name)
    except WaylandError as e:
        raise RuntimeError(str(e)) from None


def _guest_arch_of(args: argparse.Namespace) -> GuestArch:
    return args.guest_arch if args.guest_arch is not None else host_guest_arch()


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
        context_types = tuple(_context_type(name) for name in args.context_types.split(",") if name.strip())
        limits = Limits(max_resources=args.max_resources, max_host_bytes=args.max_host_memory,
                        max_backing_entries=args.max_backing_entries, max_contexts=args.max_contexts)
        config = GpuConfig(num_scanouts=args.scanouts, width=args.resolution[0], height=args.resolution[1],
                           edid=not args.no_edid, resource_uuid=not args.no_resource_uuid, blob=not args.no_blob,
                           limits=limits, png_dir=args.scanout_png, png_rate=args.png_rate,
                           png_history=args.png_history, context_types=context_types,
                           host_visible_size=args.host_visible_size, map_timeout=args.map_timeout,
                           vmm_display="vmm" in args.display,
                           shmem_feature_bit=args.shmem_feature_bit)
    except ValueError as e:
        parser().error(str(e))

    try:
        allocator = open_allocator(args.allocator, max_size=config.limits.max_host_bytes)
        state = type(allocator).available()
        if not state:
            raise AllocationError(f"allocator {allocator.name} is unavailable: {state.reason}")
        resolver = GuestResolver(Resolver(rules=load_rules(args.cache_rules) if args.cache_rules else None,
                                          legacy_heuristic=args.legacy_cache_heuristic,
                                          map_changing=args.map_changing_placement), _guest_arch_of(args))
    except (ValueError, OSError, AllocationError) as e:
        # Backend program conventions: a requested feature that cannot be had fails at startup, not later.
        log.error("%s", e)
        return 1
    log.info("allocator %s; cache rules %s; legacy heuristic %s; buffers that may move %s; guest architecture %s "
             "(%s)", allocator.name, args.cache_rules or "none", "on" if args.legacy_cache_heuristic else "off",
             "mapped WC" if args.map_changing_placement else "refused", resolver.arch.value,
             "--guest-arch" if args.guest_arch is not None else "the host's")

    serving = Serving()
    stack = ExitStack()
    try:
        sinks: list[Sink] = []
        services: list[LoopService] = []
        if "wayland" in args.display:
            try:
                wayland = _open_wayland(args.wayland_display)
            except RuntimeError as e:
                # Backend program conventions again: no compositor is an error now, not a window never shown.
                log.error("--display wayland: %s", e)
                return 1
            stack.callback(wayland.close)
            sinks.append(wayland)
            services.append(wayland)
        try:
            services += stack.enter_context(_status_service(args, serving, config, allocator, sinks))
        except OSError as e:
            log.error("--status-socket %s: %s", args.status_socket, e)
            return 1

        def factory() -> Device:
            return GpuDevice(config, allocator, resolver, sinks)

        stop = StopSignal()
        stack.callback(stop.close)
        return _run(args, factory, stop, services, serving)
    finally:
        stack.close()


def _memory_policy(args: argparse.Namespace) -> MemoryPolicy:
    offer = args.xen_mmap == "on" or (args.xen_mmap == "auto" and xen_present())
    return MemoryPolicy(xen_mmap=offer, max_grant_pages=args.max_grant_pages)


def _run(args: argparse.Namespace, factory: Callable[[], Device], stop: StopSignal, services: list[LoopService],
         serving: Serving) -> int:
    if args.fd is not None:
        try:
            mode = os.fstat(args.fd).st_mode
        except OSError as e:
            log.error("--fd %d: %s", args.fd, e)
            return 1
        if not stat.S_ISSOCK(mode):
            log.error("--fd %d is not a socket", args.fd)
            return 1
        serve_connection(factory(), socket.socket(fileno=args.fd), stop.r, services, serving, _memory_policy(args),
                         args.poll_max_us)
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
            serve(factory, listener, stop.r, services=services, serving=serving, memory_policy=_memory_policy(args),
                  poll_max_us=args.poll_max_us)
        finally:
            os.unlink(path)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
