"""End to end, briefly: one back-end process serves three real guests of each kind in a row (the long run is
``python -m benchmarks.soak``, results in benchmarks/results/soak.json). After every guest the back end must be
back at its idle fds exactly and its RSS at the baseline taken after the first guest (within
``vgpu_lab.soak.RSS_SLACK_KIB``), every guest's own check must pass and its frame be among our pictures."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import component
from vgpu_lab import provision, soak

pytestmark = pytest.mark.usefixtures("lab")  # QEMU 10, the kernel, busybox, the guest programs

GUESTS = 3


@pytest.mark.parametrize("kind", soak.KINDS)
def test_one_back_end_serves_guests_in_a_row_and_returns_to_idle(kind: str, provisioner: provision.Provisioner,
                                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    if kind == "qemu11":
        component("qemu11 (QEMU >= 11.1 in a sid chroot)", provisioner.qemu11)
    run = soak.soak(provisioner, kind, GUESTS, tmp_path_factory.mktemp(f"soak-{kind}"))
    for r in run.records:
        print(f"{kind} guest {r.index}: {r.seconds:.1f} s, fds {r.fds_after} (peak {r.fds_peak}), "
              f"RSS {r.rss_after_kib} KiB (peak {r.rss_peak_kib}), maps {r.maps}, ok {r.guest_ok and r.frame_ok}")
    assert len(run.records) == GUESTS, run.backend_tail
    assert not run.failures, "\n".join(run.failures) + "\n--- back end\n" + run.backend_tail
    # The same fds as the fresh process after every guest, also after the first.
    assert [r.fds_after for r in run.records] == [run.idle_fds_cold] * GUESTS
