"""The checks by name: a check is a function that drives a back end and either returns (pass, with an optional
note), raises `CheckFailed` with what it observed, or raises `NotApplicable` with the reason (`errors`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from .context import CheckContext

CheckFn = Callable[[CheckContext], "str | None"]


@dataclass(frozen=True)
class Check:
    name: str
    requirement: str
    fn: CheckFn
    doc: str


CHECKS: dict[str, Check] = {}


def check(requirement: str, name: str) -> Callable[[CheckFn], CheckFn]:
    """Register `fn` as check `name`, testing catalogue entry `requirement`."""

    def register(fn: CheckFn) -> CheckFn:
        if name in CHECKS:
            raise ValueError(f"check {name} registered twice")
        CHECKS[name] = Check(name, requirement, fn, (fn.__doc__ or "").strip())
        return fn

    return register


def all_checks() -> dict[str, Check]:
    """Every check, with their modules imported (registration happens at import)."""
    for module in ("cases", "checks_gpu", "checks_scanout", "checks_blob", "checks_vhost", "checks_program"):
        importlib.import_module(f"{__package__}.{module}")
    return CHECKS
