"""The README's benchmark table, rendered from result files (fabricated here: no benchmark runs)."""

from __future__ import annotations

import json
from pathlib import Path


def test_table_renders_a_row_per_goal(tmp_path: Path) -> None:
    """The README table from results: every goal of the issue gets a row (here from fabricated results)."""
    from benchmarks import table

    side = {"ops_per_s": 100.0, "p50_us": 10.0, "backend_cpu_us_per_op": None, "frontend_cpu_us_per_op": 1.0,
            "frontend_busy": 0.5}
    machine = {"date": "2026-12-04 10:00:00 UTC"}
    sides = {"sides": {k: side for k in ("ours", "qemu", "floor", "copy", "syscalls", "transport")}, "machine": machine}
    ratios = {"ours / qemu": 0.5, "ours / floor": 0.2, "ours / copy": 0.1, "ours / syscall floor": 0.01,
              "ours / transport floor": 0.6}
    for name in ("display_info", "create_unref", "mix_2d", "frames_1080p", "blob_lifecycle"):
        (tmp_path / f"{name}.json").write_text(json.dumps({**sides, "ratios": ratios}))
    (tmp_path / "transfer_scattered.json").write_text(json.dumps(
        {**sides, "ratios": ratios, "gb_per_s": {"ours": 1.0, "qemu": 2.0, "copy": 10.0}}))
    (tmp_path / "transfer_copy.json").write_text(json.dumps(
        {"machine": machine, "ratios": {"1024x768 ours warm alias / floor": 0.3},
         "gbs": {"1024x768": {"ours warm, alias": 3.0, "floor: one contiguous copy": 10.0}}}))
    med = {k: {"idle_rss": 30e6, "startup_s": 0.5} for k in ("ours", "qemu")}
    (tmp_path / "process_costs.json").write_text(json.dumps({"median": med, "machine": machine}))
    rows = table.rows(tmp_path)
    assert len(rows) == 2 + len(table.GOALS), rows
    assert all(r.count("|") == 9 for r in rows), rows
    assert "| **0.50** | >= 0.9 | no | 2026-12-04 |" in rows[2]
    assert rows[-2].endswith("| **30.0** | <= 40 | yes | 2026-12-04 |")
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{table.BEGIN}\nold\n{table.END}\nafter\n")
    assert table.update_readme(readme, tmp_path)
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text and rows[2] in text


def test_the_polling_table_sets_ours_beside_ours_told_never_to_poll(tmp_path: Path) -> None:
    from benchmarks import table

    def side(cpu: float) -> dict[str, float]:
        return {"ops_per_s": 1.0, "backend_cpu_us_per_op": cpu}

    (tmp_path / "mix_2d.json").write_text(json.dumps(
        {"sides": {"ours": side(60.0), "sleeping": side(70.0)},
         "ratios": {"ours / qemu": 0.82, "ours never polling / qemu": 0.55}}))
    (tmp_path / "display_info.json").write_text(json.dumps({"sides": {}, "ratios": {"ours / qemu": 2.0}}))  # older
    rows = table.polling_rows(tmp_path)
    assert rows[2:] == ["| mix_2d | 0.82 | 0.55 | 60.0 / 70.0 |"]
