"""How the cache matrix judges an answer against a truth of several placements, or one no attribute can be."""

from __future__ import annotations

import pytest

from benchmarks import arm64_column, truths
from benchmarks.cache_matrix import verdict


@pytest.mark.parametrize(
    ("answer", "truth", "expected"),
    [
        ("WC", "WC", "right"), ("CACHED", "WC", "dangerous"), ("WC", "CACHED", "slow"), ("UNCACHED", "WC", "other"),
        ("refused", "WC", "refused"),
        # A buffer that moves between WC and cached placements: WC is safe in both (slow in one), CACHED is the
        # dangerous alias of the WC placement.
        ("WC", "WC|CACHED", "right"), ("CACHED", "WC|CACHED", "dangerous"), ("UNCACHED", "WC|CACHED", "other"),
        ("refused", "WC|CACHED", "refused"), ("n/a", "WC|CACHED", "refused"),
        # A buffer that needs DMA_BUF_IOCTL_SYNC: nothing is right; cacheable is dangerous.
        ("CACHED", truths.SYNC, "dangerous"), ("WC", truths.SYNC, "other"), ("UNCACHED", truths.SYNC, "other"),
        ("refused", truths.SYNC, "refused"),
    ],
)
def test_x86_verdicts(answer: str, truth: str, expected: str) -> None:
    assert verdict(answer, truth) == expected


class _Row:
    def __init__(self, truth: str, answers: dict[str, str]) -> None:
        self.truth, self.answers = truth, answers


def test_arm64_column_judges_changing_and_incoherent_rows() -> None:
    types = {"CACHED": "Normal-WB", "WC": "Normal-NC", "UNCACHED": "Device-nGnRnE"}
    rows = [_Row("WC|CACHED", {"ours": "refused", "ours_opted_in": "WC", "always_cached": "CACHED"}),
            _Row(truths.SYNC, {"ours": "refused", "always_wc": "WC", "always_cached": "CACHED"})]
    changing, incoherent = arm64_column.column(rows, types)
    assert changing["host"]["memory_type"] == "Normal-NC|Normal-WB"
    assert changing["verdicts"] == {"ours": "refused", "ours_opted_in": "right", "always_cached": "dangerous"}
    assert incoherent["verdicts"] == {"ours": "refused", "always_wc": "other", "always_cached": "dangerous"}
