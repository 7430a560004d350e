"""`--display wayland`: scanouts as windows on the host's Wayland compositor (pywayland, libwayland-client).

One connection for the life of the process, served by the back end's own loop as a loop service (`fileno`,
`timeout`, `service`): the compositor's events (configures, frame callbacks, buffer releases, pings) are read and
dispatched only when its fd is readable, and requests are flushed without ever waiting — a compositor that stops
reading costs us queued bytes, never the VMM's queues.  The device of each front end presents through it
(`Sink`); when a front end goes, its windows go (`reset`).

Start-up is the one place that waits, and it is bounded: connecting and the first round trips (which globals,
which formats) must finish within `timeout` seconds, else `WaylandError` says what is missing, so a user without a
compositor (or with a hung one) gets a clear error at start instead of a back end that hangs or shows nothing.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pywayland.client.display import Display
from pywayland.protocol.linux_dmabuf_unstable_v1 import ZwpLinuxDmabufV1
from pywayland.protocol.wayland import WlCompositor, WlShm, WlSubcompositor
from pywayland.protocol.xdg_shell import XdgWmBase

from . import dmabuf as dmabuf_protocol
from .dmabuf import DmabufFactory
from .shm import SHM_XRGB8888
from .sink import DmabufImage
from .window import Globals, ScanoutWindow

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from pywayland.protocol.wayland import WlCallbackProxy, WlRegistryProxy, WlShmProxy
    from pywayland.protocol.xdg_shell import XdgWmBaseProxy

log = logging.getLogger("vgpu.display")

START_TIMEOUT: Final = 5.0
#: wl_surface.damage_buffer (buffer coordinates) is version 4.
COMPOSITOR_VERSION: Final = 4
#: How soon the loop comes back while requests wait for room in the socket.
FLUSH_RETRY: Final = 0.005


class WaylandError(Exception):
    """No usable compositor: not there, not answering, or lacking what a window needs."""


def socket_path(name: str | None) -> str:
    """Where libwayland will look for the compositor (for messages): WAYLAND_DISPLAY, default wayland-0, under
    XDG_RUNTIME_DIR unless absolute."""
    display = name or os.environ.get("WAYLAND_DISPLAY") or "wayland-0"
    if os.path.isabs(display):
        return display
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return str(Path(runtime) / display) if runtime else f"$XDG_RUNTIME_DIR/{display} (XDG_RUNTIME_DIR is not set)"


class WaylandDisplay:
    """The connection, its globals and one window per shown scanout; a `Sink` and a loop service."""

    def __init__(self, name: str | None = None, timeout: float = START_TIMEOUT) -> None:
        self.where = socket_path(name)
        self.display = Display(name)
        try:
            self.display.connect()
        except ValueError:
            raise WaylandError(f"no Wayland compositor at {self.where}") from None
        self.lost: str | None = None
        self._unflushed = False
        self.windows: dict[int, ScanoutWindow] = {}
        # Scanouts whose window the user closed: not shown again until the guest shows something new there.
        self.dismissed: set[int] = set()
        self.shm_formats: set[int] = set()
        self._offered: dict[str, tuple[int, int]] = {}
        try:
            self.g = self._bind(time.monotonic() + timeout)
        except BaseException:
            self.display.disconnect()
            raise
        log.info("wayland: connected to %s (wl_shm%s%s)", self.where,
                 ", linux-dmabuf" if self.g.dmabuf is not None else ", no linux-dmabuf",
                 "" if self.g.subcompositor is not None else ", no wl_subcompositor: no cursor")

    # --- start-up ---------------------------------------------------------------------------------------------

    def _roundtrip(self, deadline: float, what: str) -> None:
        """wl_display.sync and wait for its callback, never past `deadline` (libwayland's own round trip would
        wait forever for a compositor that accepted the connection and stopped)."""
        done: list[bool] = []
        callback: WlCallbackProxy = self.display.sync()
        callback.dispatcher["done"] = lambda _cb, _data: done.append(True)
        fd = self.display.get_fd()
        while not done:
            self.display.flush()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaylandError(f"the Wayland compositor at {self.where} did not answer {what} in time")
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                try:
                    self.display.read()
                    self.display.dispatch(block=False)
                except RuntimeError as e:
                    raise WaylandError(f"the Wayland compositor at {self.where} closed the connection "
                                       f"({what}): {e}") from None

    def _bind(self, deadline: float) -> Globals:
        registry: WlRegistryProxy = self.display.get_registry()
        registry.dispatcher["global"] = self._global
        self._roundtrip(deadline, "the registry")
        missing = [n for n in ("wl_compositor", "wl_shm", "xdg_wm_base") if n not in self._offered]
        if missing:
            raise WaylandError(f"the Wayland compositor at {self.where} offers no {', '.join(missing)}")
        if self._offered["wl_compositor"][1] < COMPOSITOR_VERSION:
            raise WaylandError(f"the compositor's wl_compositor is version {self._offered['wl_compositor'][1]}; "
                               f"we need {COMPOSITOR_VERSION}")

        def bind(name: str, interface: Any, version: int) -> Any:
            number, offered = self._offered[name]
            return registry.bind(number, interface, min(version, offered))

        shm: WlShmProxy = bind("wl_shm", WlShm, 1)
        shm.dispatcher["format"] = lambda _shm, fmt: self.shm_formats.add(fmt)
        wm_base: XdgWmBaseProxy = bind("xdg_wm_base", XdgWmBase, 1)
        wm_base.dispatcher["ping"] = lambda base, serial: base.pong(serial)
        g = Globals(
            compositor=bind("wl_compositor", WlCompositor, COMPOSITOR_VERSION), shm=shm, wm_base=wm_base,
            subcompositor=bind("wl_subcompositor", WlSubcompositor, 1) if "wl_subcompositor" in self._offered
            else None,
            dmabuf=DmabufFactory(bind("zwp_linux_dmabuf_v1", ZwpLinuxDmabufV1, dmabuf_protocol.VERSION))
            if "zwp_linux_dmabuf_v1" in self._offered else None,
        )
        self._registry = registry
        # The formats and modifiers come as events right after the binds.
        self._roundtrip(deadline, "the format lists")
        if SHM_XRGB8888 not in self.shm_formats:
            raise WaylandError(f"the compositor at {self.where} lists no wl_shm XRGB8888")
        return g

    def _global(self, _registry: WlRegistryProxy, number: int, interface: str, version: int) -> None:
        self._offered[interface] = (number, version)

    # --- the loop service -------------------------------------------------------------------------------------

    def fileno(self) -> int:
        return self.display.get_fd()

    def timeout(self) -> float | None:
        return FLUSH_RETRY if self._unflushed and self.lost is None else None

    def service(self) -> None:
        if self.lost is not None:
            return
        try:
            readable, _, _ = select.select([self.fileno()], [], [], 0)
            if readable:
                self.display.read()
            self.display.dispatch(block=False)
        except RuntimeError as e:
            self._lose(f"{e}")
            return
        self._flush()

    def _flush(self) -> None:
        if self.lost is not None:
            return
        if self.display.flush() < 0:
            # libwayland records a fatal error for anything but EAGAIN (the socket is full) and EPIPE (the
            # compositor is gone, which the next read reports): come back soon (timeout) and try again.
            # dispatch_pending fails exactly when the connection holds such an error.
            try:
                self.display.dispatch(block=False)
            except RuntimeError as e:
                self._lose(f"{e}")
                return
            self._unflushed = True
            return
        self._unflushed = False

    def _lose(self, why: str) -> None:
        """The compositor went away or ended our connection: stop presenting, keep serving the VMM."""
        self.lost = why
        log.error("wayland: lost the compositor at %s (%s); scanouts are no longer shown", self.where, why)
        self.windows.clear()  # their proxies die with the connection

    def _present(self, scanout: int, action: Callable[[ScanoutWindow], None]) -> None:
        w = self.windows.get(scanout)
        if w is None or self.lost is not None:
            return
        try:
            action(w)
        except Exception:
            # A sink never fails the device: a bug here costs this frame, not the guest's command.
            log.exception("wayland: scanout %d", scanout)
        self._flush()

    # --- Sink -------------------------------------------------------------------------------------------------

    @property
    def takes_dmabuf(self) -> bool:
        return self.g.dmabuf is not None and self.lost is None

    def show(self, scanout: int, width: int, height: int, dmabuf: DmabufImage | None = None) -> None:
        if self.lost is not None:
            return
        self.dismissed.discard(scanout)
        w = self.windows.get(scanout)
        if width == 0 or height == 0:
            if w is not None:
                log.info("wayland: scanout %d off: its window closes", scanout)
                del self.windows[scanout]
                w.destroy()
                self._flush()
            return
        if w is None:
            log.info("wayland: scanout %d: a %dx%d window", scanout, width, height)
            self.windows[scanout] = ScanoutWindow(self.g, scanout, width, height, dmabuf, self._closed_by_user)
            self._flush()
        else:
            self._present(scanout, lambda win: win.set_content(width, height, dmabuf))

    def _closed_by_user(self, w: ScanoutWindow) -> None:
        log.info("wayland: the window of scanout %d was closed; shown again when the guest sets that scanout",
                 w.scanout)
        if self.windows.get(w.scanout) is w:
            del self.windows[w.scanout]
            self.dismissed.add(w.scanout)
        w.destroy()

    def update(self, scanout: int, x: int, y: int, width: int, height: int,
               pixels: Callable[[], npt.NDArray[np.uint8]]) -> None:
        self._present(scanout, lambda w: w.update((x, y, width, height), pixels))

    def cursor(self, scanout: int, image: npt.NDArray[np.uint8] | None, hot_x: int, hot_y: int, x: int,
               y: int) -> None:
        self._present(scanout, lambda w: w.set_cursor(image, hot_x, hot_y, x, y))

    def move_cursor(self, scanout: int, x: int, y: int) -> None:
        self._present(scanout, lambda w: w.move_cursor(x, y))

    def reset(self) -> None:
        if self.windows:
            log.info("wayland: closing %d window(s)", len(self.windows))
        for w in list(self.windows.values()):
            w.destroy()
        self.windows.clear()
        self.dismissed.clear()
        self._flush()

    def status(self) -> Mapping[str, object]:
        return {"display": "wayland", "compositor": self.where, "lost": self.lost,
                "linux_dmabuf": self.g.dmabuf is not None,
                "windows": [w.status() for _, w in sorted(self.windows.items())]}

    def close(self) -> None:
        """Windows gone, connection closed (before the interpreter exits: pywayland must not outlive libwayland's
        objects at exit)."""
        if self.lost is None:
            self.reset()
        self.display.disconnect()
