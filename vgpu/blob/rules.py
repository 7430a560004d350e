"""Operator rules: what an operator asserts about exporters the kernel and our allocators cannot vouch for.

Why a file and not a built-in table: an operator who knows their hardware (say, that a given exporter's buffers
are write-combined) is a better source than any guess baked into vgpu, and their assertion must be visible as
*theirs* — every decision a rule makes names the rule and the file it came from. The format is TOML::

    # /etc/vgpu/cache.toml
    [exporters]          # keyed by the dma-buf exp_name (/proc/<pid>/fdinfo/<fd>)
    udmabuf = "cached"
    drm = "wc"

    [drm_drivers]        # keyed by the DRM driver behind a PRIME export (exp_name "drm" cannot tell them apart)
    vgem = "wc"
    i915 = "cached"

A DRM-driver rule is more specific than an exporter rule and wins over it. Anything else in the file (an unknown
table, a value other than cached/wc/uncached) is an error, because a typo must not silently drop a rule.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .types import CacheAttr

EXPORTERS = "exporters"
ALLOCATOR_OVERRIDES = "allocator_overrides"
DRM_DRIVERS = "drm_drivers"
VALUES: Mapping[str, CacheAttr] = {"cached": CacheAttr.CACHED, "wc": CacheAttr.WC, "uncached": CacheAttr.UNCACHED}


class RulesError(ValueError):
    """The rules file cannot be used; the message names the file and the offending key."""


@dataclass(frozen=True)
class Rule:
    table: str
    name: str
    attr: CacheAttr
    source: str

    def describe(self) -> str:
        return f"rule {self.table}.{self.name} = {self.attr.name.lower()} in {self.source}"


@dataclass(frozen=True)
class OperatorRules:
    source: str
    exporters: Mapping[str, Rule] = field(default_factory=dict)
    drm_drivers: Mapping[str, Rule] = field(default_factory=dict)
    # [allocator_overrides]: the operator says better than our allocator table how one allocator's buffers are
    # mapped on this host (or wants the guest to see another attribute, e.g. to test its WC path).  Only the
    # kernel's own answer outranks an override, and the provenance says it was one.
    allocator_overrides: Mapping[str, Rule] = field(default_factory=dict)

    def override(self, allocator: str) -> Rule | None:
        return self.allocator_overrides.get(allocator)

    def match(self, exporter: str | None, drm_driver: str | None) -> Rule | None:
        """The rule for this buffer, the DRM driver's first; None when no rule names it."""
        if drm_driver is not None and drm_driver in self.drm_drivers:
            return self.drm_drivers[drm_driver]
        if exporter is not None and exporter in self.exporters:
            return self.exporters[exporter]
        return None

    def __len__(self) -> int:
        return len(self.exporters) + len(self.drm_drivers) + len(self.allocator_overrides)


def _table(doc: Mapping[str, Any], key: str, source: str) -> dict[str, Rule]:
    raw = doc.get(key, {})
    if not isinstance(raw, dict):
        raise RulesError(f"{source}: [{key}] must be a table of name = \"cached\"|\"wc\"|\"uncached\"")
    rules: dict[str, Rule] = {}
    for name, value in raw.items():
        if not name:
            raise RulesError(f"{source}: [{key}] has an empty name")
        if not isinstance(value, str):
            raise RulesError(f"{source}: {key}.{name} must be a string (cached, wc or uncached), not {value!r}")
        attr = VALUES.get(value.strip().lower())
        if attr is None:
            raise RulesError(f"{source}: {key}.{name} = {value!r} is not one of {', '.join(VALUES)}")
        rules[name] = Rule(key, name, attr, source)
    return rules


def parse_rules(text: str, source: str = "<rules>") -> OperatorRules:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"{source}: not valid TOML: {exc}") from exc
    unknown = sorted(set(doc) - {EXPORTERS, DRM_DRIVERS, ALLOCATOR_OVERRIDES})
    if unknown:
        raise RulesError(f"{source}: unknown key(s) {', '.join(unknown)} "
                         f"(expected [{EXPORTERS}], [{DRM_DRIVERS}] and [{ALLOCATOR_OVERRIDES}])")
    return OperatorRules(source, _table(doc, EXPORTERS, source), _table(doc, DRM_DRIVERS, source),
                         _table(doc, ALLOCATOR_OVERRIDES, source))


def load_rules(path: str | Path) -> OperatorRules:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError(f"{path}: cannot read the rules file: {exc}") from exc
    return parse_rules(text, str(path))
