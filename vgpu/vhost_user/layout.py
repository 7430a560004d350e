"""Views of construct layouts as numpy dtypes and ``struct`` formats, so ring and table accesses keep construct
as their one definition (this package imports nothing else from vgpu, so it derives its own small forms)."""

from __future__ import annotations

import struct as _struct
from typing import Any

import numpy as np
from construct import FormatField, Padded, Pass, Renamed, Struct

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


def struct_of(layout: Struct) -> _struct.Struct:
    """A ``struct.Struct`` with the same fields, in order, as a construct Struct of integers and padding (all of
    one byte order: vhost-user is host-endian, virtio little-endian); padding is skipped on read, zero on write."""
    codes: list[str] = []
    orders = set()
    for sub in layout.subcons:
        if isinstance(sub, Padded) and isinstance(sub.subcon, type(Pass)):
            codes.append(f"{sub.sizeof()}x")
            continue
        if not isinstance(sub, Renamed) or not isinstance(sub.subcon, FormatField):
            raise TypeError(f"{sub!r} is not a named integer field")
        orders.add(sub.subcon.fmtstr[0])
        codes.append(sub.subcon.fmtstr[1:])
    if len(orders) > 1:
        raise TypeError(f"mixed byte orders {sorted(orders)}")
    st = _struct.Struct((orders.pop() if orders else "=") + "".join(codes))
    if st.size != layout.sizeof():
        raise TypeError("layout size differs from its struct format")
    return st
