"""How a check reports what it saw: raising `CheckFailed` with the observed bytes (the guest session's own failure,
so a session helper that finds an unexpected answer fails the check the same way), or `NotApplicable` with the
reason.

Imports nothing of its own package, so the registry, the context and the checks can all use it without a cycle
between them."""

from __future__ import annotations

from ..session import CheckFailed
from ..vhost_user.profiles import Profile

__all__ = ["CheckFailed", "NotApplicable", "expect", "no_display_socket"]


class NotApplicable(Exception):
    """The back end does not offer what the check needs (decided from what it advertises, never from failures)."""


def no_display_socket(profile: Profile | None) -> NotApplicable:
    name = profile.name if profile is not None else "plain"
    return NotApplicable(f"the {name} profile opens no display socket, and this check sees the device's "
                         "output only through one (GPU_SET_SOCKET is QEMU's; under crosvm the display is the back "
                         "end's own)")


def expect(cond: bool, message: str, observed: bytes | None = None) -> None:
    if not cond:
        raise CheckFailed(message, observed)
