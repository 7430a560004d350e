"""Checks of capsets, contexts, blob resources and the host-visible region.

Host blobs need a context that hands out host buffers; the only context type with a published guest protocol
we can drive without a GPU is cross-domain (capset 5), so host-blob checks are not applicable to a back end that
does not offer it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from ..protocol import (
    BlobFlag,
    BlobMem,
    Capset,
    CtrlType,
    CtxAttachResource,
    CtxCreate,
    Format,
    GetCapset,
    GetCapsetInfo,
    GpuFeature,
    MapCache,
    MemEntries,
    Rect,
    ResourceCreateBlob,
    ResourceMapBlob,
    ResourceUnmapBlob,
    ResourceUnref,
    SetScanoutBlob,
    ShmId,
)
from ..protocol import structs as s
from ..session import MAP_INFO_RESP_SIZE, MAPPABLE, PAGE, CrossDomainGuest, Session, hdr, rtype, type_name
from ..vhost_user.shm_window import ShmWindow
from ..vhost_user.wire import ProtocolFeature
from .checks_gpu import create_context
from .context import CheckContext
from .errors import CheckFailed, NotApplicable, expect
from .registry import check

E = CtrlType
ERRORS: Final = tuple(t for t in CtrlType if t.is_error)
CTX: Final = 1
QUERY_RING: Final = 100
HOST_BLOB: Final = ("virtio:RESOURCE_BLOB", "virtio:VIRGL", "capset:CROSS_DOMAIN", "shm:HOST_VISIBLE")


def num_capsets(ctx: CheckContext) -> int:
    return s.config.parse(ctx.offer.config).num_capsets if ctx.offer.config else len(ctx.offer.capsets)


@check("GPU-CAPSET-INFO-INDEX", "capset-info-index")
def capset_info_index(ctx: CheckContext) -> str | None:
    """GET_CAPSET_INFO with capset_index = num_capsets (one past the last) answers ERR_INVALID_PARAMETER."""
    sess = ctx.session()
    n = num_capsets(ctx)
    sess.expect(GetCapsetInfo(hdr(E.CMD_GET_CAPSET_INFO), n), E.RESP_ERR_INVALID_PARAMETER,
                f"GET_CAPSET_INFO index {n} of {n}", 40)
    return None


@check("GPU-CAPSET-INFO-IDS", "capset-info-ids")
def capset_info_ids(ctx: CheckContext) -> str | None:
    """Each capset index below num_capsets answers OK_CAPSET_INFO with a registered id and a non-zero size."""
    sess = ctx.session()
    n = num_capsets(ctx)
    if n == 0:
        raise NotApplicable("num_capsets is 0")
    for i in range(n):
        resp = sess.expect(GetCapsetInfo(hdr(E.CMD_GET_CAPSET_INFO), i), E.RESP_OK_CAPSET_INFO,
                           f"GET_CAPSET_INFO {i}", 40)
        info = s.resp_capset_info.parse(resp)
        expect(info.capset_id in Capset._value2member_map_, f"capset id {info.capset_id} is not registered",
               resp[24:40])
        expect(info.capset_max_size > 0, f"capset {info.capset_id} has max_size 0", resp[24:40])
    return None


@check("GPU-CAPSET-GET", "capset-get")
def capset_get(ctx: CheckContext) -> str | None:
    """GET_CAPSET of an offered capset at its max version answers OK_CAPSET with max_size bytes; a version past
    the max or an id not offered answers ERR_INVALID_PARAMETER."""
    if not ctx.offer.capsets:
        raise NotApplicable("no capsets offered")
    sess = ctx.session()
    for cid, (version, size) in ctx.offer.capsets.items():
        resp = sess.expect(GetCapset(hdr(E.CMD_GET_CAPSET), cid, version), E.RESP_OK_CAPSET,
                           f"GET_CAPSET {cid} v{version}", 24 + size)
        expect(len(resp) == 24 + size, f"GET_CAPSET {cid} wrote {len(resp)} bytes, max_size is {size}")
        sess.expect(GetCapset(hdr(E.CMD_GET_CAPSET), cid, version + 1), E.RESP_ERR_INVALID_PARAMETER,
                    f"GET_CAPSET {cid} v{version + 1}", 24 + size)
    other = next((c for c in range(1, 256) if c not in ctx.offer.capsets), 255)
    sess.expect(GetCapset(hdr(E.CMD_GET_CAPSET), other, 0), E.RESP_ERR_INVALID_PARAMETER,
                f"GET_CAPSET of capset {other} (not offered)", 64)
    return None


@check("GPU-CTX-CREATE", "ctx-create")
def ctx_create(ctx: CheckContext) -> str | None:
    """CTX_CREATE makes a context for hdr.ctx_id (attaching a resource to it works); a second CTX_CREATE of the
    same id is refused."""
    sess = ctx.session()
    create_context(ctx, sess, CTX)
    sess.ok(struct.pack("<IIQIB3xIIII", E.CMD_RESOURCE_CREATE_2D, 0, 0, 0, 0, 1, Format.FORMAT_B8G8R8X8_UNORM,
                        16, 16), "CREATE_2D")
    sess.ok(CtxAttachResource(hdr(E.CMD_CTX_ATTACH_RESOURCE, ctx_id=CTX), 1), "CTX_ATTACH_RESOURCE")
    capset = min(ctx.offer.capsets) if ctx.offer.capsets and sess.has(GpuFeature.F_CONTEXT_INIT.mask) else 0
    sess.expect(CtxCreate(hdr(E.CMD_CTX_CREATE, ctx_id=CTX), 4, capset, b"dup!"), ERRORS, "duplicate CTX_CREATE")
    return None


@check("GPU-CTX-INIT-TYPE", "ctx-init-type")
def ctx_init_type(ctx: CheckContext) -> str | None:
    """CTX_CREATE with context_init naming an offered capset succeeds; one naming a capset not offered answers
    ERR_INVALID_PARAMETER; 0 lets the device choose (succeeds)."""
    sess = ctx.session()
    for i, cid in enumerate(sorted(ctx.offer.capsets)):
        sess.ok(CtxCreate(hdr(E.CMD_CTX_CREATE, ctx_id=10 + i), 0, cid, b""), f"CTX_CREATE of capset {cid}")
    other = next((int(c) for c in Capset if c not in ctx.offer.capsets), 0x7F)
    sess.expect(CtxCreate(hdr(E.CMD_CTX_CREATE, ctx_id=30), 0, other, b""), E.RESP_ERR_INVALID_PARAMETER,
                f"CTX_CREATE of capset {other} (not offered)")
    sess.ok(CtxCreate(hdr(E.CMD_CTX_CREATE, ctx_id=31), 0, 0, b""), "CTX_CREATE with context_init 0")
    return None


@check("GPU-CTX-ATTACH-UNKNOWN-RES", "ctx-attach-unknown-resource")
def ctx_attach_unknown_resource(ctx: CheckContext) -> str | None:
    """CTX_ATTACH_RESOURCE of a resource that does not exist answers ERR_INVALID_RESOURCE_ID."""
    sess = ctx.session()
    create_context(ctx, sess, CTX)
    sess.expect(CtxAttachResource(hdr(E.CMD_CTX_ATTACH_RESOURCE, ctx_id=CTX), 77), E.RESP_ERR_INVALID_RESOURCE_ID,
                "CTX_ATTACH_RESOURCE 77")
    return None


@check("GPU-SUBMIT-SIZE", "submit-size")
def submit_size(ctx: CheckContext) -> str | None:
    """SUBMIT_3D whose size field claims more bytes than the request carries answers ERR_INVALID_PARAMETER."""
    sess = ctx.session()
    create_context(ctx, sess, CTX)
    raw = struct.pack("<IIQIB3xII", E.CMD_SUBMIT_3D, 0, 0, CTX, 0, 256, 0) + bytes(8)
    sess.expect(raw, E.RESP_ERR_INVALID_PARAMETER, "SUBMIT_3D of size 256 carrying 8 bytes")
    sess.serving()
    return None


# --- blobs ------------------------------------------------------------------------------------------------------


def guest_blob(sess: Session, rid: int, size: int, flags: int = 0, backed: bool = True) -> int:
    b = sess.backing(size)
    entries = b.entries if backed else MemEntries.of([])
    sess.ok(ResourceCreateBlob(hdr(E.CMD_RESOURCE_CREATE_BLOB), rid, BlobMem.BLOB_MEM_GUEST, flags, 0, size,
                               entries), f"guest RESOURCE_CREATE_BLOB {rid}")
    return b.gpa


@check("GPU-BLOB-HOST3D-NEEDS-VIRGL", "host3d-needs-virgl")
def host3d_needs_virgl(ctx: CheckContext) -> str | None:
    """With RESOURCE_BLOB but not VIRGL negotiated, HOST3D and HOST3D_GUEST blobs answer ERR_INVALID_PARAMETER."""
    sess = ctx.session(features=GpuFeature.F_RESOURCE_BLOB.mask | GpuFeature.F_EDID.mask)
    for mem in (BlobMem.BLOB_MEM_HOST3D, BlobMem.BLOB_MEM_HOST3D_GUEST):
        sess.expect(ResourceCreateBlob(hdr(E.CMD_RESOURCE_CREATE_BLOB), 5, mem, MAPPABLE, 1, PAGE,
                                       MemEntries.of([])), E.RESP_ERR_INVALID_PARAMETER, f"{mem.name} without VIRGL")
    return None


@check("GPU-BLOB-HOST3D-UNKNOWN-ID", "host3d-unknown-blob-id")
def host3d_unknown_blob_id(ctx: CheckContext) -> str | None:
    """A HOST3D blob naming a blob_id its context never produced is refused."""
    sess = ctx.session()
    create_context(ctx, sess, CTX)
    sess.expect(ResourceCreateBlob(hdr(E.CMD_RESOURCE_CREATE_BLOB, ctx_id=CTX), 5, BlobMem.BLOB_MEM_HOST3D,
                                   MAPPABLE, 999, PAGE, MemEntries.of([])), ERRORS, "HOST3D blob_id 999")
    return None


@check("GPU-BLOB-GUEST-LATE-BACKING", "guest-blob-late-backing")
def guest_blob_late_backing(ctx: CheckContext) -> str | None:
    """A guest blob created with no entries is accepted, and ATTACH_BACKING gives it its pages later."""
    sess = ctx.session()
    guest_blob(sess, 5, 4 * PAGE, backed=False)
    gpa = sess.backing(4 * PAGE).gpa
    sess.ok(struct.pack("<IIQIB3xIIQII", E.CMD_RESOURCE_ATTACH_BACKING, 0, 0, 0, 0, 5, 1, gpa, 4 * PAGE, 0),
            "ATTACH_BACKING of the blob")
    return None


@check("GPU-SCANOUT-BLOB-INVALID", "scanout-blob-invalid")
def scanout_blob_invalid(ctx: CheckContext) -> str | None:
    """SET_SCANOUT_BLOB with an unknown format, with strides that run past the blob, or naming a non-blob
    resource is refused; a consistent one is accepted."""
    sess = ctx.session()
    w = h = 32
    guest_blob(sess, 5, w * h * 4)

    def sob(rid: int, fmt: int, stride: int) -> SetScanoutBlob:
        return SetScanoutBlob(hdr(E.CMD_SET_SCANOUT_BLOB), Rect(0, 0, w, h), 0, rid, w, h, fmt,
                              (stride, 0, 0, 0), (0, 0, 0, 0))

    xrgb = Format.FORMAT_B8G8R8X8_UNORM
    sess.expect(sob(5, 999, w * 4), E.RESP_ERR_INVALID_PARAMETER, "SET_SCANOUT_BLOB format 999")
    sess.expect(sob(5, xrgb, w * 8), E.RESP_ERR_INVALID_PARAMETER, "SET_SCANOUT_BLOB stride past the blob")
    sess.ok(struct.pack("<IIQIB3xIIII", E.CMD_RESOURCE_CREATE_2D, 0, 0, 0, 0, 6, xrgb, w, h), "CREATE_2D")
    sess.expect(sob(6, xrgb, w * 4), ERRORS, "SET_SCANOUT_BLOB of a 2D resource")
    sess.ok(sob(5, xrgb, w * 4), "a consistent SET_SCANOUT_BLOB")
    return None


@check("GPU-MAP-IMPLEMENTED", "map-implemented")
def map_implemented(ctx: CheckContext) -> str | None:
    """With the host-visible region exposed, MAP_BLOB and UNMAP_BLOB are commands the device knows: of a missing
    resource they answer an error other than the one an unknown command gets."""
    sess = ctx.session()
    unknown = rtype(sess.cmd(struct.pack("<IIQIB3x", 0x0999, 0, 0, 0, 0) + bytes(16), 24))
    for what, req, size in (("MAP_BLOB", ResourceMapBlob(hdr(E.CMD_RESOURCE_MAP_BLOB), 77, 0), MAP_INFO_RESP_SIZE),
                            ("UNMAP_BLOB", ResourceUnmapBlob(hdr(E.CMD_RESOURCE_UNMAP_BLOB), 77), 24)):
        resp = sess.expect(req, ERRORS, f"{what} of resource 77", size)
        expect(rtype(resp) != unknown, f"{what} answered {type_name(rtype(resp))}, as an unknown command is", resp)
    return None


@check("GPU-SHM-REGIONS", "shm-regions")
def shm_regions(ctx: CheckContext) -> str | None:
    """GET_SHMEM_CONFIG lists only region 1 (HOST_VISIBLE), non-empty and a whole number of pages."""
    fe = ctx.session().fe
    msg = fe.request(44, reply=True)
    assert msg is not None
    sizes = fe.shmem_config()
    expect(set(sizes) <= {int(ShmId.SHM_ID_HOST_VISIBLE)}, f"regions {sorted(sizes)}", msg.payload[:24])
    size = sizes.get(int(ShmId.SHM_ID_HOST_VISIBLE), 0)
    expect(size > 0 and size % PAGE == 0, f"HOST_VISIBLE region of {size:#x} bytes", msg.payload[:24])
    return None


@check("GPU-MAP-NOT-MAPPABLE", "map-guest-blob-refused")
def map_guest_blob_refused(ctx: CheckContext) -> str | None:
    """A guest blob (even flagged MAPPABLE) has no host buffer to map: MAP_BLOB is refused."""
    sess = ctx.session()
    guest_blob(sess, 5, PAGE, flags=MAPPABLE)
    sess.expect(ResourceMapBlob(hdr(E.CMD_RESOURCE_MAP_BLOB), 5, 0), ERRORS, "MAP_BLOB of a guest blob",
                MAP_INFO_RESP_SIZE)
    return _no_mappings(sess)


def _no_mappings(sess: Session) -> str | None:
    window = sess.fe.shm.get(int(ShmId.SHM_ID_HOST_VISIBLE))
    if window is not None and window.mappings:
        raise CheckFailed(f"the region holds mappings {sorted(window.mappings)} after refused MAP_BLOBs")
    return None


@dataclass
class HostBlobs:
    """A cross-domain guest on a session that negotiated SHMEM, with the front end's window of region 1."""

    guest: CrossDomainGuest
    window: ShmWindow

    @classmethod
    def start(cls, ctx: CheckContext) -> HostBlobs:
        ctx.need(*HOST_BLOB)
        sess = ctx.session()
        if not sess.has_proto(ProtocolFeature.SHMEM):
            raise NotApplicable("SHMEM not negotiated")
        window = sess.fe.shm[int(ShmId.SHM_ID_HOST_VISIBLE)]
        guest = CrossDomainGuest(sess, CTX, QUERY_RING, b"conf")
        guest.start()
        return cls(guest, window)

    @property
    def sess(self) -> Session:
        return self.guest.sess

    def blob(self, rid: int, width: int = 64, height: int = 64, flags: int = MAPPABLE) -> int:
        return self.guest.blob(rid, width, height, flags)

    def map(self, rid: int, offset: int) -> bytes:
        return self.guest.map(rid, offset)

    def map_ok(self, rid: int, offset: int) -> int:
        resp = self.map(rid, offset)
        expect(rtype(resp) == E.RESP_OK_MAP_INFO, f"MAP_BLOB {rid} at {offset:#x} answered "
               f"{type_name(rtype(resp))}", resp)
        info: int = s.resp_map_info.parse(resp).map_info
        return info

    def log(self) -> list[tuple[str, int, int]]:
        return [(k, m.shm_offset, m.length) for k, m in self.window.log]


@check("GPU-MAP-NOT-MAPPABLE", "map-unmappable-host-blob")
def map_unmappable_host_blob(ctx: CheckContext) -> str | None:
    """A host blob created without USE_MAPPABLE cannot be mapped."""
    hb = HostBlobs.start(ctx)
    hb.blob(3, flags=int(BlobFlag.BLOB_FLAG_USE_SHAREABLE))
    resp = hb.map(3, 0)
    expect(rtype(resp) in {int(t) for t in ERRORS}, f"MAP_BLOB answered {type_name(rtype(resp))}", resp)
    return _no_mappings(hb.sess)


@check("GPU-MAP-TWICE", "map-twice")
def map_twice(ctx: CheckContext) -> str | None:
    """Mapping an already-mapped blob again is refused, and the first mapping stays the only one."""
    hb = HostBlobs.start(ctx)
    hb.blob(3)
    hb.map_ok(3, 0)
    resp = hb.map(3, 0x100000)
    expect(rtype(resp) in {int(t) for t in ERRORS}, f"second MAP_BLOB answered {type_name(rtype(resp))}", resp)
    expect([k for k, _, _ in hb.log()] == ["map"], f"region log {hb.log()}")
    return None


@check("GPU-MAP-OUTSIDE", "map-outside")
def map_outside(ctx: CheckContext) -> str | None:
    """MAP_BLOB at an offset where the blob would run past the region (or overflow) answers
    ERR_INVALID_PARAMETER."""
    hb = HostBlobs.start(ctx)
    size = hb.blob(3)
    region = hb.window.size
    for off in (region - PAGE if size > PAGE else region, region, (1 << 64) - PAGE):
        resp = hb.map(3, off)
        expect(rtype(resp) == E.RESP_ERR_INVALID_PARAMETER,
               f"MAP_BLOB of {size:#x} bytes at {off:#x} in a {region:#x} region answered {type_name(rtype(resp))}",
               resp)
    return _no_mappings(hb.sess)


@check("GPU-MAP-INFO", "map-info")
def map_info(ctx: CheckContext) -> str | None:
    """A successful MAP_BLOB answers OK_MAP_INFO carrying exactly CACHED, UNCACHED or WC, after the front end
    was asked to map the blob's buffer into region 1 at that offset (memory that reads back what is written)."""
    hb = HostBlobs.start(ctx)
    size = hb.blob(3, 128, 64)
    resp = hb.map(3, 0x200000)
    expect(rtype(resp) == E.RESP_OK_MAP_INFO, f"MAP_BLOB answered {type_name(rtype(resp))}", resp)
    info = s.resp_map_info.parse(resp).map_info
    valid = {int(MapCache.MAP_CACHE_CACHED), int(MapCache.MAP_CACHE_UNCACHED), int(MapCache.MAP_CACHE_WC)}
    expect(info in valid, f"map_info {info:#x}", resp[24:32])
    maps = [m for k, m in hb.window.log if k == "map"]
    expect(len(maps) == 1 and maps[0].shm_offset == 0x200000 and maps[0].length >= size,
           f"SHMEM_MAPs into region 1: {hb.log()} for a {size:#x}-byte blob at 0x200000")
    hb.window.write(0x200000 + size - 16, b"conformance-16B!")
    expect(hb.window.read(0x200000 + size - 16, 16) == b"conformance-16B!", "the mapped range does not hold data")
    return None


@check("GPU-UNMAP", "unmap")
def unmap(ctx: CheckContext) -> str | None:
    """UNMAP_BLOB of a blob that is not mapped is refused; of a mapped one answers OK_NODATA after SHMEM_UNMAP of
    exactly the range that was mapped."""
    hb = HostBlobs.start(ctx)
    hb.blob(3)
    resp = hb.sess.cmd(ResourceUnmapBlob(hdr(E.CMD_RESOURCE_UNMAP_BLOB, ctx_id=CTX), 3))
    expect(rtype(resp) in {int(t) for t in ERRORS}, f"UNMAP_BLOB of an unmapped blob answered "
           f"{type_name(rtype(resp))}", resp)
    hb.map_ok(3, 0x10000)
    hb.sess.ok(ResourceUnmapBlob(hdr(E.CMD_RESOURCE_UNMAP_BLOB, ctx_id=CTX), 3), "UNMAP_BLOB")
    log = hb.log()
    expect(len(log) == 2 and log[1][0] == "unmap" and log[1][1:] == log[0][1:], f"region log {log}")
    expect(not hb.window.mappings, "mappings left in the region")
    return None


@check("GPU-UNREF-MAPPED", "unref-mapped")
def unref_mapped(ctx: CheckContext) -> str | None:
    """RESOURCE_UNREF of a mapped blob unmaps it from the region before answering."""
    hb = HostBlobs.start(ctx)
    hb.blob(3)
    hb.map_ok(3, 0)
    hb.sess.ok(ResourceUnref(hdr(E.CMD_RESOURCE_UNREF), 3), "RESOURCE_UNREF of the mapped blob")
    expect([k for k, _, _ in hb.log()] == ["map", "unmap"] and not hb.window.mappings,
           f"region log {hb.log()} after UNREF")
    return None
