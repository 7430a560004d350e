"""`vgpu-status`: ask a running `vhost-user-vgpu --status-socket PATH` what it holds right now.

Prints, by default, a text summary for a person: whether a VMM is connected, the negotiated features, host
memory, resources and contexts against their quotas, every resource, and every host-visible mapping with its
map_info and the provenance of that answer; `--json` prints the document as the back end sent it, for tools.
Exit status 0 when the back end answered, 1 when it could not be reached or answered with an error.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any

#: The back end closes a client after 3 s; waiting a little longer lets its answer (or its refusal) arrive.
TIMEOUT = 5.0
#: A document is bounded by the back end's resource limits (about 200 bytes a resource); this only stops a
#: runaway peer on the socket from filling our memory.
MAX_ANSWER = 256 << 20


class StatusError(Exception):
    pass


def query(path: str, request: Mapping[str, object] | None = None, timeout: float = TIMEOUT) -> dict[str, Any]:
    """Send one request (default: status) and return the answer; StatusError if there is none or it is an error."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(json.dumps(request or {"query": "status"}).encode() + b"\n")
            chunks, size = [], 0
            while chunk := sock.recv(1 << 20):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_ANSWER:
                    raise StatusError(f"{path}: answer longer than {MAX_ANSWER} bytes")
    except OSError as e:
        raise StatusError(f"{path}: {e.strerror or e}") from e
    try:
        doc = json.loads(b"".join(chunks))
    except ValueError as e:
        raise StatusError(f"{path}: the answer is not JSON ({e})") from e
    if not isinstance(doc, dict):
        raise StatusError(f"{path}: the answer is not a JSON object")
    if "error" in doc:
        raise StatusError(f"{path}: the back end says: {doc['error']}")
    return doc


# --- the text form ---------------------------------------------------------------------------------------------


def _label(name: str) -> str:
    return f"{name:<14}: "


def _of(used: int, limit: int, unit: str = "") -> str:
    share = f" ({100 * used / limit:.1f}%)" if limit else ""
    return f"{used:,}{unit} of {limit:,}{unit}{share}"


def header_lines(doc: Mapping[str, Any]) -> list[str]:
    if doc.get("vmm_connected"):
        who = f"VMM connected (connection {doc.get('vmm_connections')} since start)"
    else:
        who = f"idle, no VMM connected ({doc.get('vmm_connections', 0)} served since start)"
    lines = [f"{doc.get('program')} {doc.get('version')}, pid {doc.get('pid')}, up {doc.get('uptime_s', 0):.0f} s:"
             f" {who}",
             _label("allocator") + f"{doc.get('allocator')}; cache rules: {doc.get('cache_rules') or 'none'}; "
             f"legacy heuristic: {'on' if doc.get('legacy_cache_heuristic') else 'off'}; context types: "
             f"{', '.join(doc.get('context_types') or []) or 'none'}"]
    t = doc.get("transport")
    if t:
        device = (doc.get("device") or {}).get("features", [])
        f, p = t["features"], t["protocol_features"]
        lines.append(_label("features") + f"{f['acked']:#x} {' '.join([*f['names'], *device])}")
        lines.append(_label("protocol") + f"{p['acked']:#x} {' '.join(p['names'])}")
        busy = "; the device waits for the VMM" if t.get("device_busy") else ""
        lines.append(_label("transport") + f"{t['memory_regions']} memory regions, queues "
                     + ", ".join(f"{q['index']}:{q['size']}{'' if q['started'] else ' stopped'}"
                                 for q in t["queues"]) + busy)
    return lines


def quota_lines(doc: Mapping[str, Any]) -> list[str]:
    q = doc.get("quotas") or {}
    out = []
    for key, name, unit in (("host_memory_bytes", "host memory", " bytes"), ("resources", "resources", ""),
                            ("contexts", "contexts", "")):
        if key in q:
            out.append(_label(name) + _of(q[key]["used"], q[key]["limit"], unit))
    return out


def resource_line(r: Mapping[str, Any]) -> str:
    kind = {"2d": "2D", "host_blob": "host blob", "guest_blob": "guest blob"}.get(r["kind"], r["kind"])
    parts = [f"{kind}, {r['size']:,} bytes"]
    if r["kind"] == "2d":
        parts.append(f"{r['width']}x{r['height']} {r.get('format_name') or r.get('format')}")
    if r.get("backing_entries"):
        n = r["backing_entries"]
        parts.append(f"{n} backing entr{'y' if n == 1 else 'ies'}")
    b = r.get("buffer")
    if b:
        parts.append(f"{b['allocator']} buffer (fd {b['fd']}{', exporter ' + b['exporter'] if b['exporter'] else ''})")
    if r.get("scanouts"):
        parts.append("on scanout " + ", ".join(str(s) for s in r["scanouts"]))
    if r.get("mapped"):
        parts.append("mapped")
    return _label(f"resource {r['id']}") + ", ".join(parts)


def mapping_lines(m: Mapping[str, Any]) -> list[str]:
    """A host-visible mapping, and on a line of its own why it has its map_info (the detail runs long)."""
    return [_label("mapping") + f"resource {m['resource_id']} at window offset {m['offset']:#x} +{m['length']:#x}: "
            f"map_info {m['map_info']} ({m['map_info_name']}), provenance {m['provenance']}",
            _label("  because") + str(m["detail"])]


def render(doc: Mapping[str, Any]) -> str:
    lines = header_lines(doc) + quota_lines(doc)
    device = doc.get("device")
    if device:
        region = device["host_visible_region"]
        if region["size"]:
            lines.append(_label("host-visible") + f"{region['size']:,}-byte window, {region['mappings']} mapped "
                         f"({region['mapped_bytes']:,} bytes)")
        lines += [resource_line(r) for r in device["resources"]]
        for m in device["mappings"]:
            lines += mapping_lines(m)
        for c in device["contexts"]:
            lines.append(_label(f"context {c['id']}") + f"{c['type'] or c['capset_id']}, attached "
                         f"{', '.join(str(a) for a in c['attached']) or 'nothing'}, {c['pending_blobs']} blobs "
                         f"not yet resources ({c['pending_bytes']:,} bytes)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vgpu-status", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("socket", metavar="PATH", help="the back end's --status-socket")
    p.add_argument("--json", action="store_true", help="print the back end's JSON document as it came")
    p.add_argument("--timeout", type=float, default=TIMEOUT, metavar="SECONDS")
    args = p.parse_args(argv)
    try:
        doc = query(args.socket, timeout=args.timeout)
    except StatusError as e:
        print(f"vgpu-status: {e}", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=2) if args.json else render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
