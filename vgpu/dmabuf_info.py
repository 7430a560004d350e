"""``vgpu-dmabuf-info``: what vgpu would tell a guest about one buffer, and why.

Why a tool: when a guest shows corrupted frames the first question is which cache attribute the device reported
for the buffer and on what grounds. This prints, for an existing fd (``/proc/PID/fd/N``) or for a buffer made by
one of our allocators, the exporter name, the size, the kernel's own answer to ``DMA_BUF_IOCTL_INFO`` (or its
errno), and the resolved attribute with its provenance — the same resolver the device uses.

Exit status: 0 resolved, 1 the buffer could not be opened/allocated (or bad rules), 2 usage, 3 unresolved.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from vgpu.blob import allocators
from vgpu.blob.dmabuf import DmaBuf, query_map_attr, read_fdinfo
from vgpu.blob.resolve import Resolver, map_info
from vgpu.blob.rules import RulesError, load_rules
from vgpu.blob.types import HostBuffer, Unresolved

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNRESOLVED = 3

_SIZE = re.compile(r"^(\d+)([KMG]i?B?)?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """Bytes from ``4096``, ``64K``, ``16M``, ``1G`` (binary units)."""
    match = _SIZE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4096, 64K, 16M)")
    value = int(match.group(1)) * _UNITS[(match.group(2) or "")[:1].upper()]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vgpu-dmabuf-info",
        description="Show a buffer's exporter, size, the kernel's DMA_BUF_IOCTL_INFO answer, and the cache "
        "attribute vgpu resolves for it (with provenance).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("path", nargs="?", help="an fd path: /proc/PID/fd/N, /dev/fd/N, or a file")
    source.add_argument(
        "--allocate",
        metavar="ALLOCATOR",
        choices=[allocators.AUTO, *allocators.ALLOCATORS],
        help=f"make a buffer with one of: {', '.join([allocators.AUTO, *allocators.ALLOCATORS])}",
    )
    source.add_argument("--list-allocators", action="store_true", help="show which allocators work here")
    parser.add_argument("--size", type=parse_size, default=allocators.PAGE_SIZE, help="bytes for --allocate")
    parser.add_argument(
        "--max-size", type=parse_size, default=allocators.DEFAULT_MAX_SIZE, help="refuse --size above this"
    )
    parser.add_argument("--rules", metavar="FILE", help="operator rules (TOML: [exporters], [drm_drivers])")
    parser.add_argument(
        "--legacy-heuristic", action="store_true", help="allow virglrenderer's i915-cached-else-WC guess"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return parser


def describe(buffer: HostBuffer, source: str, resolver: Resolver) -> tuple[dict[str, Any], int]:
    """Everything the tool reports about one buffer, and the exit status it implies."""
    info = read_fdinfo(buffer.fd)
    answer = query_map_attr(buffer.fd)
    report: dict[str, Any] = {
        "source": source,
        "allocator": buffer.allocator,
        "exporter": info.exporter,
        "drm_driver": buffer.drm_driver,
        "size": buffer.size,
        "fdinfo_size": info.size,
        "kernel": {
            "answer": answer.code,
            "kind": answer.kind.value,
            "errno": answer.errno,
            "value": answer.value,
            "detail": answer.describe(),
        },
        "resolution": None,
        "unresolved": None,
    }
    try:
        res = resolver.resolve(buffer)
    except Unresolved as exc:
        report["unresolved"] = str(exc)
        return report, EXIT_UNRESOLVED
    report["resolution"] = {
        "attr": res.attr.name,
        "map_info": map_info(res),
        "provenance": res.provenance.value,
        "detail": res.detail,
    }
    return report, EXIT_OK


def format_text(report: dict[str, Any]) -> str:
    size = f"{report['size']} bytes"
    if report["fdinfo_size"] is not None:
        size += f" (fdinfo: {report['fdinfo_size']})"
    rows = [
        ("source", report["source"]),
        ("allocator", report["allocator"]),
        ("exporter", report["exporter"] or "(none: not a dma-buf)"),
        ("drm driver", report["drm_driver"] or "-"),
        ("size", size),
        ("kernel", report["kernel"]["detail"]),
    ]
    res = report["resolution"]
    if res is not None:
        rows += [
            ("resolved", f"{res['attr']} (map_info {res['map_info']})"),
            ("provenance", res["provenance"]),
            ("detail", res["detail"]),
        ]
    else:
        rows.append(("resolved", f"UNRESOLVED: {report['unresolved']}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _list_allocators(as_json: bool) -> int:
    states = allocators.availability()
    if as_json:
        print(json.dumps({name: {"available": s.ok, "reason": s.reason} for name, s in states.items()}))
    else:
        for name, s in states.items():
            print(f"{name:9} {'available' if s.ok else 'unavailable'}: {s.reason}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_allocators:
        return _list_allocators(args.json)
    try:
        rules = load_rules(args.rules) if args.rules else None
    except RulesError as exc:
        print(f"vgpu-dmabuf-info: {exc}", file=sys.stderr)
        return EXIT_ERROR
    resolver = Resolver(rules=rules, legacy_heuristic=args.legacy_heuristic)
    try:
        if args.allocate:
            with allocators.open_allocator(args.allocate, max_size=args.max_size) as allocator:
                buffer = allocator.allocate(args.size)
            source = f"--allocate {allocator.name} --size {args.size}"
        else:
            with DmaBuf.open(args.path) as held:
                buffer = held.into_host_buffer()
            source = args.path
    except (allocators.AllocationError, OSError, ValueError) as exc:
        print(f"vgpu-dmabuf-info: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        report, status = describe(buffer, source, resolver)
    except OSError as exc:
        print(f"vgpu-dmabuf-info: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        buffer.close()
    print(json.dumps(report, sort_keys=True) if args.json else format_text(report))
    return status


if __name__ == "__main__":
    sys.exit(main())
