"""Rendering contexts: the guest creates them with CTX_CREATE (a context type from CONTEXT_INIT), attaches
resources to them, and talks to them with SUBMIT_3D.  Host blobs are born in a context (a `blob_id` it handed
out) and become resources with RESOURCE_CREATE_BLOB.

A context type plugs in by subclassing `Context`; the device gives it `ContextServices`, so a context never
reaches into the device, the transport or guest memory directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..blob.types import HostBuffer
from ..protocol import CommandError, CtrlType


@dataclass(frozen=True)
class ContextServices:
    # A host buffer of at least `size` bytes, counted against the guest's quota (raises CommandError past it).
    allocate: Callable[[int], HostBuffer]
    # Give back a buffer that never became a resource (and its quota).
    release: Callable[[HostBuffer], None]
    # Write bytes into a resource's guest backing at an offset (raises CommandError if it cannot).
    write_resource: Callable[[int, int, bytes], None]


class Context:
    capset_id: int = 0

    def __init__(self, ctx_id: int, services: ContextServices) -> None:
        self.id = ctx_id
        self.services = services
        self.attached: set[int] = set()

    def submit(self, data: bytes) -> None:
        """Execute a SUBMIT_3D command stream."""
        raise CommandError(CtrlType.RESP_ERR_UNSPEC, "this context takes no commands")

    def take_blob(self, blob_id: int, size: int) -> HostBuffer:
        """The host buffer behind `blob_id`, handed over to a new resource (each blob_id once)."""
        raise CommandError(CtrlType.RESP_ERR_INVALID_PARAMETER, f"context {self.id} has no blob {blob_id}")

    def pending(self) -> list[HostBuffer]:
        """Host buffers made for the guest that no resource owns yet (they count against the memory quota)."""
        return []

    def close(self) -> None:
        """CTX_DESTROY or reset: give back whatever was never turned into a resource."""


ContextFactory = Callable[[int, ContextServices], Context]
