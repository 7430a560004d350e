"""A fast codec derived from a construct layout: one ``struct.Struct`` per layout, made at import.

construct stays the single place a layout is written down (``structs.py``) and the reference the tests hold the
derived codec to; this module only reads a definition and produces the equivalent ``struct`` format, because a
compiled construct parse or build costs 10-40 us per call on the per-command path and ``struct`` costs about 0.1.

A layout is flattened in declaration order: nested structs contribute their fields, fixed arrays one value per
element, ``Bytes(n)`` one bytes value, padding nothing (it is skipped when reading and written as zeros). The
flattened field names are dotted paths (``hdr.fence_id``, ``r.width``, ``strides.2``) so code generators can pair
them with record fields.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from construct import Array, Bytes, Construct, FormatField, Padded, Pass, Renamed, Struct


class LayoutError(TypeError):
    """The layout holds something with no fixed-size ``struct`` equivalent (a variable-length field)."""


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


def _walk(con: Construct[Any, Any], path: str, fmt: list[str], fields: list[str]) -> None:
    if isinstance(con, Renamed):
        _walk(con.subcon, path, fmt, fields)
    elif isinstance(con, FormatField):
        # construct's FormatField carries a struct format such as "<I"; all virtio layouts are little-endian.
        if con.fmtstr[0] != "<":
            raise LayoutError(f"{path}: only little-endian fields are supported, got {con.fmtstr!r}")
        fmt.append(con.fmtstr[1:])
        fields.append(path)
    elif isinstance(con, Padded) and isinstance(con.subcon, type(Pass)):
        # Padding(n) is Padded(n, Pass): reserved bytes, never read, always written as zeros.
        fmt.append(f"{con.sizeof()}x")
    elif isinstance(con, Struct):
        for sub in con.subcons:
            if sub.name is None and not isinstance(sub, Padded):
                raise LayoutError(f"{path}: unnamed field in a struct")
            _walk(sub, f"{path}.{sub.name}" if path else str(sub.name), fmt, fields)
    elif isinstance(con, Array):
        if not isinstance(con.count, int):
            raise LayoutError(f"{path}: variable-length Array")
        for i in range(con.count):
            _walk(con.subcon, f"{path}.{i}", fmt, fields)
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
    _walk(con, "", fmt, fields)
    full = "<" + "".join(fmt)
    st = struct.Struct(full)
    if st.size != con.sizeof():
        raise LayoutError(f"derived format {full!r} is {st.size} bytes, the layout {con.sizeof()}")
    return Flat(full, tuple(fields), st)


def to_values(flat: Flat, obj: Any) -> tuple[Any, ...]:
    """The flat value tuple of a construct-style nested dict/Container (for tests and slow paths)."""
    out = []
    for path in flat.fields:
        v = obj
        for part in path.split("."):
            v = v[int(part)] if part.isdigit() else v[part]
        out.append(v)
    return tuple(out)
