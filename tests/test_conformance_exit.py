"""The conformance runner and a back end that exits when its front end leaves (QEMU's C back end does), but slowly.

Root of a failure seen under load (VU-FEATURES of QEMU's back end refused for 10 s, 9 runs in 93 while the suite ran
beside it): the probe judges "exits on disconnect" by waiting 1 s for the exit; a slower exit was judged "keeps
serving", so the next check connected to a process that was about to exit and had stopped listening. Its own
module: the corrected connection waits out the refused connect's 10 s retry, and the suite runs modules side by
side."""

from __future__ import annotations

from pathlib import Path

from tests.test_conformance import CATALOGUE, broken
from vgpu.conformance.runner import PASS, run

#: Two requirements our device passes, each checked on its own connection.
IDS = ["VU-FEATURES", "VU-REPLY-ACK"]


def test_a_slowly_exiting_one_connection_back_end_is_restarted_for_each_check(tmp_path: Path) -> None:
    result = run(broken("slow-exit"), CATALOGUE, IDS, tmp_path)
    assert result.verdicts() == dict.fromkeys(IDS, PASS), result.to_json()
    # The probe's second was too short; the refused connection corrected the offer for the rest of the run.
    assert result.offer.exits_on_disconnect
