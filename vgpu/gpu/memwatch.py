"""Guest memory that goes away under resources (memory hot-unplug, a front end's REM_MEM_REG, a smaller
SET_MEM_TABLE): which resources it still backed, said once in the log when it happens.

The rule (spec/memory-hotplug.md): a backing names guest-physical addresses, never a region or a mapping of one.
Every copy resolves those addresses against the memory table of the moment (backing.py re-plans on every table
generation), so after a removal the next transfer, flush or picture of a resource whose bytes are gone fails
with RESP_ERR_INVALID_PARAMETER — nothing reads the removed mapping, and the removed region's fd and mapping are
released as soon as no view of an in-flight command pins them. The resource itself stays: the guest may detach
or unref it as usual, and if memory at those addresses comes back (a later ADD_MEM_REG) its copies work again.
This module only makes the moment visible: the warning names the removed range and the resources it leaves
stranded, so an operator need not infer it from later command errors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from ..vhost_user.memory import GuestMemory
from .resources import Resource

log = logging.getLogger("vgpu.gpu")


class MemoryWatch:
    """The guest-physical ranges of the last memory table, to tell which ones a change removed."""

    def __init__(self) -> None:
        self._ranges: frozenset[tuple[int, int]] = frozenset()

    def changed(self, memory: GuestMemory, resources: Iterable[Resource]) -> list[int]:
        """Note the new table; returns (and logs) the ids of resources whose backing lost memory."""
        now = frozenset((r.desc.guest_phys_addr, r.desc.memory_size) for r in memory.regions)
        gone = sorted(self._ranges - now)
        self._ranges = now
        if not gone:
            return []
        stranded = [res.id for res in resources
                    if res.backing is not None and any(res.backing.touches(a, n) for a, n in gone)
                    and not res.backing.resolves(memory)]
        if stranded:
            ranges = ", ".join(f"gpa {a:#x} +{n:#x}" for a, n in gone)
            log.warning("guest memory removed (%s) while it backs resources %s: their transfers and flushes get "
                        "RESP_ERR_INVALID_PARAMETER until that memory is back or they are detached",
                        ranges, ", ".join(map(str, stranded)))
        return stranded
