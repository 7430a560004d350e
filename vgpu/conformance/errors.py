"""How a check reports what it saw: raising `CheckFailed` with the observed bytes, or `NotApplicable` with the reason.

Imports nothing of its own package, so the registry, the session helpers and the checks can all use it without a
cycle between them."""

from __future__ import annotations


class CheckFailed(Exception):
    """The back end did not do what the requirement asks; `observed` holds the bytes that show it."""

    def __init__(self, message: str, observed: bytes | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.observed = observed


class NotApplicable(Exception):
    """The back end does not offer what the check needs (decided from what it advertises, never from failures)."""


def expect(cond: bool, message: str, observed: bytes | None = None) -> None:
    if not cond:
        raise CheckFailed(message, observed)
