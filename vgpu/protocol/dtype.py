"""Derive numpy dtypes from construct structs, so bulk arrays (mem_entry lists) are decoded at C speed
while construct stays the one place a layout is written down.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from construct import Array, Bytes, Construct, FormatField, Padded, Pass, Renamed, Struct


class DtypeError(TypeError):
    """The struct contains something that has no fixed-size numpy equivalent."""


def _format_dtype(field: FormatField[Any, Any]) -> np.dtype[Any]:
    fmt = field.fmtstr
    endian = {"<": "<", ">": ">", "=": "="}.get(fmt[0], "=")
    code = fmt[-1]
    kinds = {
        "B": "u1", "H": "u2", "L": "u4", "I": "u4", "Q": "u8",
        "b": "i1", "h": "i2", "l": "i4", "i": "i4", "q": "i8",
        "e": "f2", "f": "f4", "d": "f8",
    }  # fmt: skip
    if code not in kinds:
        raise DtypeError(f"unsupported struct format {fmt!r}")
    return np.dtype(endian + kinds[code])


def _element_dtype(con: Construct[Any, Any]) -> np.dtype[Any]:
    if isinstance(con, Renamed):
        return _element_dtype(con.subcon)
    if isinstance(con, FormatField):
        return _format_dtype(con)
    if isinstance(con, Struct):
        return struct_dtype(con)
    if isinstance(con, Bytes) and isinstance(con.length, int):
        return np.dtype(f"V{con.length}")
    if isinstance(con, Array):
        count = con.count
        if not isinstance(count, int):
            raise DtypeError("variable-length Array has no fixed dtype")
        return np.dtype((_element_dtype(con.subcon), (count,)))
    raise DtypeError(f"cannot map {type(con).__name__} to a numpy dtype")


def struct_dtype(con: Struct) -> np.dtype[Any]:
    """Build a structured dtype with the same field names, offsets and item size as ``con``.

    Padding becomes a gap (no field), so reading an array through the dtype never exposes reserved bytes.
    """
    names: list[str] = []
    formats: list[np.dtype[Any]] = []
    offsets: list[int] = []
    offset = 0
    for sub in con.subcons:
        size = sub.sizeof()
        inner = sub.subcon if isinstance(sub, Renamed) else sub
        if isinstance(inner, Padded) and isinstance(inner.subcon, type(Pass)):
            offset += size
            continue
        if sub.name is None:
            raise DtypeError("unnamed non-padding field has no dtype name")
        names.append(sub.name)
        formats.append(_element_dtype(inner))
        offsets.append(offset)
        offset += size
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": offset})
