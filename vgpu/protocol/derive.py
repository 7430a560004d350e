"""Decoders and encoders generated from each command class and the construct layout it names.

For every class in ``commands`` the generator pairs the record's fields with the layout's flattened fields
(``codec.flatten``) by name and writes two small functions — values → record and record → bytes — as source
text compiled once at import, the way construct compiles its own parsers. The rules, in one place:

* ``hdr`` and every field whose type is a record (``Rect``, ``Box``, ``CursorPos``) take the nested struct of
  the same name, field by field in the record's order;
* a ``tuple`` field takes the fixed array of the same name;
* ``entries`` (``MemEntries``) is the variable tail counted by the layout's ``nr_entries``, and ``data`` (bytes)
  the tail counted by ``size``: the counts are derived from the tails when encoding, so they cannot disagree;
* a ``bytes`` field takes the fixed ``Bytes`` field of the same name; ``CLIPPED`` names the one whose length
  the request itself states (CTX_CREATE's ``debug_name``, ``nlen`` bytes);
* layout fields no record field claims are ignored when decoding and written as zero (MOVE_CURSOR shares
  UPDATE_CURSOR's layout and the spec tells the device to ignore the rest).

Any record field the rules cannot place is an error at import, so a record and its layout cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..vhost_user.layout import Flat, flatten
from . import commands as c
from .constants import CtrlType
from .errors import CommandError
from .mem_entries import MEM_ENTRY_SIZE, MemEntries
from .records import Box, CtrlHdr, CursorPos, Rect

# Upper bound on scatter-gather entries per request. 16384 4-KiB pages cover 64 MiB with no merging; Linux
# merges contiguous pages, so real framebuffers need far fewer. It bounds work per request, not resource size.
MAX_MEM_ENTRIES = 16384

_RECORDS: dict[type, str] = {CtrlHdr: "CtrlHdr", Rect: "Rect", Box: "Box", CursorPos: "CursorPos"}
# Tails: record field -> the layout field that counts it.
_TAILS = {"entries": "nr_entries", "data": "size"}
CLIPPED = {"debug_name": "nlen"}

Decoder = Callable[[tuple[Any, ...], memoryview], c.Command]
Encoder = Callable[[Any], bytes]


@dataclass(frozen=True)
class Derived:
    cls: type[c.Command]
    flat: Flat
    decode: Decoder
    encode: Encoder


def _entries(nr_entries: int, tail: memoryview) -> MemEntries:
    if nr_entries > MAX_MEM_ENTRIES:
        raise CommandError(CtrlType.RESP_ERR_INVALID_PARAMETER,
                           f"nr_entries {nr_entries} exceeds the limit of {MAX_MEM_ENTRIES}")
    need = nr_entries * MEM_ENTRY_SIZE
    if len(tail) < need:
        raise CommandError(CtrlType.RESP_ERR_INVALID_PARAMETER,
                           f"nr_entries {nr_entries} needs {need} bytes of mem_entry, request has {len(tail)}")
    return MemEntries.from_wire(tail[:need], nr_entries)


def _data(size: int, tail: memoryview) -> bytes:
    if size > len(tail):
        raise CommandError(CtrlType.RESP_ERR_INVALID_PARAMETER,
                           f"SUBMIT_3D size {size} exceeds the {len(tail)} bytes that follow the header")
    return bytes(tail[:size])


def _pad(value: bytes, size: int) -> bytes:
    if len(value) > size:
        raise ValueError(f"{len(value)} bytes do not fit a {size}-byte field")
    return value


def _generate(cls: type[c.Command]) -> Derived:
    flat = flatten(cls.LAYOUT)
    index = {name: i for i, name in enumerate(flat.fields)}
    hints = typing.get_type_hints(cls)
    zeros = flat.st.unpack(bytes(flat.size))
    args: list[str] = []  # decoder: one expression per record field
    enc: dict[int, str] = {}  # encoder: flat index -> expression
    tail_enc = ""
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if kind in _RECORDS:
            subs = [g.name for g in dataclasses.fields(kind)]
            idx = [index[f"{f.name}.{sub}"] for sub in subs]
            args.append(f"{_RECORDS[kind]}({', '.join(f'v[{i}]' for i in idx)})")
            for i, sub in zip(idx, subs, strict=True):
                enc[i] = f"m.{f.name}.{sub}"
        elif f.name in _TAILS:
            count = index[_TAILS[f.name]]
            args.append(f"_{f.name}(v[{count}], tail)")
            enc[count] = f"len(m.{f.name})"
            tail_enc = " + m.entries.to_wire()" if f.name == "entries" else " + m.data"
        elif typing.get_origin(kind) is tuple:
            idx = [i for name, i in index.items() if name.startswith(f"{f.name}.")]
            args.append(f"({', '.join(f'v[{i}]' for i in idx)},)")
            for n, i in enumerate(idx):
                enc[i] = f"m.{f.name}[{n}]"
        elif f.name in CLIPPED:
            i, n = index[f.name], index[CLIPPED[f.name]]
            args.append(f"v[{i}][:v[{n}]]")
            enc[i] = f"_pad(m.{f.name}, {len(zeros[i])})"
        elif kind is bytes:
            i = index[f.name]
            args.append(f"v[{i}]")
            enc[i] = f"_pad(m.{f.name}, {len(zeros[i])})"
        elif f.name in index:
            args.append(f"v[{index[f.name]}]")
            enc[index[f.name]] = f"m.{f.name}"
        else:
            raise TypeError(f"{cls.__name__}.{f.name} has no field in its layout")
    values = [enc.get(i, repr(zeros[i])) for i in range(len(flat.fields))]
    name = cls.__name__
    src = (f"def decode_{name}(v, tail):\n    return {name}({', '.join(args)})\n"
           f"def encode_{name}(m):\n    return pack({', '.join(values)}){tail_enc}\n")
    namespace: dict[str, Any] = {name: cls, "pack": flat.st.pack, "_entries": _entries, "_data": _data,
                                 "_pad": _pad, **{v: k for k, v in _RECORDS.items()}}
    exec(compile(src, f"<derived {name}>", "exec"), namespace)
    return Derived(cls, flat, namespace[f"decode_{name}"], namespace[f"encode_{name}"])


DERIVED: dict[type[c.Command], Derived] = {cls: _generate(cls) for cls in c.COMMAND_CLASSES}
BY_TYPE: dict[int, Derived] = {int(cls.TYPE): d for cls, d in DERIVED.items()}
