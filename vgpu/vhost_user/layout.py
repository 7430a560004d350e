"""Forms derived from construct layouts: a ``struct.Struct`` for the hot paths and a numpy dtype for arrays of
records, so construct stays the one place a layout is written down.

This is the project's only such derivation: the vhost-user wire (host-endian) and the virtio-gpu protocol
(little-endian) both use it. It lives here because this package imports nothing else from vgpu, so the protocol
package may depend on it without a cycle.

A layout is flattened in declaration order: nested structs contribute their fields, fixed arrays one value per
element, ``Bytes(n)`` one bytes value, padding nothing (skipped when reading, zeros when writing), a ``Default``
its field. ``tools/layoutcheck.py`` reads the same flattening to compare our layouts with the kernel's. Flattened names
are dotted paths (``hdr.fence_id``, ``r.width``, ``strides.2``) so code generators can pair them with record fields.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from construct import Array, Bytes, Construct, Default, FormatField, Padded, Pass, Renamed, Struct


class LayoutError(TypeError):
    """The layout holds something with no fixed-size equivalent (a variable-length field), or mixes byte orders."""


@dataclass(frozen=True)
class Flat:
    """The flattened form of one layout: ``struct`` format, field paths, and the compiled ``struct.Struct``."""

    fmt: str
    fields: tuple[str, ...]
    st: struct.Struct

    @property
    def size(self) -> int:
        return self.st.size

    def index(self, path: str) -> int:
        return self.fields.index(path)


def _is_padding(con: Construct[Any, Any]) -> bool:
    # Padding(n) is Padded(n, Pass): reserved bytes, never read, always written as zeros.
    return isinstance(con, Padded) and isinstance(con.subcon, type(Pass))


def _walk(con: Construct[Any, Any], path: str, fmt: list[str], fields: list[str], orders: set[str]) -> None:
    if isinstance(con, Renamed | Default):
        # A default matters only when construct builds without the value; the bytes are the subcon's.
        _walk(con.subcon, path, fmt, fields, orders)
    elif isinstance(con, FormatField):
        # construct's FormatField carries a struct format such as "<I" (little-endian) or "=Q" (native).
        orders.add(con.fmtstr[0])
        fmt.append(con.fmtstr[1:])
        fields.append(path)
    elif _is_padding(con):
        fmt.append(f"{con.sizeof()}x")
    elif isinstance(con, Struct):
        for sub in con.subcons:
            if sub.name is None and not _is_padding(sub):
                raise LayoutError(f"{path}: unnamed field in a struct")
            _walk(sub, f"{path}.{sub.name}" if path else str(sub.name), fmt, fields, orders)
    elif isinstance(con, Array):
        if not isinstance(con.count, int):
            raise LayoutError(f"{path}: variable-length Array")
        for i in range(con.count):
            _walk(con.subcon, f"{path}.{i}", fmt, fields, orders)
    elif isinstance(con, Bytes):
        if not isinstance(con.length, int):
            raise LayoutError(f"{path}: variable-length Bytes")
        fmt.append(f"{con.length}s")
        fields.append(path)
    else:
        raise LayoutError(f"{path}: {type(con).__name__} has no fixed struct equivalent")


def flatten(con: Construct[Any, Any]) -> Flat:
    fmt: list[str] = []
    fields: list[str] = []
    orders: set[str] = set()
    _walk(con, "", fmt, fields, orders)
    if len(orders) > 1:
        raise LayoutError(f"mixed byte orders {sorted(orders)}")
    full = (orders.pop() if orders else "<") + "".join(fmt)
    st = struct.Struct(full)
    if st.size != con.sizeof():
        raise LayoutError(f"derived format {full!r} is {st.size} bytes, the layout {con.sizeof()}")
    return Flat(full, tuple(fields), st)


def struct_of(con: Construct[Any, Any]) -> struct.Struct:
    return flatten(con).st


def to_values(flat: Flat, obj: Any) -> tuple[Any, ...]:
    """The flat value tuple of a construct-style nested dict/Container (for tests and slow paths)."""
    out = []
    for path in flat.fields:
        v = obj
        for part in path.split("."):
            v = v[int(part)] if part.isdigit() else v[part]
        out.append(v)
    return tuple(out)


_KINDS = {"B": "u1", "H": "u2", "I": "u4", "L": "u4", "Q": "u8", "b": "i1", "h": "i2", "i": "i4", "l": "i4",
          "q": "i8", "e": "f2", "f": "f4", "d": "f8"}


def _element_dtype(con: Construct[Any, Any]) -> np.dtype[Any]:
    if isinstance(con, Renamed):
        return _element_dtype(con.subcon)
    if isinstance(con, FormatField):
        code = con.fmtstr[-1]
        if code not in _KINDS:
            raise LayoutError(f"unsupported struct format {con.fmtstr!r}")
        order = {"<": "<", ">": ">"}.get(con.fmtstr[0], "=")
        return np.dtype(order + _KINDS[code])
    if isinstance(con, Struct):
        return dtype_of(con)
    if isinstance(con, Bytes) and isinstance(con.length, int):
        return np.dtype(f"V{con.length}")
    if isinstance(con, Array) and isinstance(con.count, int):
        return np.dtype((_element_dtype(con.subcon), (con.count,)))
    raise LayoutError(f"cannot map {type(con).__name__} to a numpy dtype")


def dtype_of(con: Struct) -> np.dtype[Any]:
    """A structured dtype with the same field names, offsets and item size as ``con``; padding is a gap (no
    field), so reading an array through the dtype never exposes reserved bytes."""
    names: list[str] = []
    formats: list[np.dtype[Any]] = []
    offsets: list[int] = []
    offset = 0
    for sub in con.subcons:
        size = sub.sizeof()
        inner = sub.subcon if isinstance(sub, Renamed) else sub
        if _is_padding(inner):
            offset += size
            continue
        if sub.name is None:
            raise LayoutError("unnamed non-padding field has no dtype name")
        names.append(sub.name)
        formats.append(_element_dtype(inner))
        offsets.append(offset)
        offset += size
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": offset})
