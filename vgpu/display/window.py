"""One scanout as one toplevel window: its image, the guest's cursor over it, and frame pacing.

Pacing: at most one frame is in flight.  A commit asks for a frame callback; until the compositor answers, updates
only land in the window's own copy of the image (`shadow`) and add to the damage, so a guest that flushes faster
than the compositor repaints costs one copy per flush and never waits — the device's queues are never held up by
the display.  When the callback comes (or a buffer is released, if all were held), the window commits once with
the damage gathered meanwhile.

Buffers: the shadow is the truth; each wl_shm buffer remembers what changed since it last held the image
(`missed`), and only that is copied into it before it is attached again.  Two buffers suffice when the compositor
releases the previous one on the next commit (weston does); a third covers one that holds on a little longer, and
past that the window waits for a release rather than allocate without bound.

A scanout that is a dma-buf the compositor can import is attached as it is (linux-dmabuf); updates then only damage.

The cursor is a subsurface above the window, placed with the hot spot at the guest's cursor position: the guest
draws its own cursor, and a wl_pointer cursor exists only for a seat's pointer inside the window (a headless
compositor has no seat at all).  Its position is state of the parent surface, so a move is committed with the
window, paced like a frame.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

from .dmabuf import DmabufBuffer, DmabufFactory
from .shm import SHM_ARGB8888, SHM_XRGB8888, Rect, ShmBuffer, add_damage
from .sink import DmabufImage

if TYPE_CHECKING:
    import numpy.typing as npt
    from pywayland.protocol.wayland import (
        WlCallbackProxy,
        WlCompositorProxy,
        WlShmProxy,
        WlSubcompositorProxy,
        WlSurfaceProxy,
    )
    from pywayland.protocol.xdg_shell import XdgSurfaceProxy, XdgToplevelProxy, XdgWmBaseProxy

log = logging.getLogger("vgpu.display")

MAX_BUFFERS: Final = 3
CURSOR_SIZE: Final = 64


@dataclass
class Globals:
    """The compositor's objects a window needs (bound once per connection)."""

    compositor: WlCompositorProxy
    shm: WlShmProxy
    wm_base: XdgWmBaseProxy
    subcompositor: WlSubcompositorProxy | None
    dmabuf: DmabufFactory | None


class Cursor:
    """The guest's cursor image on a subsurface of the window (desynchronised: a new image shows at once)."""

    def __init__(self, g: Globals, subcompositor: WlSubcompositorProxy, parent: WlSurfaceProxy) -> None:
        self.g = g
        self.surface = g.compositor.create_surface()
        self.sub = subcompositor.get_subsurface(self.surface, parent)
        self.sub.set_desync()
        self.buffers: list[ShmBuffer] = []
        self.hot = (0, 0)
        self.visible = False

    def set_image(self, image: npt.NDArray[np.uint8], hot_x: int, hot_y: int) -> None:
        buf = next((b for b in self.buffers if not b.busy), None)
        if buf is None:
            if len(self.buffers) >= 2:
                log.debug("cursor image dropped: the compositor holds both cursor buffers")
                return
            buf = ShmBuffer(self.g.shm, CURSOR_SIZE, CURSOR_SIZE, SHM_ARGB8888)
            self.buffers.append(buf)
        assert buf.pixels is not None
        buf.pixels[...] = image
        buf.busy = True
        self.hot = (hot_x, hot_y)
        self.surface.attach(buf.wl, 0, 0)
        self.surface.damage_buffer(0, 0, CURSOR_SIZE, CURSOR_SIZE)
        self.surface.commit()
        self.visible = True

    def hide(self) -> None:
        if self.visible:
            self.surface.attach(None, 0, 0)
            self.surface.commit()
            self.visible = False

    def destroy(self) -> None:
        self.sub.destroy()
        self.surface.destroy()
        for b in self.buffers:
            b.destroy()
        self.buffers.clear()


class ScanoutWindow:
    def __init__(self, g: Globals, scanout: int, width: int, height: int, dmabuf: DmabufImage | None,
                 on_close: Callable[[ScanoutWindow], None]) -> None:
        self.g = g
        self.scanout = scanout
        self._on_close = on_close
        self.surface = g.compositor.create_surface()
        self.xdg: XdgSurfaceProxy = g.wm_base.get_xdg_surface(self.surface)
        self.toplevel: XdgToplevelProxy = self.xdg.get_toplevel()
        self.toplevel.set_title(f"vgpu scanout {scanout}")
        self.toplevel.set_app_id("vgpu")
        self.xdg.dispatcher["configure"] = self._configure
        self.toplevel.dispatcher["close"] = self._close
        self.configured = False
        self.frame_pending = False
        self._frame: WlCallbackProxy | None = None
        # Something other than pixels needs a commit: a configure to acknowledge, the cursor moved.
        self._needs_commit = False
        self.damage: list[Rect] = []
        self.cursor: Cursor | None = None
        self.updates = self.commits = self.frames = 0
        self.width = self.height = 0
        self.shadow: npt.NDArray[np.uint8] | None = None
        self.buffers: list[ShmBuffer] = []
        self.dmabuf: DmabufBuffer | None = None
        # The first commit carries no buffer: it asks the compositor for the configure that maps the window.
        self.surface.commit()
        self.set_content(width, height, dmabuf)

    # --- content ----------------------------------------------------------------------------------------------

    def set_content(self, width: int, height: int, dmabuf: DmabufImage | None) -> None:
        """A new image: a new size (the window follows it) or another buffer.  Until pixels come, it is black."""
        self._drop_buffers()
        self.width, self.height = width, height
        if dmabuf is not None and self.g.dmabuf is not None and self.g.dmabuf.can_import(dmabuf):
            self.dmabuf = self.g.dmabuf.create_buffer(dmabuf, self._dmabuf_failed)
            log.info("scanout %d: %dx%d shown from its dma-buf (linux-dmabuf, fourcc %#x)", self.scanout, width,
                     height, dmabuf.fourcc)
        else:
            self.shadow = np.zeros((height, width, 4), dtype=np.uint8)
        self.damage = [(0, 0, width, height)]
        self.maybe_commit()

    def _dmabuf_failed(self) -> None:
        log.warning("scanout %d: the compositor refused its dma-buf; copying from the next update on",
                    self.scanout)
        if self.dmabuf is not None:
            self.dmabuf.destroy()
            self.dmabuf = None
        self.shadow = np.zeros((self.height, self.width, 4), dtype=np.uint8)

    @property
    def copies(self) -> bool:
        return self.shadow is not None

    def update(self, r: Rect, pixels: Callable[[], npt.NDArray[np.uint8]]) -> None:
        x, y, w, h = r
        # The device clips to the scanout already; this keeps a sink from ever raising into it.
        w, h = min(w, self.width - x), min(h, self.height - y)
        if w <= 0 or h <= 0 or x < 0 or y < 0:
            return
        r = (x, y, w, h)
        self.updates += 1
        if self.shadow is not None:
            self.shadow[y:y + h, x:x + w] = pixels()[:h, :w]
            for b in self.buffers:
                add_damage(b.missed, r)
        add_damage(self.damage, r)
        self.maybe_commit()

    # --- the cursor -------------------------------------------------------------------------------------------

    def set_cursor(self, image: npt.NDArray[np.uint8] | None, hot_x: int, hot_y: int, x: int, y: int) -> None:
        sub = self.g.subcompositor
        if sub is None:
            return
        if image is None:
            if self.cursor is not None:
                self.cursor.hide()
            return
        if self.cursor is None:
            self.cursor = Cursor(self.g, sub, self.surface)
        self.cursor.set_image(image, hot_x, hot_y)
        self.move_cursor(x, y)

    def move_cursor(self, x: int, y: int) -> None:
        if self.cursor is None:
            return
        hx, hy = self.cursor.hot
        self.cursor.sub.set_position(x - hx, y - hy)
        self._needs_commit = True
        self.maybe_commit()

    # --- presenting -------------------------------------------------------------------------------------------

    def maybe_commit(self) -> None:
        """Commit now if the compositor is ready for a frame and there is something to show."""
        if not self.configured or self.frame_pending or not (self.damage or self._needs_commit):
            return
        if self.damage:
            if self.shadow is not None:
                buf = self._free_buffer()
                if buf is None:
                    return  # every buffer is held: a release calls us again
                assert buf.pixels is not None
                for x, y, w, h in buf.missed:
                    buf.pixels[y:y + h, x:x + w] = self.shadow[y:y + h, x:x + w]
                buf.missed = []
                buf.busy = True
                self.surface.attach(buf.wl, 0, 0)
            elif self.dmabuf is not None:
                self.surface.attach(self.dmabuf.wl, 0, 0)
            for r in self.damage:
                self.surface.damage_buffer(*r)
            self.damage = []
        self._needs_commit = False
        self._frame = self.surface.frame()
        self._frame.dispatcher["done"] = self._frame_done
        self.surface.commit()
        self.commits += 1
        self.frame_pending = True

    def _free_buffer(self) -> ShmBuffer | None:
        for b in self.buffers:
            if not b.busy:
                return b
        if len(self.buffers) >= MAX_BUFFERS:
            return None
        b = ShmBuffer(self.g.shm, self.width, self.height, SHM_XRGB8888)
        b.on_release = self.maybe_commit
        self.buffers.append(b)
        return b

    def _frame_done(self, _callback: WlCallbackProxy, _time: int) -> None:
        self._frame = None
        self.frame_pending = False
        self.frames += 1
        self.maybe_commit()

    def _configure(self, xdg: XdgSurfaceProxy, serial: int) -> None:
        # The suggested size is not ours to take: the window is as large as the guest's mode.
        xdg.ack_configure(serial)
        self.configured = True
        self._needs_commit = True
        self.maybe_commit()

    def _close(self, _toplevel: XdgToplevelProxy) -> None:
        self._on_close(self)

    # --- teardown ---------------------------------------------------------------------------------------------

    def _drop_buffers(self) -> None:
        for b in self.buffers:
            b.destroy()
        self.buffers = []
        if self.dmabuf is not None:
            self.dmabuf.destroy()
            self.dmabuf = None
        self.shadow = None

    def destroy(self) -> None:
        if self.cursor is not None:
            self.cursor.destroy()
            self.cursor = None
        self.toplevel.destroy()
        self.xdg.destroy()
        self.surface.destroy()
        self._frame = None
        self._drop_buffers()

    def status(self) -> dict[str, object]:
        return {"scanout": self.scanout, "width": self.width, "height": self.height,
                "buffer": "linux-dmabuf" if self.dmabuf is not None else "wl_shm", "mapped": self.configured,
                "updates": self.updates, "commits": self.commits, "frames": self.frames,
                "cursor": self.cursor is not None and self.cursor.visible}
