"""A guest's-eye session on a back end: our front end set up as a VMM's profile says (QEMU's by default: guest RAM
shared, both queues running and a display socket that answers like QEMU's), with helpers that send virtio-gpu
commands and judge their answers."""

from __future__ import annotations

import struct
from typing import Final

from ..protocol import (
    CTRL_HDR_SIZE,
    Command,
    CtrlHdr,
    CtrlType,
    DisplayOne,
    Format,
    GetDisplayInfo,
    MemEntries,
    Rect,
    ResourceAttachBacking,
    ResourceCreate2D,
    build_edid,
    encode_command,
    responses,
)
from ..vhost_user.driver import GuestRam
from ..vhost_user.frontend import Display, Frontend
from ..vhost_user.profiles import QEMU, Profile, bring_up
from ..vhost_user.wire import ProtocolFeature
from .errors import CheckFailed, NotApplicable

PAGE: Final = 4096
RAM_SIZE: Final = 32 << 20
TIMEOUT: Final = 3.0
ALL_GPU_FEATURES: Final = 0x3F
# What our display tells a back end: two connected outputs, so mirroring and per-scanout rules can be seen.
DISPLAY_MODES: Final = (DisplayOne(Rect(0, 0, 1024, 768), True), DisplayOne(Rect(1024, 0, 800, 600), True))
DISPLAY_INFO_SIZE: Final = 408
EDID_RESP_SIZE: Final = 1056


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


def make_display(protocol_features: int | None = None, modes: tuple[DisplayOne, ...] = DISPLAY_MODES) -> Display:
    """A display that answers GET_DISPLAY_INFO and GET_EDID (QEMU's C back end asks the display for both)."""

    def edid(scanout: int) -> bytes:
        m = modes[scanout] if scanout < len(modes) else modes[0]
        return responses.edid(CtrlHdr(0), build_edid(m.r.width, m.r.height, serial=scanout))

    d = Display(display_info=lambda: responses.display_info(CtrlHdr(0), list(modes)), edid=edid)
    if protocol_features is not None:
        d.protocol_features = protocol_features
    return d


def no_display_socket(profile: Profile) -> NotApplicable:
    return NotApplicable(f"the {profile.name} profile opens no display socket, and this check sees the device's "
                         "output only through one (GPU_SET_SOCKET is QEMU's; under crosvm the display is the back "
                         "end's own)")


class Session:
    def __init__(self, fe: Frontend, ram: GuestRam, display: Display | None, profile: Profile = QEMU) -> None:
        self.fe, self.ram, self.display, self.profile = fe, ram, display, profile

    @classmethod
    def open(cls, path: str, features: int = ALL_GPU_FEATURES, protocol_features: int | None = None,
             display: Display | bool | None = True, queues: bool = True, ram_size: int = RAM_SIZE,
             timeout: float = TIMEOUT, profile: Profile = QEMU) -> Session:
        """Set a back end up as `profile`'s VMM does; `queues` False stops once the features are set, and the
        display (if any) is handed over only where the profile has a display socket."""
        fe = Frontend.connect(path, timeout=timeout)
        ram: GuestRam | None = None
        try:
            ram = GuestRam(ram_size)
            wanted = make_display() if display is True else (display or None)
            shown = wanted if profile.display_socket and queues else None
            bring_up(fe, ram, profile, features, shown, queues=2 if queues else 0,
                     protocol_features=protocol_features)
            return cls(fe, ram, shown, profile)
        except BaseException:
            fe.close()
            if ram is not None:
                ram.close()
            raise

    def need_display(self) -> Display:
        """The display socket's recorder; a check that watches it does not apply under a profile without one."""
        if self.display is None:
            raise no_display_socket(self.profile)
        return self.display

    def has(self, feature_mask: int) -> bool:
        return bool(self.fe.features & feature_mask)

    def has_proto(self, feature: ProtocolFeature) -> bool:
        return self.fe.has(feature)

    # --- commands ---------------------------------------------------------------------------------------------

    def cmd(self, request: bytes | Command, resp_size: int = CTRL_HDR_SIZE, queue: int = 0) -> bytes:
        raw = request if isinstance(request, bytes) else encode_command(request)
        return self.fe.submit(queue, raw, resp_size)

    def expect(self, request: bytes | Command, types: int | tuple[int, ...], what: str,
               resp_size: int = CTRL_HDR_SIZE, queue: int = 0) -> bytes:
        """Send `request`; fail with the response bytes unless its type is one of `types`."""
        want = (types,) if isinstance(types, int) else types
        resp = self.cmd(request, resp_size, queue)
        t = rtype(resp)
        if t not in want:
            names = " or ".join(type_name(w) for w in want)
            raise CheckFailed(f"{what}: expected {names}, got {type_name(t)}", resp)
        return resp

    def ok(self, request: bytes | Command, what: str, queue: int = 0) -> None:
        self.expect(request, CtrlType.RESP_OK_NODATA, what, queue=queue)

    def serving(self, what: str = "afterwards") -> None:
        """The device still answers a plain command."""
        self.expect(GetDisplayInfo(hdr(CtrlType.CMD_GET_DISPLAY_INFO)), CtrlType.RESP_OK_DISPLAY_INFO,
                    f"{what}, GET_DISPLAY_INFO", DISPLAY_INFO_SIZE)

    # --- guest memory and resources ---------------------------------------------------------------------------

    def backing(self, size: int) -> int:
        gpa = self.ram.alloc(max(size, 16), PAGE)
        self.ram.write(gpa, bytes(size))
        return gpa

    def image_2d(self, rid: int, width: int, height: int, data: bytes | None = None,
                 fmt: int = Format.FORMAT_B8G8R8X8_UNORM) -> int:
        """CREATE_2D + ATTACH_BACKING of one contiguous range (filled with `data`); returns its address."""
        self.ok(ResourceCreate2D(hdr(CtrlType.CMD_RESOURCE_CREATE_2D), rid, fmt, width, height),
                f"RESOURCE_CREATE_2D {rid} {width}x{height}")
        gpa = self.backing(width * height * 4)
        if data is not None:
            self.ram.write(gpa, data)
        self.ok(ResourceAttachBacking(hdr(CtrlType.CMD_RESOURCE_ATTACH_BACKING), rid,
                                      MemEntries.of([(gpa, width * height * 4)])), f"ATTACH_BACKING {rid}")
        return gpa

    def close(self) -> None:
        self.fe.close()
        self.ram.close()
