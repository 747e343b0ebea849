"""Success rates with 95% Wilson intervals: per-run summaries, comparisons of runs, bar plots.

    python -m sim.report runs/eval_sim/base runs/eval_sim/steered [--out runs/eval_sim/compare]

compares evaluation runs (e.g. a policy with and without steering on the same seeds): one table
and one plot, with each run's success rate and interval per task, plus the paired counts on the
episodes (task, seed) that the first run and each other run both evaluated, over all tasks and per
task, with the exact McNemar test of the difference (a two-sided binomial test on the episodes that
only one of the two runs solved), and the mean return of each run on those episodes with the
Wilcoxon signed-rank test of the per-episode return differences (success is rare on hard tasks; the
shaped return shows whether an arm moves the episodes at all).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from configs.errors import UserError

EPISODES_FILE = "episodes.jsonl"
Z95 = 1.959963984540054  # standard normal quantile of 0.975


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # exact at the ends (rounding leaves e.g. 5.6e-17 for 0 of 3, a negative error bar below 0%)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


@dataclass
class TaskSummary:
    """One task's results in one run."""

    task: str
    episodes: int
    successes: int
    rate: float
    low: float  # 95% Wilson interval
    high: float
    mean_steps: float
    mean_return: float
    errors: int  # episodes that ended with a worker crash/hang or an environment error


def summarize(records: Iterable[dict[str, Any]]) -> list[TaskSummary]:
    """Per-task summaries (sorted by task) and, for several tasks, an "all" row."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    rows = [_summary(task, rs) for task, rs in sorted(by_task.items())]
    if len(rows) > 1:
        rows.append(_summary("all", [r for rs in by_task.values() for r in rs]))
    return rows


def _summary(task: str, records: list[dict[str, Any]]) -> TaskSummary:
    n, k = len(records), sum(bool(r["success"]) for r in records)
    low, high = wilson_interval(k, n)
    return TaskSummary(
        task, n, k, k / n if n else 0.0, low, high,
        sum(r["steps"] for r in records) / max(n, 1), sum(r["return"] for r in records) / max(n, 1),
        sum(r.get("error") is not None for r in records),
    )  # fmt: skip


def format_table(rows: Sequence[TaskSummary]) -> str:
    """A markdown table of summaries."""
    lines = [
        "| task | episodes | success | 95% CI | mean steps | mean return | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.task} | {r.episodes} | {r.rate:.1%} ({r.successes}) | [{r.low:.1%}, {r.high:.1%}] | "
            f"{r.mean_steps:.1f} | {r.mean_return:.2f} | {r.errors} |"
        )
    return "\n".join(lines)


def load_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """The episode records of an evaluation run directory."""
    path = Path(run_dir) / EPISODES_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not an eval_sim run directory: it has no {EPISODES_FILE}.")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_success(groups: dict[str, Sequence[TaskSummary]], path: Path, title: str = "success rate") -> Path:
    """Grouped bars of success rate per task with 95% Wilson intervals; one group per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r.task for rows in groups.values() for r in rows}, key=lambda t: (t == "all", t))
    width = 0.8 / max(len(groups), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(tasks) * max(1, len(groups)) ** 0.5 + 1), 3.5))
    for g, (label, rows) in enumerate(groups.items()):
        by_task = {r.task: r for r in rows}
        xs = [i + (g - (len(groups) - 1) / 2) * width for i, t in enumerate(tasks) if t in by_task]
        present = [by_task[t] for t in tasks if t in by_task]
        rates = [r.rate for r in present]
        errors = [[r.rate - r.low for r in present], [r.high - r.rate for r in present]]
        ax.bar(xs, rates, width, yerr=errors, capsize=3, label=label)
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("success rate (95% Wilson CI)")
    ax.set_title(title)
    if len(groups) > 1:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs as a fair coin's binomial (1 if there are none)."""
    n, k = only_first + only_second, min(only_first, only_second)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def wilcoxon_signed_rank(diffs: Sequence[float]) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test that paired differences are symmetric about 0.

    The choices are scipy.stats.wilcoxon's defaults (scipy 1.17), so the two agree: zero differences are
    dropped (Wilcoxon's method) and tied |differences| get their mean rank; the statistic is the sum of
    the ranks of the positive differences. Without ties or zeros and with n <= 50, its exact null
    distribution; with ties or zeros and n <= 13, all 2^n sign flips; otherwise the normal
    approximation with the tie-corrected variance and no continuity correction. 1 when no difference
    is non-zero.
    """
    n_all = len(diffs)
    nonzero = [float(d) for d in diffs if d != 0]
    n = len(nonzero)
    if n == 0:
        return 1.0
    ranks, tie_sizes = _mid_ranks([abs(d) for d in nonzero])
    r_plus = sum(r for r, d in zip(ranks, nonzero, strict=True) if d > 0)
    if n_all <= 50 and n == n_all and all(t == 1 for t in tie_sizes):
        return _exact_signed_rank_p(n, round(r_plus))
    if n_all <= 13:  # ties or zeros: the distribution of r_plus over the 2^n sign flips (zeros' signs change nothing)
        sums = [0.0]
        for r in ranks:
            sums = [s + x for s in sums for x in (0.0, r)]
        eps = 1e-9 * max(1.0, r_plus)
        low = sum(s <= r_plus + eps for s in sums) / len(sums)
        high = sum(s >= r_plus - eps for s in sums) / len(sums)
        return min(1.0, 2 * min(low, high))
    mean = n * (n + 1) / 4
    var = (n * (n + 1) * (2 * n + 1) - sum(t**3 - t for t in tie_sizes) / 2) / 24
    return math.erfc(abs(r_plus - mean) / math.sqrt(2 * var))


def _mid_ranks(values: Sequence[float]) -> tuple[list[float], list[int]]:
    """Ranks 1..n of `values`, tied values sharing their mean rank; and the size of each group of ties."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks, sizes, i = [0.0] * len(values), [], 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1
        sizes.append(j - i + 1)
        i = j + 1
    return ranks, sizes


def _exact_signed_rank_p(n: int, r_plus: int) -> float:
    """Two-sided exact p of the signed-rank sum r_plus over ranks 1..n (each rank's sign a fair coin)."""
    counts = [1] + [0] * (n * (n + 1) // 2)  # counts[s]: subsets of {1..k} with rank sum s
    for k in range(1, n + 1):
        for s in range(k * (k + 1) // 2, k - 1, -1):
            counts[s] += counts[s - k]
    total = 2**n
    low, high = sum(counts[: r_plus + 1]) / total, sum(counts[r_plus:]) / total
    return min(1.0, 2 * min(low, high))


def paired_counts(a: list[dict[str, Any]], b: list[dict[str, Any]], task: str | None = None) -> dict[str, Any]:
    """On the episodes (task, seed) both runs evaluated (of `task` only, if given): how often both / only
    one / neither succeeded, the exact McNemar p-value of the difference, each run's mean return and the
    Wilcoxon signed-rank p-value of the return differences."""
    ra = {(r["task"], r["seed"]): r for r in a if task is None or r["task"] == task}
    rb = {(r["task"], r["seed"]): r for r in b if task is None or r["task"] == task}
    common = sorted(ra.keys() & rb.keys())
    sa = {k: bool(ra[k]["success"]) for k in common}
    sb = {k: bool(rb[k]["success"]) for k in common}
    counts = {
        "common": len(common),
        "both": sum(sa[k] and sb[k] for k in common),
        "only_first": sum(sa[k] and not sb[k] for k in common),
        "only_second": sum(sb[k] and not sa[k] for k in common),
        "neither": sum(not sa[k] and not sb[k] for k in common),
    }
    ret_a = [float(ra[k]["return"]) for k in common]
    ret_b = [float(rb[k]["return"]) for k in common]
    returns = {
        "mean_return_first": sum(ret_a) / max(len(common), 1),
        "mean_return_second": sum(ret_b) / max(len(common), 1),
        "p_wilcoxon_return": wilcoxon_signed_rank([y - x for x, y in zip(ret_a, ret_b, strict=True)]),
    }
    return {**counts, "p_mcnemar": mcnemar_exact(counts["only_first"], counts["only_second"]), **returns}


def compare_runs(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None) -> str:
    """Compare evaluation runs: a markdown report (returned) and, with `out_dir`, its files.

    Writes `comparison.md`, `comparison.json` and `comparison.png` (grouped bars with intervals).
    """
    if len(run_dirs) < 2:
        raise UserError("Comparing needs at least two eval_sim run directories.")
    records = {_label(d, run_dirs): load_records(d) for d in run_dirs}
    summaries = {label: summarize(rs) for label, rs in records.items()}
    labels = list(records)
    parts = [f"## {label}\n\n{format_table(rows)}" for label, rows in summaries.items()]
    tasks = sorted({r["task"] for rs in records.values() for r in rs})
    pairs, lines = {}, []
    for other in labels[1:]:
        for task in [None, *tasks] if len(tasks) > 1 else [None]:
            name = f"{labels[0]} vs {other}" + (f" ({task})" if task else "")
            c = pairs[name] = paired_counts(records[labels[0]], records[other], task)
            lines.append(
                f"- {name}: {c['common']} common episodes; both succeeded {c['both']}, only the first "
                f"{c['only_first']}, only the second {c['only_second']}, neither {c['neither']}; exact McNemar "
                f"p = {c['p_mcnemar']:.2g}; mean return {c['mean_return_first']:.2f} -> "
                f"{c['mean_return_second']:.2f}, Wilcoxon signed-rank p = {c['p_wilcoxon_return']:.2g}"
            )
    report = "\n\n".join([*parts, "## paired (same task and seed)\n\n" + "\n".join(lines)])
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.md").write_text(report + "\n")
        summary_json = {label: [asdict(r) for r in rows] for label, rows in summaries.items()}
        (out / "comparison.json").write_text(json.dumps({"runs": summary_json, "paired": pairs}, indent=1))
        plot_success(summaries, out / "comparison.png", title="success rate by run")
    return report


def _label(run_dir: str | Path, all_dirs: Sequence[str | Path]) -> str:
    """The run's directory name, or its full path if two runs share a name."""
    names = [Path(d).name for d in all_dirs]
    name = Path(run_dir).name
    return name if names.count(name) == 1 else str(run_dir)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compare eval_sim runs (success rates, 95% Wilson intervals).")
    parser.add_argument("runs", nargs="+", help="eval_sim run directories (the first is the reference)")
    parser.add_argument("--out", help="directory for comparison.md/.json/.png")
    args = parser.parse_args(argv)
    from configs.errors import exit_on_user_error

    with exit_on_user_error():
        print(compare_runs(args.runs, args.out))


if __name__ == "__main__":
    main()
