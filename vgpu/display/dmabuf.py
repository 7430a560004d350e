"""linux-dmabuf (zwp_linux_dmabuf_v1): wl_buffers that are a scanout's dma-buf itself, so nothing is copied.

Bound at version 3, where the compositor lists every (format, modifier) pair it can import with `modifier` events
right after the bind; version 4's feedback objects add per-surface device hints we cannot use (we have no GPU to
choose).  A buffer is made only for a pair the compositor listed, with `create_immed`: an import it refuses after
all is reported by the `failed` event of the params object, and the window then copies (see ScanoutWindow).
DRM_FORMAT_MOD_INVALID listed for a format means "implicit modifier", which a linear buffer also satisfies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from .sink import DmabufImage

if TYPE_CHECKING:
    from pywayland.protocol.linux_dmabuf_unstable_v1 import ZwpLinuxBufferParamsV1Proxy, ZwpLinuxDmabufV1Proxy
    from pywayland.protocol.wayland import WlBufferProxy

VERSION: Final = 3
DRM_FORMAT_MOD_LINEAR: Final = 0
DRM_FORMAT_MOD_INVALID: Final = (1 << 56) - 1


class DmabufFactory:
    """The compositor's zwp_linux_dmabuf_v1 and the pairs it can import."""

    def __init__(self, proxy: ZwpLinuxDmabufV1Proxy) -> None:
        self.proxy = proxy
        self.formats: dict[int, set[int]] = {}
        proxy.dispatcher["format"] = self._format
        proxy.dispatcher["modifier"] = self._modifier

    def _format(self, _proxy: ZwpLinuxDmabufV1Proxy, fourcc: int) -> None:
        self.formats.setdefault(fourcc, set())

    def _modifier(self, _proxy: ZwpLinuxDmabufV1Proxy, fourcc: int, hi: int, lo: int) -> None:
        self.formats.setdefault(fourcc, set()).add(hi << 32 | lo)

    def can_import(self, image: DmabufImage) -> bool:
        mods = self.formats.get(image.fourcc)
        if mods is None:
            return False
        if image.modifier in mods:
            return True
        # Only `format` events (version 1 and 2 semantics) or an explicit "implicit modifier": linear is fine.
        return image.modifier == DRM_FORMAT_MOD_LINEAR and (not mods or DRM_FORMAT_MOD_INVALID in mods)

    def create_buffer(self, image: DmabufImage, on_failed: Callable[[], None]) -> DmabufBuffer:
        """The requests: create_params, add(fd, plane 0, offset, stride, modifier), create_immed(width, height,
        fourcc, no flags).  `on_failed` runs if the compositor refuses the import after all."""
        params = self.proxy.create_params()
        params.dispatcher["failed"] = lambda _p: on_failed()
        params.add(image.fd, 0, image.offset, image.stride, image.modifier >> 32, image.modifier & 0xFFFFFFFF)
        return DmabufBuffer(params.create_immed(image.width, image.height, image.fourcc, 0), params)


class DmabufBuffer:
    """A wl_buffer over a dma-buf and the params object its import may still fail on (kept until the buffer
    goes: a `failed` event arrives on the params)."""

    def __init__(self, wl: WlBufferProxy, params: ZwpLinuxBufferParamsV1Proxy) -> None:
        self.wl = wl
        self.params: ZwpLinuxBufferParamsV1Proxy | None = params

    def destroy(self) -> None:
        if self.params is not None:
            self.wl.destroy()
            self.params.destroy()
            self.params = None
