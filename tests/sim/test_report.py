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


def test_wilcoxon_signed_rank_hand_computed_values() -> None:
    import math

    from sim.report import wilcoxon_signed_rank

    # no ties: exact; r_plus = 1+3+4+5 = 13 of 15, P(r_plus >= 13) = P(r_minus <= 2) = 3/32
    assert wilcoxon_signed_rank([1, -2, 3, 4, 5]) == pytest.approx(2 * 3 / 32)
    assert wilcoxon_signed_rank([-1, 2, -3, -4, -5]) == pytest.approx(2 * 3 / 32)  # symmetric
    assert wilcoxon_signed_rank([0.5, 2.0, 3.0]) == pytest.approx(2 / 8)
    # ties, n <= 13: ranks (3, 3, 3, 1), r_plus = 9 = the maximum less 1: P = 2 / 16 by sign flips
    assert wilcoxon_signed_rank([2, 2, 2, -1]) == pytest.approx(2 * 2 / 16)
    # zeros are dropped: the same as the exact test of the non-zero differences' sign flips
    assert wilcoxon_signed_rank([0, 0, 1, -2, 3, 4, 5]) == pytest.approx(2 * 3 / 32)
    assert wilcoxon_signed_rank([0.0, 0.0]) == 1.0 and wilcoxon_signed_rank([]) == 1.0
    # ties, n > 13: normal approximation; ranks 5.5 (x10) and 13 (x5), r_plus = 55, mean 60,
    # variance (15*16*31 - ((10^3 - 10) + (5^3 - 5)) / 2) / 24 = 286.875
    expected = math.erfc(5 / math.sqrt(286.875) / math.sqrt(2))
    assert wilcoxon_signed_rank([1] * 10 + [-2] * 5) == pytest.approx(expected, rel=1e-12)


def test_wilcoxon_signed_rank_agrees_with_scipy() -> None:
    import random

    scipy_stats = pytest.importorskip("scipy.stats")
    from sim.report import wilcoxon_signed_rank

    rng = random.Random(0)
    for n in [1, 4, 12, 13, 14, 30, 50, 51, 90]:  # each side of the exact / sign-flip / normal switches
        for draw in [lambda: rng.gauss(0.3, 1.0), lambda: float(rng.randint(-2, 3))]:  # continuous; ties, zeros
            d = [draw() for _ in range(n)]
            if any(d):
                assert wilcoxon_signed_rank(d) == pytest.approx(scipy_stats.wilcoxon(d).pvalue, abs=1e-12), d


def test_comparison_of_the_committed_suite_runs_gives_their_published_return_p_values(tmp_path: Path) -> None:
    """benchmarks/results/steer_sim_suite64_vla8k_cpu/returns.txt (scipy, stop 27) from sim.report."""
    import shutil

    from sim.report import EPISODES_FILE, compare_runs

    results = Path(__file__).resolve().parents[2] / "benchmarks/results/steer_sim_suite64_vla8k_cpu"
    for arm in ["base", "steered"]:
        (tmp_path / arm).mkdir()
        shutil.copy(results / f"s_vla8k_{arm}.episodes.jsonl", tmp_path / arm / EPISODES_FILE)
    report = compare_runs([tmp_path / "base", tmp_path / "steered"])
    assert "base vs steered (lift): 25 common episodes; both succeeded 0, only the first 4, only the second 5" in report
    assert "mean return 5.96 -> 14.84, Wilcoxon signed-rank p = 3e-07" in report
    assert "(pick_place_bread)" in report and "mean return 8.24 -> 4.43, Wilcoxon signed-rank p = 0.052" in report


def test_comparison_pairs_episodes_per_task_with_mcnemar(tmp_path: Path) -> None:
    import json

    from sim.report import EPISODES_FILE, compare_runs

    def run(name: str, success: dict[tuple[str, int], bool]) -> Path:
        d = tmp_path / name
        d.mkdir()
        lines = [json.dumps({"task": t, "seed": s, "success": ok, "steps": 5, "return": s + 10.0 * ok, "error": None})
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
    # returns: seed + 10 per success; stack gains 10 on 8 of 10 episodes (exact test: 2 / 2^8), lift is unchanged
    stack = pairs["base vs better (stack)"]
    assert (stack["mean_return_first"], stack["mean_return_second"]) == (4.5, 12.5)
    assert stack["p_wilcoxon_return"] == pytest.approx(2 / 256)
    assert pairs["base vs better (lift)"]["p_wilcoxon_return"] == 1.0
    assert "mean return 4.50 -> 12.50, Wilcoxon signed-rank p = 0.0078" in report
