"""Give a finished connection's memory back to the system, so an idle back end is as small as a fresh one.

Why: a session's large buffers (a guest's framebuffer copies, display frames, PNG rows) are freed when it ends,
but glibc keeps freed heap memory for reuse, and its mmap threshold rises after the first large free, so later
large buffers come from that heap too: an idle back end that served a guest stays several MB above one that
never did, for as long as it waits. One ``gc.collect()`` (a session's objects may sit in cycles) and one
``malloc_trim(0)`` per disconnect return it; both cost about a millisecond, once per VMM. Elsewhere than glibc
only the collection runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable

_trim: Callable[[int], int] | None = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    _trim = _libc.malloc_trim
    _trim.argtypes = [ctypes.c_size_t]
    _trim.restype = ctypes.c_int
except (OSError, AttributeError):  # not glibc
    _trim = None


def release_freed_memory() -> None:
    """Collect cycles and return free heap pages to the kernel."""
    gc.collect()
    if _trim is not None:
        _trim(0)
