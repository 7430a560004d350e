"""A guest's-eye session on a GPU back end: our front end negotiated, guest RAM shared, both queues running and,
when asked for, a display socket that answers like QEMU's, with helpers that send virtio-gpu commands, lay out
backing pages and judge the answers.

One module for everyone who plays the guest: the conformance runner, the tests, the benchmarks and the lab's
programs that run inside a guest. It raises :class:`CheckFailed` (with the bytes it saw) when the back end answers
other than expected, which the conformance runner turns into a verdict and a test into a failure.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from .protocol import (
    CTRL_HDR_SIZE,
    BlobFlag,
    BlobMem,
    Capset,
    Command,
    CtrlHdr,
    CtrlType,
    CtxAttachResource,
    CtxCreate,
    DisplayOne,
    Format,
    GetDisplayInfo,
    GpuFeature,
    MemEntries,
    Rect,
    ResourceAttachBacking,
    ResourceCreate2D,
    ResourceCreateBlob,
    ResourceFlush,
    ResourceMapBlob,
    SetScanout,
    SetScanoutBlob,
    SubmitCmd,
    TransferToHost2D,
    build_edid,
    encode_command,
    responses,
)
from .protocol.cross_domain import CrossDomainGetImageRequirements, CrossDomainImageRequirements, CrossDomainInitV1
from .vhost_user.driver import GuestRam, Ram
from .vhost_user.frontend import DEFAULT_TIMEOUT, FRONTEND_PROTOCOL_FEATURES, Display, Frontend
from .vhost_user.profiles import Profile, bring_up
from .vhost_user.wire import GPU_UPDATE_SIZE, GpuRequest, ProtocolFeature

PAGE: Final = 4096
#: EDID, resource UUIDs and blobs: what a modern Linux guest acks of a 2D device.
ALL_FEATURES: Final = GpuFeature.F_EDID.mask | GpuFeature.F_RESOURCE_UUID.mask | GpuFeature.F_RESOURCE_BLOB.mask
#: A guest of cross-domain host blobs: VIRGL too (Linux allows HOST3D blobs only with it) and CONTEXT_INIT.
CROSS_DOMAIN_FEATURES: Final = ALL_FEATURES | GpuFeature.F_VIRGL.mask | GpuFeature.F_CONTEXT_INIT.mask
# What our display tells a back end: two connected outputs, so mirroring and per-scanout rules can be seen.
DISPLAY_MODES: Final = (DisplayOne(Rect(0, 0, 1024, 768), True), DisplayOne(Rect(1024, 0, 800, 600), True))
DISPLAY_INFO_SIZE: Final = 408
EDID_RESP_SIZE: Final = 1056
MAP_INFO_RESP_SIZE: Final = 32
MAPPABLE: Final = int(BlobFlag.BLOB_FLAG_USE_MAPPABLE | BlobFlag.BLOB_FLAG_USE_SHAREABLE)
XR24: Final = int.from_bytes(b"XR24", "little")


class CheckFailed(Exception):
    """The back end did not do what was expected of it; `observed` holds the bytes that show it."""

    def __init__(self, message: str, observed: bytes | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.observed = observed


def rtype(resp: bytes) -> int:
    """The response type, or -1 when the device wrote less than a type."""
    return int(struct.unpack_from("<I", resp)[0]) if len(resp) >= 4 else -1


def type_name(t: int) -> str:
    try:
        return CtrlType(t).name
    except ValueError:
        return "nothing written" if t == -1 else f"{t:#06x}"


def hdr(t: CtrlType, **kw: int) -> CtrlHdr:
    return CtrlHdr(int(t), **kw)


def pattern(width: int, height: int, seed: int = 0) -> npt.NDArray[np.uint8]:
    """(h, w, 4) pixels that differ from pixel to pixel and from seed to seed, so any misplaced byte shows."""
    y, x = np.mgrid[0:height, 0:width].astype(np.uint32)
    out = np.empty((height, width, 4), dtype=np.uint8)
    out[..., 0] = (x * 3 + seed) & 0xFF
    out[..., 1] = (y * 5 + seed) & 0xFF
    out[..., 2] = (x + y * 7) & 0xFF
    out[..., 3] = (x ^ y) & 0xFF
    return out


def make_display(protocol_features: int | None = None, modes: tuple[DisplayOne, ...] = DISPLAY_MODES) -> Display:
    """A display that answers GET_DISPLAY_INFO and GET_EDID (QEMU's C back end asks the display for both)."""

    def edid(scanout: int) -> bytes:
        m = modes[scanout] if scanout < len(modes) else modes[0]
        return responses.edid(CtrlHdr(0), build_edid(m.r.width, m.r.height, serial=scanout))

    d = Display(display_info=lambda: responses.display_info(CtrlHdr(0), list(modes)), edid=edid)
    if protocol_features is not None:
        d.protocol_features = protocol_features
    return d


@dataclass
class Backing:
    """Guest memory that together holds `size` bytes: (address, length) ranges in the order the guest lists them."""

    ranges: list[tuple[int, int]]
    size: int

    @property
    def entries(self) -> MemEntries:
        return MemEntries.of(self.ranges)

    @property
    def gpa(self) -> int:
        """Where the first range starts (all of it, for a contiguous backing)."""
        return self.ranges[0][0]


class Session:
    """One connection as a guest and its VMM see it. `scatter` says how backing is laid out: in shuffled single
    pages, as a guest's page allocator hands them out (the tests), or as one contiguous range (the conformance
    runner, whose observed bytes should not depend on a shuffle). `profile` is the VMM whose set-up sequence was
    played (None: our front end's plain one)."""

    def __init__(self, fe: Frontend, ram: Ram, display: Display | None, scatter: bool = True,
                 profile: Profile | None = None) -> None:
        self.fe, self.ram, self.display, self.scatter, self.profile = fe, ram, display, scatter, profile
        self._rng = random.Random(7)

    @classmethod
    def open(cls, path: str, features: int = ALL_FEATURES, protocol_features: int | None = None,
             display: Display | None = None, queues: bool = True, ram_size: int = 64 << 20,
             timeout: float = DEFAULT_TIMEOUT, shm: bool = False, scatter: bool = True,
             profile: Profile | None = None) -> Session:
        """Connect and set up the back end. With a `profile`, exactly as that VMM does
        (:func:`vgpu.vhost_user.profiles.bring_up`: its order, its shared-memory windows; the display only where it
        has a display socket). Without one, our front end's plain sequence: negotiate, share RAM, start both queues,
        hand over the display and (with `shm`) reserve a window for each shared-memory region. `queues` False stops
        once the features are set."""
        fe = Frontend.connect(path, timeout=timeout)
        ram: GuestRam | None = None
        try:
            ram = GuestRam(ram_size)
            if profile is not None:
                shown = display if profile.display_socket and queues else None
                bring_up(fe, ram, profile, features, shown, queues=2 if queues else 0,
                         protocol_features=protocol_features)
                return cls(fe, ram, shown, scatter, profile)
            asked = FRONTEND_PROTOCOL_FEATURES if protocol_features is None else protocol_features
            fe.negotiate(device_features=features, protocol_features=asked)
            if queues:
                fe.share_memory(ram)
                fe.setup_queue(0, 256)
                fe.setup_queue(1, 256)
                if display is not None:
                    fe.set_display(display)
                if shm and fe.has(ProtocolFeature.SHMEM):
                    fe.reserve_shm()
            return cls(fe, ram, display, scatter)
        except BaseException:
            fe.close()
            if ram is not None:
                ram.close()
            raise

    def has(self, feature_mask: int) -> bool:
        return bool(self.fe.features & feature_mask)

    def has_proto(self, feature: ProtocolFeature) -> bool:
        return self.fe.has(feature)

    # --- commands ---------------------------------------------------------------------------------------------

    def cmd(self, request: bytes | Command, resp_size: int = CTRL_HDR_SIZE, queue: int = 0) -> bytes:
        raw = request if isinstance(request, bytes) else encode_command(request)
        return self.fe.submit(queue, raw, resp_size)

    def expect(self, request: bytes | Command, types: int | tuple[int, ...], what: str | None = None,
               resp_size: int = CTRL_HDR_SIZE, queue: int = 0) -> bytes:
        """Send `request`; fail with the response bytes unless its type is one of `types`."""
        want = (types,) if isinstance(types, int) else types
        resp = self.cmd(request, resp_size, queue)
        t = rtype(resp)
        if t not in want:
            names = " or ".join(type_name(w) for w in want)
            raise CheckFailed(f"{what or _name(request)}: expected {names}, got {type_name(t)}", resp)
        return resp

    def ok(self, request: bytes | Command, what: str | None = None, queue: int = 0) -> None:
        self.expect(request, CtrlType.RESP_OK_NODATA, what, queue=queue)

    def err(self, request: bytes | Command, what: str | None = None, queue: int = 0) -> int:
        """Send `request`, which must be refused with some RESP_ERR_*; returns which."""
        resp = self.cmd(request, CTRL_HDR_SIZE, queue)
        t = rtype(resp)
        if t < CtrlType.RESP_ERR_UNSPEC:
            raise CheckFailed(f"{what or _name(request)}: expected an error, got {type_name(t)}", resp)
        return t

    def serving(self, what: str = "afterwards") -> None:
        """The device still answers a plain command."""
        self.expect(GetDisplayInfo(hdr(CtrlType.CMD_GET_DISPLAY_INFO)), CtrlType.RESP_OK_DISPLAY_INFO,
                    f"{what}, GET_DISPLAY_INFO", DISPLAY_INFO_SIZE)

    # --- guest memory and resources ---------------------------------------------------------------------------

    def backing(self, size: int, *, scatter: bool | None = None) -> Backing:
        """Zeroed guest memory for `size` bytes, laid out as the session's `scatter` says unless told here."""
        if not (self.scatter if scatter is None else scatter):
            gpa = self.ram.alloc(max(size, 16), PAGE)
            self.ram.write(gpa, bytes(size))
            return Backing([(gpa, size)], size)
        pages = [self.ram.alloc(PAGE, PAGE) for _ in range((size + PAGE - 1) // PAGE)]
        for page in pages:
            self.ram.write(page, bytes(PAGE))
        self._rng.shuffle(pages)
        return Backing([(p, PAGE) for p in pages], size)

    def write_backing(self, b: Backing, data: bytes, offset: int = 0) -> None:
        """Write `data` at byte `offset` of the backing, across its ranges."""
        pos, start = 0, 0
        for gpa, length in b.ranges:
            lo, hi = max(offset + pos, start), min(offset + len(data), start + length)
            if lo < hi:
                self.ram.write(gpa + lo - start, data[lo - offset:hi - offset])
                pos = hi - offset
            start += length
        if pos < len(data):
            raise ValueError(f"{len(data)} bytes at {offset} do not fit a backing of {b.size}")

    def image_2d(self, rid: int, width: int, height: int, fmt: int = Format.FORMAT_B8G8R8X8_UNORM,
                 pixels: npt.NDArray[np.uint8] | bytes | None = None, transfer: bool = True) -> Backing:
        """CREATE_2D + ATTACH_BACKING of a backing holding `pixels` (zeros without), then — unless `transfer` is
        off, for a check of the transfer itself — a full TRANSFER_TO_HOST_2D of them; returns the backing."""
        self.ok(ResourceCreate2D(hdr(CtrlType.CMD_RESOURCE_CREATE_2D), rid, fmt, width, height),
                f"RESOURCE_CREATE_2D {rid} {width}x{height}")
        b = self.backing(width * height * 4)
        if pixels is not None:
            self.write_backing(b, pixels if isinstance(pixels, bytes) else pixels.tobytes())
        self.ok(ResourceAttachBacking(hdr(CtrlType.CMD_RESOURCE_ATTACH_BACKING), rid, b.entries),
                f"ATTACH_BACKING {rid}")
        if pixels is not None and transfer:
            self.ok(TransferToHost2D(hdr(CtrlType.CMD_TRANSFER_TO_HOST_2D), Rect(0, 0, width, height), 0, rid),
                    f"TRANSFER_TO_HOST_2D {rid}")
        return b

    def show(self, rid: int, scanout: int, r: Rect) -> None:
        self.ok(SetScanout(hdr(CtrlType.CMD_SET_SCANOUT), r, scanout, rid))

    def flush(self, rid: int, r: Rect) -> None:
        self.ok(ResourceFlush(hdr(CtrlType.CMD_RESOURCE_FLUSH), r, rid))

    def close(self) -> None:
        self.fe.close()
        self.ram.close()



def updates(g: Session, count: int) -> list[tuple[tuple[int, int, int, int, int], bytes]]:
    """The first `count` UPDATEs the session's display received: ((scanout, x, y, w, h), pixels)."""
    assert g.display is not None
    evs = g.display.wait_for(GpuRequest.UPDATE, count)
    return [(Display.update_rect(e.payload), e.payload[GPU_UPDATE_SIZE:]) for e in evs]


def scanout_blob(rid: int, w: int, h: int, stride: int, offset: int = 0, r: Rect | None = None,
                 fmt: int = Format.FORMAT_B8G8R8X8_UNORM, scanout: int = 0) -> SetScanoutBlob:
    """SET_SCANOUT_BLOB of a w x h single-plane image at `offset` with `stride`."""
    return SetScanoutBlob(hdr(CtrlType.CMD_SET_SCANOUT_BLOB), r or Rect(0, 0, w, h), scanout, rid, w, h, fmt,
                          (stride, 0, 0, 0), (offset, 0, 0, 0))

def _name(request: bytes | Command) -> str:
    return type(request).__name__ if not isinstance(request, bytes) else f"request of {len(request)} bytes"


class CrossDomainGuest:
    """A guest that speaks cross-domain (capset 5): a context, its query ring, INIT, then image requirements, the
    HOST3D blobs made of them, and MAP_BLOB."""

    def __init__(self, sess: Session, ctx_id: int = 1, ring_id: int = 100, name: bytes = b"vgpu") -> None:
        self.sess, self.ctx_id, self.ring_id, self.name = sess, ctx_id, ring_id, name
        self.ring = sess.backing(PAGE, scatter=False).gpa

    def h(self, t: CtrlType, ctx: int | None = None) -> CtrlHdr:
        return hdr(t, ctx_id=self.ctx_id if ctx is None else ctx)

    def start(self) -> None:
        """CTX_CREATE, the query ring as a guest blob attached to the context, cross-domain INIT."""
        E, s = CtrlType, self.sess
        s.ok(CtxCreate(self.h(E.CMD_CTX_CREATE), len(self.name), int(Capset.CAPSET_CROSS_DOMAIN), self.name),
             "CTX_CREATE cross-domain")
        s.ok(ResourceCreateBlob(self.h(E.CMD_RESOURCE_CREATE_BLOB, 0), self.ring_id, BlobMem.BLOB_MEM_GUEST, 1, 0,
                                PAGE, MemEntries.of([(self.ring, PAGE)])), "query ring blob")
        s.ok(CtxAttachResource(self.h(E.CMD_CTX_ATTACH_RESOURCE), self.ring_id), "attach the query ring")
        init = CrossDomainInitV1.build(dict(hdr=dict(cmd=1, ring_idx=0, cmd_size=20), query_ring_id=self.ring_id,
                                            channel_ring_id=0, channel_type=0))
        s.ok(SubmitCmd(self.h(E.CMD_SUBMIT_3D), bytes(init)), "cross-domain INIT")

    def requirements(self, width: int = 256, height: int = 256, fourcc: int = XR24) -> object:
        """GET_IMAGE_REQUIREMENTS: the back end's answer as written to the query ring (blob_id, size, map_info...)."""
        req = CrossDomainGetImageRequirements.build(dict(hdr=dict(cmd=2, ring_idx=0, cmd_size=24), width=width,
                                                         height=height, drm_format=fourcc, flags=0x11))
        self.sess.ok(SubmitCmd(self.h(CtrlType.CMD_SUBMIT_3D), bytes(req)), "GET_IMAGE_REQUIREMENTS")
        return CrossDomainImageRequirements.parse(self.sess.ram.read(self.ring, 64))

    def create_blob(self, rid: int, reqs: object, flags: int = MAPPABLE) -> bytes:
        """RESOURCE_CREATE_BLOB (HOST3D) of an image's requirements; the raw response."""
        return self.sess.cmd(ResourceCreateBlob(
            self.h(CtrlType.CMD_RESOURCE_CREATE_BLOB), rid, BlobMem.BLOB_MEM_HOST3D, flags,
            reqs.blob_id, reqs.size, MemEntries.of([])))  # type: ignore[attr-defined]

    def blob(self, rid: int, width: int = 64, height: int = 64, flags: int = MAPPABLE) -> int:
        """A HOST3D blob of a width x height XRGB image, which must be made; returns its size."""
        reqs = self.requirements(width, height)
        resp = self.create_blob(rid, reqs, flags)
        if rtype(resp) != CtrlType.RESP_OK_NODATA:
            raise CheckFailed(f"HOST3D blob {rid}: expected RESP_OK_NODATA, got {type_name(rtype(resp))}", resp)
        size: int = reqs.size  # type: ignore[attr-defined]
        return size

    def map(self, rid: int, offset: int) -> bytes:
        return self.sess.cmd(ResourceMapBlob(self.h(CtrlType.CMD_RESOURCE_MAP_BLOB), rid, offset),
                             MAP_INFO_RESP_SIZE)
