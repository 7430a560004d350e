"""The requirement catalogue (`spec/requirements.toml`): what a back end is held to, where each rule comes from,
and which checks test it.

The catalogue is data rather than code so that a reader can audit coverage against the specs without reading the
checks, and so that the test suite can hold the two in step (every entry has a check, every check an entry).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

DEFAULT_CATALOGUE: Final = Path(__file__).resolve().parent.parent.parent / "spec" / "requirements.toml"
KINDS: Final = frozenset({"normative", "convention"})
# Feature tokens an entry may need; the runner decides applicability from them (see `Offer.missing`).
FEATURE_PREFIXES: Final = ("virtio:", "proto:", "capset:", "shm:", "scanouts:", "program:")


class CatalogueError(Exception):
    pass


@dataclass(frozen=True)
class Requirement:
    id: str
    source: str
    refs: tuple[str, ...]
    kind: str
    feature: tuple[str, ...]
    text: str
    checks: tuple[str, ...]


@dataclass(frozen=True)
class Exclusion:
    """A numbered rule of the reference (§D item, GPU-DEV/DRV, VU) deliberately not catalogued, and why."""

    ref: str
    reason: str


@dataclass(frozen=True)
class Catalogue:
    requirements: tuple[Requirement, ...]
    exclusions: tuple[Exclusion, ...]

    def get(self, req_id: str) -> Requirement:
        for r in self.requirements:
            if r.id == req_id:
                return r
        raise KeyError(req_id)

    @property
    def referenced(self) -> set[str]:
        return {ref for r in self.requirements for ref in r.refs}


def _str(entry: dict[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise CatalogueError(f"{where}: '{key}' must be a non-empty string")
    return value.strip()


def _strs(entry: dict[str, Any], key: str, where: str, allow_empty: bool = False) -> tuple[str, ...]:
    value = entry.get(key, [] if allow_empty else None)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise CatalogueError(f"{where}: '{key}' must be a list of strings")
    if not value and not allow_empty:
        raise CatalogueError(f"{where}: '{key}' must not be empty")
    return tuple(value)


def parse(data: dict[str, Any]) -> Catalogue:
    reqs: list[Requirement] = []
    seen: set[str] = set()
    for i, e in enumerate(data.get("requirement", [])):
        where = f"requirement #{i + 1}"
        rid = _str(e, "id", where)
        where = f"requirement {rid}"
        if rid in seen:
            raise CatalogueError(f"{where}: duplicate id")
        seen.add(rid)
        kind = _str(e, "kind", where)
        if kind not in KINDS:
            raise CatalogueError(f"{where}: kind {kind!r} is not one of {sorted(KINDS)}")
        feature = _strs(e, "feature", where, allow_empty=True)
        for f in feature:
            if not f.startswith(FEATURE_PREFIXES):
                raise CatalogueError(f"{where}: unknown feature token {f!r}")
        unknown = set(e) - {"id", "source", "refs", "kind", "feature", "text", "checks"}
        if unknown:
            raise CatalogueError(f"{where}: unknown keys {sorted(unknown)}")
        reqs.append(Requirement(rid, _str(e, "source", where), _strs(e, "refs", where), kind, feature,
                                " ".join(_str(e, "text", where).split()), _strs(e, "checks", where, True)))
    excl = [Exclusion(_str(e, "ref", "exclusion"), " ".join(_str(e, "reason", "exclusion").split()))
            for e in data.get("excluded", [])]
    return Catalogue(tuple(reqs), tuple(excl))


def load(path: Path = DEFAULT_CATALOGUE) -> Catalogue:
    with open(path, "rb") as f:
        return parse(tomllib.load(f))
