"""The cache matrix's arm64 column: how each strategy's answer is judged for an arm64 guest, and that the committed
measurement it is judged with says what the arm64 e2e test holds the guest to."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from benchmarks import arm64_column as col
from benchmarks.cache_matrix import STRATEGIES
from vgpu.gpu.png import decode
from vgpu_lab.arm64.boot import MEMORY_TYPE

MEASURED = {"map_info": {"CACHED": {"memory_type": "Normal-WB", "unaligned_memcpy_signal": 0},
                         "WC": {"memory_type": "Normal-NC", "unaligned_memcpy_signal": 0},
                         "UNCACHED": {"memory_type": "Device-nGnRnE", "unaligned_memcpy_signal": 7}}}


def row(truth: str, **answers: str) -> SimpleNamespace:
    return SimpleNamespace(truth=truth, answers=answers)


def test_our_device_adapts_other_strategies_do_not() -> None:
    assert col.sent_to_arm64("ours", "UNCACHED") == "WC" and col.sent_to_arm64("ours_stock", "UNCACHED") == "WC"
    assert col.sent_to_arm64("legacy", "UNCACHED") == "UNCACHED"
    assert col.sent_to_arm64("ours", "CACHED") == "CACHED" and col.sent_to_arm64("ours", "refused") == "refused"


def test_verdicts_compare_memory_types() -> None:
    types = col.guest_types(MEASURED)
    rows = [row("UNCACHED", ours="UNCACHED", legacy="WC", always_cached="CACHED"),
            row("WC", ours="refused", legacy="CACHED", always_cached="CACHED"),
            row("CACHED", ours="CACHED", legacy="WC", always_cached="CACHED")]
    judged = col.column(rows, types)
    # An uncached exporter: ours sends WC, Normal-NC for the host's Device memory: both uncached, another type.
    assert judged[0]["sent"]["ours"] == "WC" and judged[0]["memory_type"]["ours"] == "Normal-NC"
    assert judged[0]["host"]["memory_type"] == "Device-nGnRnE"
    assert [judged[0]["verdicts"][s] for s in ("ours", "legacy", "always_cached")] == ["other", "other", "dangerous"]
    assert [judged[1]["verdicts"][s] for s in ("ours", "legacy", "always_cached")] == ["refused", "dangerous",
                                                                                        "dangerous"]
    assert [judged[2]["verdicts"][s] for s in ("ours", "legacy", "always_cached")] == ["right", "slow", "right"]
    counts = col.tally(judged, ["ours", "legacy", "always_cached"])
    assert counts["ours"] == {"right": 1, "dangerous": 0, "slow": 0, "other": 1, "refused": 1}


def test_the_committed_measurement_is_what_the_suite_holds_the_guest_to() -> None:
    measured = col.load()
    assert measured is not None, "benchmarks/results/arm64_memory_types.json: run python -m benchmarks.arm64_column"
    assert col.guest_types(measured) == {"CACHED": MEMORY_TYPE[1], "WC": MEMORY_TYPE[3], "UNCACHED": MEMORY_TYPE[2]}
    signals = {k: e["unaligned_memcpy_signal"] for k, e in measured["map_info"].items()}
    assert signals == {"CACHED": 0, "WC": 0, "UNCACHED": 7}
    # The device told it was an aarch64 guest sent WC for the uncached buffer, and that memory took the memcpy.
    (adapted,) = [d for d in measured["devices"] if d["guest_arch_option"] == "--guest-arch=aarch64"]
    assert (adapted["map_info_name"], adapted["memory_type"], adapted["unaligned_memcpy_signal"]) == \
        ("WC", "Normal-NC", 0)


def test_the_figure_has_a_row_per_strategy_and_guest(tmp_path: Path) -> None:
    counts = {s: {"right": 1, "dangerous": 0, "slow": 0, "other": 0, "refused": 2} for s in STRATEGIES}
    path = col.figure_by_arch(counts, counts, STRATEGIES, 3, MEASURED, tmp_path / "m.png")
    height, width, _ = decode(path.read_bytes()).shape
    assert width == 1400 and height > 2 * len(STRATEGIES) * 16
