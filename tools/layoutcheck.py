"""Verify that our construct layouts match the kernel's own C layouts.

Hand-computed offsets are how wire bugs creep in; the compiler is the authority. This tool compiles a tiny
C file that includes the UAPI headers with ``gcc -g``, reads each struct back from the DWARF debug info,
flattens both sides into ``dotted.name -> (offset, size)`` leaves and compares them. Our side is read from
the same derivation the hot paths use (:mod:`vgpu.vhost_user.layout`), so what is checked is what runs.

Run: ``python tools/layoutcheck.py`` (exit status 1 on any mismatch).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Runnable as a script and importable from tests: both the repository (for vgpu) and this directory (for the
# sibling registry) must be importable.
_HERE = Path(__file__).resolve().parent
for _p in (_HERE.parent, _HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from construct import Construct  # noqa: E402
from elftools.dwarf.dwarf_expr import DWARFExprParser  # noqa: E402
from elftools.elf.elffile import ELFFile  # noqa: E402
from layout_registry import REGISTRY, LayoutEntry  # noqa: E402

from vgpu.vhost_user.layout import LayoutError as ConstructLayoutError  # noqa: E402
from vgpu.vhost_user.layout import flatten  # noqa: E402


class LayoutError(Exception):
    """A layout that this tool cannot flatten (bitfields, variable-length arrays, ...)."""


@dataclass(frozen=True)
class Leaf:
    name: str
    offset: int
    size: int


@dataclass
class Layout:
    size: int
    leaves: list[Leaf] = field(default_factory=list)
    # Byte ranges [start, end) declared as padding (construct side only).
    pads: list[tuple[int, int]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------
# C side: DWARF
# --------------------------------------------------------------------------------------------------------

_QUALIFIERS = {
    "DW_TAG_typedef",
    "DW_TAG_const_type",
    "DW_TAG_volatile_type",
    "DW_TAG_restrict_type",
    "DW_TAG_atomic_type",
}


def _strip(die: Any) -> Any:
    while die.tag in _QUALIFIERS:
        die = die.get_DIE_from_attribute("DW_AT_type")
    return die


def _member_offset(die: Any, expr_parser: Any) -> int:
    attr = die.attributes.get("DW_AT_data_member_location")
    if attr is None:
        return 0  # union members
    if isinstance(attr.value, int):
        return attr.value
    ops = expr_parser.parse_expr(attr.value)
    if len(ops) == 1 and ops[0].op_name == "DW_OP_plus_uconst":
        return int(ops[0].args[0])
    raise LayoutError(f"unsupported member location expression {attr.value!r}")


def _array_dims(die: Any) -> list[int]:
    dims: list[int] = []
    for sub in die.iter_children():
        if sub.tag != "DW_TAG_subrange_type":
            continue
        if "DW_AT_count" in sub.attributes:
            dims.append(int(sub.attributes["DW_AT_count"].value))
        elif "DW_AT_upper_bound" in sub.attributes:
            dims.append(int(sub.attributes["DW_AT_upper_bound"].value) + 1)
        else:
            dims.append(0)  # flexible array member
    return dims


def _type_size(die: Any) -> int:
    die = _strip(die)
    if die.tag == "DW_TAG_array_type":
        n = 1
        for d in _array_dims(die):
            n *= d
        return n * _type_size(die.get_DIE_from_attribute("DW_AT_type"))
    if "DW_AT_byte_size" in die.attributes:
        return int(die.attributes["DW_AT_byte_size"].value)
    if die.tag == "DW_TAG_pointer_type":
        return int(die.cu.header["address_size"])
    raise LayoutError(f"type {die.tag} has no size")


class DwarfLayouts:
    """All named struct definitions of one object file, flattened on demand."""

    def __init__(self, obj_path: Path) -> None:
        self._file = obj_path.open("rb")
        elf = ELFFile(self._file)
        if not elf.has_dwarf_info():
            raise LayoutError(f"{obj_path} has no DWARF")
        dwarf = elf.get_dwarf_info()
        self._expr = DWARFExprParser(dwarf.structs)
        self.structs: dict[str, Any] = {}
        self.enumerators: dict[str, int] = {}
        for cu in dwarf.iter_CUs():
            for die in cu.iter_DIEs():
                if die.tag == "DW_TAG_enumerator":
                    self.enumerators[die.attributes["DW_AT_name"].value.decode()] = int(
                        die.attributes["DW_AT_const_value"].value
                    )
                    continue
                if die.tag != "DW_TAG_structure_type" or "DW_AT_declaration" in die.attributes:
                    continue
                name = die.attributes.get("DW_AT_name")
                if name is not None:
                    self.structs.setdefault(name.value.decode(), die)

    def close(self) -> None:
        self._file.close()

    def layout(self, c_name: str) -> Layout:
        die = self.structs[c_name]
        out = Layout(size=int(die.attributes["DW_AT_byte_size"].value))
        self._flatten_aggregate(die, "", 0, out.leaves)
        return out

    def _flatten_aggregate(self, die: Any, prefix: str, base: int, out: list[Leaf]) -> None:
        for member in die.iter_children():
            if member.tag != "DW_TAG_member":
                continue
            if "DW_AT_bit_size" in member.attributes:
                raise LayoutError(f"bitfield {prefix}{member.attributes['DW_AT_name'].value!r} is unsupported")
            name_attr = member.attributes.get("DW_AT_name")
            # Anonymous struct/union members contribute their fields under the parent's prefix.
            name = prefix + name_attr.value.decode() if name_attr is not None else prefix.rstrip(".")
            offset = base + _member_offset(member, self._expr)
            self._flatten_type(member.get_DIE_from_attribute("DW_AT_type"), name, offset, out)

    def _flatten_type(self, die: Any, name: str, offset: int, out: list[Leaf]) -> None:
        die = _strip(die)
        if die.tag in ("DW_TAG_structure_type", "DW_TAG_union_type"):
            self._flatten_aggregate(die, f"{name}." if name else "", offset, out)
        elif die.tag == "DW_TAG_array_type":
            self._flatten_array(die.get_DIE_from_attribute("DW_AT_type"), _array_dims(die), name, offset, out)
        else:
            out.append(Leaf(name, offset, _type_size(die)))

    def _flatten_array(self, elem: Any, dims: list[int], name: str, offset: int, out: list[Leaf]) -> None:
        count, rest = dims[0], dims[1:]
        if count == 0:
            return  # flexible array member: not part of the fixed layout
        if rest:
            stride = _type_size(elem) * _product(rest)
            for i in range(count):
                self._flatten_array(elem, rest, f"{name}[{i}]", offset + i * stride, out)
            return
        esize = _type_size(elem)
        if _strip(elem).tag not in ("DW_TAG_structure_type", "DW_TAG_union_type") and esize == 1:
            out.append(Leaf(name, offset, count))  # byte/char arrays are one opaque field
            return
        for i in range(count):
            self._flatten_type(elem, f"{name}[{i}]", offset + i * esize, out)


def _product(xs: Iterable[int]) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


def compile_headers(headers: Sequence[str], workdir: Path, cc: str | None = None) -> Path:
    """Compile a translation unit that only includes ``headers``; keep every type in the debug info."""
    src = workdir / "layouts.c"
    lines = ["#include <linux/types.h>"] + [f"#include <{h}>" for h in dict.fromkeys(headers)]
    src.write_text("\n".join(lines) + "\n")
    obj = workdir / "layouts.o"
    compiler = cc or os.environ.get("CC", "gcc")
    cmd = [compiler, "-g", "-c", "-fno-eliminate-unused-debug-types", "-o", str(obj), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LayoutError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return obj


# --------------------------------------------------------------------------------------------------------
# construct side
# --------------------------------------------------------------------------------------------------------


_FORMAT_ITEM = re.compile(r"(\d*)([xcbB?hHiIlLqQnNefdsp])")


def _c_name(path: str) -> str:
    """``hdr.fence_id`` stays, ``strides.2`` becomes ``strides[2]`` (how the DWARF side names array elements)."""
    out = ""
    for part in path.split("."):
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def construct_layout(con: Construct[Any, Any]) -> Layout:
    """Our side, read from the project's one derivation of layouts (:func:`vgpu.vhost_user.layout.flatten`): the
    flat ``struct`` format gives every field's offset and size and every padding run, in declaration order. An
    array of single bytes is one field, as C's ``char name[N]`` is on the DWARF side."""
    try:
        flat = flatten(con)
    except ConstructLayoutError as e:
        raise LayoutError(str(e)) from e
    out = Layout(size=flat.size)
    names = iter(flat.fields)
    offset = 0
    for count, code in _FORMAT_ITEM.findall(flat.fmt[1:]):
        n = int(count or 1)
        if code == "x":
            out.pads.append((offset, offset + n))
            offset += n
        elif code == "s":
            out.leaves.append(Leaf(_c_name(next(names)), offset, n))
            offset += n
        else:
            size = struct.calcsize("<" + code)
            for _ in range(n):
                out.leaves.append(Leaf(_c_name(next(names)), offset, size))
                offset += size
    out.leaves = _byte_arrays_whole(out.leaves)
    return out


def _byte_arrays_whole(leaves: list[Leaf]) -> list[Leaf]:
    """Runs ``x[0]``, ``x[1]``, ... of one-byte leaves become one leaf ``x``."""
    merged: list[Leaf] = []
    for leaf in leaves:
        base, bracket, _ = leaf.name.rpartition("[")
        prev = merged[-1] if merged else None
        if bracket and leaf.size == 1 and leaf.name.endswith("]"):
            if prev is not None and prev.name == base and prev.offset + prev.size == leaf.offset:
                merged[-1] = Leaf(base, prev.offset, prev.size + 1)
                continue
            if leaf.name == f"{base}[0]":
                merged.append(Leaf(base, leaf.offset, 1))
                continue
        merged.append(leaf)
    return merged


# --------------------------------------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    entry: LayoutEntry
    c_size: int | None
    our_size: int | None
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def _map_name(name: str, field_map: Mapping[str, str]) -> str:
    if name in field_map:
        return field_map[name]
    parts = []
    for part in name.split("."):
        base, bracket, rest = part.partition("[")
        parts.append(field_map.get(base, base) + bracket + rest)
    return ".".join(parts)


def _covered(start: int, end: int, pads: list[tuple[int, int]]) -> bool:
    return all(any(a <= b < z for a, z in pads) for b in range(start, end))


def compare(c: Layout, ours: Layout, field_map: Mapping[str, str] | None = None) -> list[str]:
    """Every problem found, as human-readable lines; empty means identical layouts."""
    problems: list[str] = []
    if c.size != ours.size:
        problems.append(f"size: C {c.size} != ours {ours.size}")
    fmap = field_map or {}
    our_by_name: dict[str, Leaf] = {}
    for leaf in ours.leaves:
        our_by_name[_map_name(leaf.name, fmap)] = leaf
    c_names: set[str] = set()
    for cl in c.leaves:
        if cl.size == 0:
            continue
        c_names.add(cl.name)
        mine = our_by_name.get(cl.name)
        if mine is None:
            last = cl.name.rsplit(".", 1)[-1]
            if "pad" in last and _covered(cl.offset, cl.offset + cl.size, ours.pads):
                continue
            problems.append(f"{cl.name}: in C at {cl.offset}+{cl.size}, missing in ours")
        elif (mine.offset, mine.size) != (cl.offset, cl.size):
            problems.append(f"{cl.name}: C at {cl.offset}+{cl.size}, ours ({mine.name}) at {mine.offset}+{mine.size}")
    for mapped, leaf in our_by_name.items():
        if mapped not in c_names:
            problems.append(f"{leaf.name}: ours at {leaf.offset}+{leaf.size}, not in C")
    return problems


def resolve(ours: Construct[Any, Any] | str) -> Construct[Any, Any]:
    if not isinstance(ours, str):
        return ours
    module, _, attr = ours.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    if not isinstance(obj, Construct):
        raise LayoutError(f"{ours} is not a construct")
    return obj


def check_entries(entries: Sequence[LayoutEntry], cc: str | None = None) -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="layoutcheck-") as tmp:
        obj = compile_headers([e.header for e in entries], Path(tmp), cc)
        dwarf = DwarfLayouts(obj)
        try:
            return [_check_one(e, dwarf) for e in entries]
        finally:
            dwarf.close()


def check_objects(entries: Sequence[LayoutEntry], directory: Path) -> list[Result]:
    """Entries against already-built objects in ``directory`` (``entry.header`` names the object): the structs as
    a kernel compiled them, with its own configuration and flags, instead of headers compiled here."""
    results: dict[int, Result] = {}
    for name in dict.fromkeys(e.header for e in entries):
        dwarf = DwarfLayouts(directory / name)
        try:
            for i, e in enumerate(entries):
                if e.header == name:
                    results[i] = _check_one(e, dwarf)
        finally:
            dwarf.close()
    return [results[i] for i in range(len(entries))]


def _check_one(entry: LayoutEntry, dwarf: DwarfLayouts) -> Result:
    c_layout: Layout | None = None
    our_layout: Layout | None = None
    problems: list[str] = []
    if entry.c_name not in dwarf.structs:
        problems.append(f"struct {entry.c_name} not found in {entry.header}")
    else:
        try:
            c_layout = dwarf.layout(entry.c_name)
        except LayoutError as e:
            problems.append(f"C side: {e}")
    try:
        our_layout = construct_layout(resolve(entry.ours))
    except (ImportError, AttributeError) as e:
        problems.append(f"MISSING ours {entry.ours_label}: {e}")
    except LayoutError as e:
        problems.append(f"ours: {e}")
    if c_layout is not None and our_layout is not None:
        problems += compare(c_layout, our_layout, entry.field_map)
    return Result(
        entry,
        c_layout.size if c_layout else None,
        our_layout.size if our_layout else None,
        problems,
    )


def struct_names(headers: Sequence[str], prefix: str = "", cc: str | None = None) -> set[str]:
    """Names of every struct the headers define (for registry-coverage checks)."""
    with tempfile.TemporaryDirectory(prefix="layoutcheck-") as tmp:
        dwarf = DwarfLayouts(compile_headers(headers, Path(tmp), cc))
        try:
            return {n for n in dwarf.structs if n.startswith(prefix)}
        finally:
            dwarf.close()


_MACRO_VALUE = re.compile(r"^[\s()0-9a-fA-FxXuUlL<|+]*$")


def c_constants(headers: Sequence[str], prefix: str, cc: str | None = None) -> dict[str, int]:
    """Integer ``#define``s and enumerators whose names start with ``prefix``, as the compiler sees them.

    Macros come from ``-dM -E``; only plain integer expressions (literals, shifts, ``|``) are evaluated, and
    anything else (include guards, function-like macros) is skipped.
    """
    compiler = cc or os.environ.get("CC", "gcc")
    src = "".join(f"#include <{h}>\n" for h in ["linux/types.h", *headers])
    proc = subprocess.run(
        [compiler, "-dM", "-E", "-x", "c", "-"], input=src, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise LayoutError(f"preprocessing failed:\n{proc.stderr}")
    out: dict[str, int] = {}
    for line in proc.stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) != 3 or parts[0] != "#define" or not parts[1].startswith(prefix) or "(" in parts[1]:
            continue
        expr = parts[2].strip()
        if not expr or not _MACRO_VALUE.match(expr):
            continue
        out[parts[1]] = int(eval(re.sub(r"(?<=[0-9a-fA-F])[uUlL]+", "", expr), {"__builtins__": {}}))
    with tempfile.TemporaryDirectory(prefix="layoutcheck-") as tmp:
        dwarf = DwarfLayouts(compile_headers(headers, Path(tmp), cc))
        try:
            out.update({n: v for n, v in dwarf.enumerators.items() if n.startswith(prefix)})
        finally:
            dwarf.close()
    return out


def format_table(results: Sequence[Result], verbose: bool = False) -> str:
    rows = [("struct", "C size", "ours", "result")]
    for r in results:
        rows.append(
            (
                r.entry.c_name,
                "-" if r.c_size is None else str(r.c_size),
                "-" if r.our_size is None else str(r.our_size),
                "ok" if r.ok else "MISMATCH",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    for r in results:
        if not r.ok or verbose:
            lines += [f"  {r.entry.c_name}: {p}" for p in r.problems]
    bad = sum(not r.ok for r in results)
    lines.append(f"{len(results)} structs checked, {bad} mismatched")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--cc", help="C compiler (default: $CC or gcc)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    try:
        results = check_entries(REGISTRY, args.cc)
    except LayoutError as e:
        print(f"layoutcheck: {e}", file=sys.stderr)
        return 2
    print(format_table(results, args.verbose))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
