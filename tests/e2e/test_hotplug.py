"""End to end: memory hot-plug under a real guest (QEMU 11.1, pc-dimm on shared memfds) while it draws.

What is checked is what spec/memory-hotplug.md states: QEMU sends ADD_MEM_REG for each plugged DIMM at once; the
guest's GPU buffers land in the DIMM it onlined as kernel memory (our log's backing ranges say so); asked to
unplug both DIMMs while the guest holds its frame, the guest refuses the one with pinned GPU pages (ACPI _OST
"device busy") and QEMU sends nothing for it, while the movable one goes and QEMU sends REM_MEM_REG; our back end
releases exactly that region's fd, keeps serving (the guest draws again, pixel for pixel) and holds nothing once
QEMU is gone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vgpu_lab import hotplug, provision
from vgpu_lab.soak import frame_seen

pytestmark = pytest.mark.usefixtures("lab", "qemu11")


@pytest.fixture(scope="module")
def run(provisioner: provision.Provisioner, tmp_path_factory: pytest.TempPathFactory
        ) -> tuple[hotplug.HotplugRun, Path]:
    p = provisioner
    work = tmp_path_factory.mktemp("hotplug")
    pics = work / "pictures"
    r = hotplug.run_hotplug(p, work, backend_args=(f"--scanout-png={pics}", "--png-rate=10", "--png-history"))
    return r, pics


def test_qemu_sends_add_then_rem_only_for_the_dimm_the_guest_gave_up(run: tuple[hotplug.HotplugRun, Path]) -> None:
    r, _ = run
    ctx = r.describe()
    assert not r.error and r.returncode == 0, ctx
    dimm0, dimm1 = r.dimm_addrs["dimm0"], r.dimm_addrs["dimm1"]
    assert dimm0 == hotplug.HOTPLUG_BASE and dimm1 == dimm0 + hotplug.DIMM_BYTES, ctx
    # The guest onlined them as asked: kernel memory, then movable memory.
    lines = r.lines()
    for b in (32, 33):
        assert f"VGPU-HP block {b} online Normal" in lines, ctx
    for b in (34, 35):
        assert f"VGPU-HP block {b} online Movable" in lines, ctx
    size = hotplug.DIMM_BYTES
    assert r.regions[1:] == [("added", dimm0, size), ("added", dimm1, size), ("removed", dimm1, size)], ctx
    # In the order QEMU sent them: both ADD_MEM_REG after the set-up, the one REM_MEM_REG later.
    mem = [q for q in r.requests if q.endswith("_MEM_REG")]
    assert mem == ["ADD_MEM_REG"] * 3 + ["REM_MEM_REG"], ctx
    # The unplug requests: the DIMM holding GPU pages is refused by the guest (busy), the other one goes.
    assert any(s in (0x81, 0x82) for s in r.ost("dimm0")) and not r.deleted("dimm0"), ctx
    assert r.deleted("dimm1") and r.remaining == ["dimm0"], ctx
    assert "VGPU-HP after 32 online" in lines and "VGPU-HP after 34 gone" in lines, ctx


def test_the_guests_frame_lived_in_the_plugged_memory_and_was_redrawn(run: tuple[hotplug.HotplugRun, Path]) -> None:
    r, pics = run
    ctx = r.describe()
    dimm0 = r.dimm_addrs.get("dimm0", hotplug.HOTPLUG_BASE)
    inside = [rid for rid, (lo, hi) in r.backings.items() if dimm0 <= lo and hi <= dimm0 + hotplug.DIMM_BYTES]
    assert inside, f"no resource backed by the plugged DIMM: {r.backings}\n{ctx}"
    # The guest drew while the memory came and went, and drew again after: both runs of its client passed and
    # our scanout pictures hold its frame exactly.
    assert any(line.startswith("VGPU-HP released rc=0") for line in r.lines()), ctx
    assert any(line.startswith("VGPU-HP redraw rc=0") for line in r.lines()), ctx
    assert frame_seen(pics, r.serial.splitlines()), ctx
    # Nothing was refused or lost on the way: no resource lost its backing (the guest never let go of it).
    assert "guest memory removed" not in r.backend_output, ctx


def test_one_fd_per_region_and_nothing_held_afterwards(run: tuple[hotplug.HotplugRun, Path]) -> None:
    r, _ = run
    ctx = r.describe()
    # The removed DIMM's region took exactly its one fd with it; once QEMU exited, the back end is idle again.
    assert r.fds_with_dimms - r.fds_after_unplug == 1, ctx
    assert r.released, ctx
