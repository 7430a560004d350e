"""End to end, briefly: one back-end process serves three real guests of each kind in a row (the long run is
``python -m benchmarks.soak``, results in benchmarks/results/soak.json). After every guest the back end must be
back at its idle fds exactly and its RSS at the baseline taken after the first guest (within
``vgpu_lab.soak.RSS_SLACK_KIB``), every guest's own check must pass and its frame be among our pictures."""

from __future__ import annotations

import pytest

from tests.test_lab_qemu_peer import _component
from vgpu_lab import provision, soak

pytestmark = pytest.mark.e2e

GUESTS = 3


@pytest.mark.parametrize("kind", soak.KINDS)
def test_one_back_end_serves_guests_in_a_row_and_returns_to_idle(kind: str, tmp_path_factory: pytest.TempPathFactory
                                                                   ) -> None:
    p = _component("cache", provision.Provisioner)
    _component("qemu11" if kind == "qemu11" else "qemu", p.qemu11 if kind == "qemu11" else p.qemu)
    for name, make in (("kernel", p.guest_kernel), ("busybox", p.busybox), ("guest programs", p.guest_programs)):
        _component(name, make)
    run = soak.soak(p, kind, GUESTS, tmp_path_factory.mktemp(f"soak-{kind}"))
    for r in run.records:
        print(f"{kind} guest {r.index}: {r.seconds:.1f} s, fds {r.fds_after} (peak {r.fds_peak}), "
              f"RSS {r.rss_after_kib} KiB (peak {r.rss_peak_kib}), maps {r.maps}, ok {r.guest_ok and r.frame_ok}")
    assert len(run.records) == GUESTS, run.backend_tail
    assert not run.failures, "\n".join(run.failures) + "\n--- back end\n" + run.backend_tail
    # The same fds as the fresh process after every guest, also after the first.
    assert [r.fds_after for r in run.records] == [run.idle_fds_cold] * GUESTS
