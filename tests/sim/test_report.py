"""Evaluation summaries: Wilson intervals, per-task rows, the bar plot (no simulator)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sim.report import format_table, plot_success, summarize, wilson_interval


def test_wilson_interval_reference_values_and_exact_ends() -> None:
    assert wilson_interval(18, 40) == pytest.approx((0.3071, 0.6017), abs=1e-4)  # 45% of 40
    assert wilson_interval(5, 12) == pytest.approx((0.1933, 0.6805), abs=1e-4)
    assert wilson_interval(0, 3)[0] == 0.0 and wilson_interval(3, 3)[1] == 1.0  # not 5.6e-17 / 0.9999...
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_summary_table_and_plot_with_all_and_no_successes(tmp_path: Path) -> None:
    records = [{"task": t, "success": s, "steps": 10, "return": 1.0} for t, s in
               [("lift", True)] * 3 + [("stack", False)] * 3]  # fmt: skip
    rows = summarize(records)
    assert [(r.task, r.successes, r.episodes) for r in rows] == [("lift", 3, 3), ("stack", 0, 3), ("all", 3, 6)]
    assert "| stack | 3 | 0.0% (0) | [0.0%, 56.1%] |" in format_table(rows)
    assert plot_success({"run": rows}, tmp_path / "success.png").stat().st_size > 0
