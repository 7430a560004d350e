"""Where scanouts go: the VMM's display over the vhost-user-gpu socket, displays of our own (`vgpu.display`: a
Wayland window per scanout), and PNG pictures.

The device decides what each scanout shows; this class tells the sinks. Display output is best effort: a VMM
without a display, or one that went away, costs the guest nothing.  The operator chooses the displays: with
`vmm_display` off, a socket the VMM hands over is kept open (so the VMM sees no error) but neither shown to nor
asked for the layout, which then is ours (`--resolution`).

The display's layout (what GET_DISPLAY_INFO answers) is kept between queries instead of asked of the front end
every time. That is safe because every way a layout reaches a Linux guest passes through something we see:
QEMU's `vhost-user-gpu` keeps EVENT_DISPLAY in its own copy of the config space, and its get_config handler
forwards every guest read of that space to the back end (GET_CONFIG) before patching events_read in; the guest
reads events_read before it asks GET_DISPLAY_INFO again (virtio_gpu_config_changed_work_func). A new display
socket, a config read or write, and our own display-change event therefore drop the cached layout.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..display.sink import DmabufImage, Sink
from ..protocol import DisplayOne, Rect, responses
from ..vhost_user.device import Transport
from ..vhost_user.gpu_display import DisplayClient, DisplayError
from ..vhost_user.wire import GpuProtocolFeature
from .config import GpuConfig
from .formats import DRM_FOURCC
from .scanout import PictureWriter, Scanout, bgrx, bgrx_array

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

log = logging.getLogger("vgpu.gpu")


def describe_layout(modes: list[DisplayOne]) -> str:
    """A layout for the log: ``scanout 0 1024x768+0+0`` per enabled scanout (the operator sees a resize land)."""
    shown = [f"scanout {i} {m.r.width}x{m.r.height}+{m.r.x}+{m.r.y}" for i, m in enumerate(modes) if m.enabled]
    return ", ".join(shown) or "no enabled scanout"


class Output:
    def __init__(self, cfg: GpuConfig, transport: Callable[[], Transport], sinks: Sequence[Sink] = ()) -> None:
        self.cfg = cfg
        self._transport = transport
        self.sinks = tuple(sinks)
        self.display: DisplayClient | None = None
        # The VMM's socket when the operator did not choose its display (see the module docstring).
        self._unused: socket.socket | None = None
        self.pictures = PictureWriter(cfg.png_dir, cfg.png_rate, cfg.png_history) if cfg.png_dir else None
        self._layout: list[DisplayOne] | None = None

    # --- the display socket -----------------------------------------------------------------------------------

    def attach_display(self, sock: socket.socket, on_ready: Callable[[], None]) -> bool:
        """Start talking to a new display; False when it is unusable from the start (or not chosen)."""
        self.close()
        if not self.cfg.vmm_display:
            log.info("the VMM's display socket is not used (--display without vmm)")
            self._unused = sock
            return False
        self.display = DisplayClient(self._transport(), sock, on_ready=on_ready)
        try:
            self.display.start_negotiation()
        except DisplayError as e:
            log.warning("display socket unusable: %s", e)
            self.close()
            return False
        return True

    def close(self) -> None:
        if self.display is not None:
            self.display.close()
            self.display = None
        if self._unused is not None:
            self._unused.close()
            self._unused = None
        self._layout = None

    def reset(self) -> None:
        """The device is reset or its front end gone: no display shows anything of it any more."""
        self.close()
        for sink in self.sinks:
            sink.reset()

    @property
    def takes_dmabuf(self) -> bool:
        """Whether some display could show a dma-buf without copies."""
        return self.live is not None or any(sink.takes_dmabuf for sink in self.sinks)

    @property
    def live(self) -> DisplayClient | None:
        d = self.display
        return d if d is not None and d.alive else None

    def forget_layout(self) -> None:
        """The guest may be about to learn of a new layout (see the module docstring): ask the display again."""
        self._layout = None

    # --- what the guest is told -------------------------------------------------------------------------------

    def default_modes(self) -> list[DisplayOne]:
        return [DisplayOne(Rect(0, 0, self.cfg.width, self.cfg.height), True)
                ] + [DisplayOne(Rect(0, 0, 0, 0), False) for _ in range(self.cfg.num_scanouts - 1)]

    def modes(self) -> list[DisplayOne]:
        """The front end's display layout when it has one, limited to our scanouts; else the configured one."""
        d = self.live
        if d is None:
            return self.default_modes()
        if self._layout is None:
            try:
                modes = responses.parse_display_info(d.display_info(), self.cfg.num_scanouts)
                self._layout = modes if any(m.enabled and m.r.width and m.r.height for m in modes) \
                    else self.default_modes()
            except Exception as e:  # a broken front-end answer must not break the guest's display
                log.warning("front end display info unusable (%s); using the configured display", e)
                return self.default_modes()
        return self._layout

    def edid(self, scanout: int) -> bytes | None:
        """The VMM's EDID for the scanout when its display offers one (it knows the real monitor)."""
        d = self.live
        if d is None or not d.has(GpuProtocolFeature.EDID):
            return None
        try:
            return responses.parse_edid(d.edid(scanout))
        except Exception as e:  # a broken answer falls back to ours
            log.warning("front end EDID unusable (%s); using our own", e)
            return None

    # --- what the sinks are told ------------------------------------------------------------------------------

    def send(self, what: Callable[[DisplayClient], None]) -> None:
        d = self.live
        if d is None:
            return
        try:
            what(d)
        except DisplayError as e:
            log.warning("display: %s", e)

    def show(self, s: Scanout) -> None:
        """Tell the displays what scanout `s` now shows: its dma-buf when it has one, else its size (0x0: off)."""
        w, h = (s.rect.width, s.rect.height) if s.enabled else (0, 0)
        image = None
        if s.enabled and s.dmabuf is not None and s.blob is not None:
            buf, b, r = s.dmabuf, s.blob, s.rect
            self.send(lambda d: d.dmabuf_scanout(s.id, (r.x, r.y, r.width, r.height), buf.fd, b.width, b.height,
                                                 b.stride, 0, DRM_FOURCC[b.format], 0))
            if (r.x, r.y, r.width, r.height) == (0, 0, b.width, b.height):
                # Our displays take whole images only (a window is as large as its buffer).
                image = DmabufImage(buf.fd, b.width, b.height, b.stride, b.offset, DRM_FOURCC[b.format], 0)
        else:
            self.send(lambda d: d.scanout(s.id, w, h))
        for sink in self.sinks:
            sink.show(s.id, w, h, image)

    def cursor(self, scanout: int, image: npt.NDArray[np.uint8] | None, hot_x: int, hot_y: int, x: int,
               y: int) -> None:
        """A new cursor image (B, G, R, A, 64x64) at (x, y), or None: hidden."""
        if image is None:
            self.send(lambda d: d.cursor_pos(scanout, x, y, hide=True))
        else:
            data = image.tobytes()
            self.send(lambda d: d.cursor_update(scanout, x, y, hot_x, hot_y, data))
            if self.pictures is not None:
                self.pictures.cursor(scanout, image)
        for sink in self.sinks:
            sink.cursor(scanout, image, hot_x, hot_y, x, y)

    def move_cursor(self, scanout: int, x: int, y: int) -> None:
        self.send(lambda d: d.cursor_pos(scanout, x, y))
        for sink in self.sinks:
            sink.move_cursor(scanout, x, y)

    def update(self, s: Scanout, r: Rect, still_shown: Callable[[Scanout], bool]) -> None:
        """Send the pixels of resource rectangle `r` (already clipped to the scanout) and maybe a picture."""
        memory = self._transport().memory
        x, y = r.x - s.rect.x, r.y - s.rect.y
        if s.dmabuf is not None:
            # The display reads the buffer itself; DMABUF_UPDATE returns once it has.
            self.send(lambda d: d.dmabuf_update(s.id, x, y, r.width, r.height))
        elif self.live is not None:
            pixels = bgrx(s, memory, r)
            self.send(lambda d: d.update(s.id, x, y, r.width, r.height, pixels))
        if self.sinks:
            got: list[npt.NDArray[np.uint8]] = []

            def pixels_of_r() -> npt.NDArray[np.uint8]:
                # Read once however many sinks ask, and only if one does (a dma-buf shown as is needs none).
                if not got:
                    got.append(bgrx_array(s, memory, r))
                return got[0]

            for sink in self.sinks:
                sink.update(s.id, x, y, r.width, r.height, pixels_of_r)
        pics = self.pictures
        if pics is not None and not s.png_owed and not pics.maybe_write(s, memory):
            # Skipped by the rate limit: write the then-current picture once the interval has passed, so the
            # last frame the guest shows is always on disk.
            def owed() -> None:
                if s.png_owed and s.enabled and still_shown(s):
                    pics.maybe_write(s, self._transport().memory, force=True)

            self._transport().call_later(pics.due_in(s), owed)
