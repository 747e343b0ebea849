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


def test_exact_mcnemar_reference_values() -> None:
    from sim.report import mcnemar_exact

    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(1, 1) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32) == mcnemar_exact(5, 0)
    assert mcnemar_exact(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)


def test_comparison_pairs_episodes_per_task_with_mcnemar(tmp_path: Path) -> None:
    import json

    from sim.report import EPISODES_FILE, compare_runs

    def run(name: str, success: dict[tuple[str, int], bool]) -> Path:
        d = tmp_path / name
        d.mkdir()
        lines = [json.dumps({"task": t, "seed": s, "success": ok, "steps": 5, "return": 0.0, "error": None})
                 for (t, s), ok in success.items()]  # fmt: skip
        (d / EPISODES_FILE).write_text("\n".join(lines) + "\n")
        return d

    base = {("lift", s): s < 2 for s in range(10)} | {("stack", s): False for s in range(10)}
    better = {("lift", s): s < 2 for s in range(10)} | {("stack", s): s < 8 for s in range(10)}
    report = compare_runs([run("base", base), run("better", better)], tmp_path / "cmp")
    assert "base vs better: 20 common episodes; both succeeded 2, only the first 0, only the second 8" in report
    assert "base vs better (stack): 10 common episodes; both succeeded 0, only the first 0, only the second 8" in report
    assert "base vs better (lift): 10 common episodes; both succeeded 2" in report
    pairs = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["paired"]
    assert pairs["base vs better (stack)"]["p_mcnemar"] == pytest.approx(2 / 256)
    assert pairs["base vs better (lift)"]["p_mcnemar"] == 1.0
