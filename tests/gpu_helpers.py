"""A guest's-eye handle on a GPU back end: our front end with memory and both queues set up, plus helpers that
build commands, lay out scattered backing pages and read responses."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from vgpu.protocol import (
    Command,
    CtrlHdr,
    CtrlType,
    Format,
    GpuFeature,
    MemEntries,
    Rect,
    ResourceAttachBacking,
    ResourceCreate2D,
    ResourceFlush,
    SetScanout,
    TransferToHost2D,
    encode_command,
)
from vgpu.vhost_user.driver import GuestRam, Ram
from vgpu.vhost_user.frontend import FRONTEND_PROTOCOL_FEATURES, Display, Frontend

ALL_FEATURES = GpuFeature.F_EDID.mask | GpuFeature.F_RESOURCE_UUID.mask | GpuFeature.F_RESOURCE_BLOB.mask
PAGE = 4096


def hdr(t: CtrlType, **kw: int) -> CtrlHdr:
    return CtrlHdr(t, **kw)


def resp_type(resp: bytes) -> int:
    return int(struct.unpack_from("<I", resp)[0])


def pattern(width: int, height: int, seed: int = 0) -> npt.NDArray[np.uint8]:
    """(h, w, 4) pixels that differ everywhere, so any misplaced byte shows."""
    y, x = np.mgrid[0:height, 0:width].astype(np.uint32)
    out = np.empty((height, width, 4), dtype=np.uint8)
    out[..., 0] = (x * 3 + seed) & 0xFF
    out[..., 1] = (y * 5 + seed) & 0xFF
    out[..., 2] = (x + y * 7) & 0xFF
    out[..., 3] = (x ^ y) & 0xFF
    return out


@dataclass
class Backing:
    """Guest pages (scattered, in shuffled order) that together hold `size` bytes."""

    pages: list[int]
    size: int

    @property
    def entries(self) -> MemEntries:
        return MemEntries.of([(p, PAGE) for p in self.pages])


@dataclass
class Gpu:
    fe: Frontend
    ram: Ram
    display: Display | None = None
    _rng: random.Random = field(default_factory=lambda: random.Random(7))

    @classmethod
    def connect(cls, path: str, features: int = ALL_FEATURES, ram_size: int = 64 << 20,
                display: Display | None = None, protocol_features: int = FRONTEND_PROTOCOL_FEATURES) -> Gpu:
        fe = Frontend.connect(path)
        fe.negotiate(device_features=features, protocol_features=protocol_features)
        ram = GuestRam(ram_size)
        fe.share_memory(ram)
        fe.setup_queue(0, 256)
        fe.setup_queue(1, 256)
        if display is not None:
            fe.set_display(display)
        return cls(fe, ram, display)

    def cmd(self, request: bytes | Command, response_size: int = 24, queue: int = 0) -> bytes:
        raw = request if isinstance(request, bytes) else encode_command(request)
        return self.fe.submit(queue, raw, response_size)

    def ok(self, request: bytes | Command, queue: int = 0) -> None:
        resp = self.cmd(request, 24, queue)
        assert resp_type(resp) == CtrlType.RESP_OK_NODATA, hex(resp_type(resp))

    def err(self, request: bytes | Command, queue: int = 0) -> int:
        resp = self.cmd(request, 24, queue)
        t = resp_type(resp)
        assert t >= 0x1200, hex(t)
        return t

    def backing(self, size: int) -> Backing:
        pages = [self.ram.alloc(PAGE, PAGE) for _ in range((size + PAGE - 1) // PAGE)]
        self._rng.shuffle(pages)
        return Backing(pages, size)

    def write_backing(self, b: Backing, data: bytes, offset: int = 0) -> None:
        pos = 0
        while pos < len(data):
            page, within = divmod(offset + pos, PAGE)
            n = min(PAGE - within, len(data) - pos)
            self.ram.write(b.pages[page] + within, data[pos:pos + n])
            pos += n

    def image_2d(self, rid: int, width: int, height: int, fmt: int = Format.FORMAT_B8G8R8X8_UNORM,
                 pixels: npt.NDArray[np.uint8] | None = None) -> Backing:
        """CREATE_2D + ATTACH_BACKING (+ a full TRANSFER of `pixels`)."""
        self.ok(ResourceCreate2D(hdr(CtrlType.CMD_RESOURCE_CREATE_2D), rid, fmt, width, height))
        b = self.backing(width * height * 4)
        self.ok(ResourceAttachBacking(hdr(CtrlType.CMD_RESOURCE_ATTACH_BACKING), rid, b.entries))
        if pixels is not None:
            self.write_backing(b, pixels.tobytes())
            self.ok(TransferToHost2D(hdr(CtrlType.CMD_TRANSFER_TO_HOST_2D), Rect(0, 0, width, height), 0, rid))
        return b

    def show(self, rid: int, scanout: int, r: Rect) -> None:
        self.ok(SetScanout(hdr(CtrlType.CMD_SET_SCANOUT), r, scanout, rid))

    def flush(self, rid: int, r: Rect) -> None:
        self.ok(ResourceFlush(hdr(CtrlType.CMD_RESOURCE_FLUSH), r, rid))

    def close(self) -> None:
        self.fe.close()
        self.ram.close()
