"""The GPU device's state as plain data, for the status query (``vhost-user-vgpu --status-socket``).

What an operator of many VMs asks of a running back end: which resources a guest holds and what they cost the
host, which host buffers are mapped into its window with which cache attribute (`map_info`) and why (the
resolution's provenance and detail, exactly what the MAP_BLOB log line said), and how close it is to each quota.
Only reads: it may run while the device waits for an ack from the VMM.  Field names are documented in the
README's options section; numbers stay numbers (the text form in `vgpu.status` formats them).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..blob.types import HostBuffer
from ..protocol import BlobMem, Format, GpuFeature
from .blobs import CONTEXT_TYPES, BlobEngine
from .resources import Limits, Resource, ResourceTable
from .scanout import Scanout

_CONTEXT_NAMES: dict[int, str] = {int(capset): name for name, capset in CONTEXT_TYPES.items()}


def _enum_name(enum: type[Format] | type[BlobMem], value: int, prefix: str) -> str | None:
    try:
        return enum(value).name.removeprefix(prefix)
    except ValueError:
        return None


def quotas(limits: Limits, host_bytes: int = 0, resources: int = 0, contexts: int = 0) -> dict[str, object]:
    """Use against each limit a guest cannot exceed (all zero when no VMM is connected)."""
    return {
        "host_memory_bytes": {"used": host_bytes, "limit": limits.max_host_bytes},
        "resources": {"used": resources, "limit": limits.max_resources},
        "contexts": {"used": contexts, "limit": limits.max_contexts},
    }


def buffer_status(buffer: HostBuffer) -> dict[str, object]:
    # The fd is the back end's own: with /proc/PID/fd/N an operator can look at (or into) the very buffer.
    return {"allocator": buffer.allocator, "exporter": buffer.exporter, "drm_driver": buffer.drm_driver,
            "fd": buffer.fd, "size": buffer.size}


def resource_status(res: Resource, mapped: bool, contexts: list[int]) -> dict[str, object]:
    if res.host_buffer is not None:
        kind, size = "host_blob", res.blob_size
    elif res.is_blob:
        kind, size = "guest_blob", res.blob_size
    else:
        kind, size = "2d", res.width * res.height * 4
    out: dict[str, object] = {"id": res.id, "kind": kind, "size": size, "host_bytes": res.host_bytes}
    if kind == "2d":
        out.update(width=res.width, height=res.height, format=res.format,
                   format_name=_enum_name(Format, res.format, "FORMAT_"))
    else:
        out.update(blob_mem=res.blob_mem, blob_mem_name=_enum_name(BlobMem, res.blob_mem, "BLOB_MEM_"),
                   blob_flags=res.blob_flags)
    out.update(backing_entries=len(res.backing.length) if res.backing is not None else 0,
               backing_bytes=res.backing.size if res.backing is not None else 0,
               scanouts=sorted(res.scanouts), contexts=contexts, mapped=mapped,
               buffer=buffer_status(res.host_buffer) if res.host_buffer is not None else None)
    return out


def device_status(*, acked: int, limits: Limits, table: ResourceTable, blobs: BlobEngine,
                  scanouts: Sequence[Scanout]) -> dict[str, object]:
    """The device's parts, as the device hands them over (this module reads them; it never imports the device)."""
    region = blobs.region
    by_id = {res.id: res for res in table}
    attached: dict[int, list[int]] = {}
    for ctx in blobs.contexts.values():
        for rid in ctx.attached:
            attached.setdefault(rid, []).append(ctx.id)
    mappings = []
    for m in region:
        res = by_id.get(m.resource_id)
        buffer = res.host_buffer if res is not None else None
        resolution = buffer.resolution if buffer is not None else None
        mappings.append({
            "resource_id": m.resource_id, "offset": m.offset, "length": m.length,
            # A mapping exists only once its attribute was resolved; None would mean a bug, shown rather than hidden.
            "map_info": int(resolution.attr) if resolution is not None else None,
            "map_info_name": resolution.attr.name if resolution is not None else None,
            "provenance": resolution.provenance.value if resolution is not None else None,
            "detail": resolution.detail if resolution is not None else None,
            "buffer": buffer_status(buffer) if buffer is not None else None,
        })
    contexts = []
    for ctx in sorted(blobs.contexts.values(), key=lambda c: c.id):
        pending = ctx.pending()
        contexts.append({"id": ctx.id, "capset_id": ctx.capset_id, "type": _CONTEXT_NAMES.get(ctx.capset_id),
                         "attached": sorted(ctx.attached), "pending_blobs": len(pending),
                         "pending_bytes": sum(b.size for b in pending)})
    return {
        "features": [f.name.removeprefix("F_") for f in GpuFeature if acked & f.mask],
        "quotas": quotas(limits, table.host_bytes, len(table), len(blobs.contexts)),
        "host_visible_region": {"size": region.size, "available": region.size > 0 and blobs.host_visible,
                                "mappings": len(region), "mapped_bytes": sum(m.length for m in region)},
        "resources": [resource_status(by_id[rid], region.get(rid) is not None, sorted(attached.get(rid, [])))
                      for rid in sorted(by_id)],
        "mappings": mappings,
        "contexts": contexts,
        "scanouts": [{"id": s.id, "resource_id": s.resource.id if s.resource is not None else None,
                      "rect": [s.rect.x, s.rect.y, s.rect.width, s.rect.height]} for s in scanouts],
    }
