"""Views of construct layouts as numpy dtypes, so ring and table arrays keep construct as their one definition."""

from __future__ import annotations

from typing import Any

import numpy as np
from construct import FormatField, Renamed, Struct

_KIND = {"B": "u", "H": "u", "I": "u", "L": "u", "Q": "u", "b": "i", "h": "i", "i": "i", "l": "i", "q": "i"}


def dtype_of(struct: Struct) -> np.dtype[Any]:
    """A packed numpy dtype with the same fields, offsets and endianness as a construct Struct of plain integers."""
    fields: list[tuple[str, str]] = []
    for sub in struct.subcons:
        if not isinstance(sub, Renamed) or not isinstance(sub.subcon, FormatField):
            raise TypeError(f"{sub!r} is not a named integer field")
        ff = sub.subcon
        order = "<" if ff.fmtstr[0] == "<" else ">" if ff.fmtstr[0] == ">" else "="
        code = ff.fmtstr[-1]
        fields.append((str(sub.name), f"{order}{_KIND[code]}{ff.length}"))
    dt = np.dtype(fields)
    if dt.itemsize != struct.sizeof():
        raise TypeError("layout has padding that a packed dtype cannot express")
    return dt
