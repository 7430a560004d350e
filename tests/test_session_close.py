"""A connection's end releases guest memory even when a reference cycle still held a view of it."""

from __future__ import annotations

import gc

from vgpu_fuzz.commands import DRIVER_AREA, CommandsTarget


def test_a_view_kept_only_by_a_reference_cycle_does_not_keep_the_guest_memory_fd_past_the_session() -> None:
    target = CommandsTarget()  # a real Session over a memfd of guest RAM, set up as a front end would
    try:
        memory = target.session.memory
        (region,) = memory.regions
        assert region.fd >= 0
        gc.disable()  # the cycle below must outlive the session's own close, as one made by an exception would
        try:
            view = memory.gpa(DRIVER_AREA, 16)
            cycle: list[object] = [view]
            cycle.append(cycle)
            del view, cycle
            target.session.close()
            assert region.fd == -1, "the region's mapping and fd outlived the connection"
        finally:
            gc.enable()
    finally:
        target.close()  # closes the session again (a no-op), the driver's rings and the RAM
