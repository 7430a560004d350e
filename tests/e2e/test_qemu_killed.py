"""End to end: QEMU 11.1 killed (SIGKILL) while its guest holds a mapped host blob; the back end frees what the
connection held, logs what it dropped, and the next QEMU's guest maps a blob from the same back-end process.

In CI (``CI=true``) every lab component must provision; outside CI a missing component skips the test with a
reason naming it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fault_qemu import qemu_kill_with_a_blob_mapped
from vgpu_lab import provision

pytestmark = pytest.mark.usefixtures("lab", "qemu11")


def test_sigkill_of_qemu_with_a_guest_blob_mapped(provisioner: provision.Provisioner, tmp_path: Path) -> None:
    f = qemu_kill_with_a_blob_mapped(provisioner, tmp_path)
    assert f.details["guest_mapped"], f.row()
    assert any("vgpu-blob" in h for h in f.details["held_before"]), f.details  # QEMU died holding our buffer
    assert f.survived and f.released and f.fds_after == f.fds_before and not f.held_after, f.row()
    assert f.dropped.startswith("front end gone: dropped ") and ", 1 mapped blobs, " in f.dropped, f.row()
    assert f.served_next and f.details["next_qemu_guest_ok"], f.row()
    assert f.details["released_after_next_qemu"], f.row()
    print(f"QEMU killed: released in {f.release_s:.2f} s; next QEMU's guest mapped a blob "
          f"{f.details['next_qemu_mapped_s']:.1f} s after its start")
