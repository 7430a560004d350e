"""Checks and how they report: a check is a function that drives a back end and either returns (pass, with an
optional note), raises `CheckFailed` with what it observed, or raises `NotApplicable` with the reason."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .context import CheckContext


class CheckFailed(Exception):
    """The back end did not do what the requirement asks; `observed` holds the bytes that show it."""

    def __init__(self, message: str, observed: bytes | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.observed = observed


class NotApplicable(Exception):
    """The back end does not offer what the check needs (decided from what it advertises, never from failures)."""


CheckFn = Callable[["CheckContext"], "str | None"]


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


def expect(cond: bool, message: str, observed: bytes | None = None) -> None:
    if not cond:
        raise CheckFailed(message, observed)


def all_checks() -> dict[str, Check]:
    """Every check, with their modules imported (registration happens at import)."""
    for module in ("cases", "checks_gpu", "checks_scanout", "checks_blob", "checks_vhost", "checks_program"):
        importlib.import_module(f"{__package__}.{module}")
    return CHECKS
