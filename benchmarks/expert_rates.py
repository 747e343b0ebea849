"""Success rates of the scripted experts per task: clean (corruption scale 0) and at the default corruption.

    python benchmarks/expert_rates.py                                   # 40 episodes per task, scales 0 and 1
    python benchmarks/expert_rates.py --episodes 100 --scales 1 --tasks lift stack --workers 2

The episodes are those of `collect_sim.py` at its default seed (0): the same initial states and
corruption draws as the default collection, run by the same rollout runner (sim/runner.py), without
rendering (images do not change what the experts do). Per task and scale: the success rate with
its 95% Wilson interval, mean steps, and the episodes grouped by the failure modes they drew
(`wrong_target`; else `early_release`; else `hesitation`; else `none`: action noise only), so the JSON shows
where the failures come from. Targets (issue 3): clean >= 90%, default inside 30-60%.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BAND = (0.30, 0.60)  # the intended success band at the default corruption
CLEAN_MIN = 0.90  # clean experts
MODES = ("wrong_target", "early_release", "hesitation", "none")  # "none": action noise only


def failure_mode(cfg, seed: int) -> str:
    """The strongest failure mode an episode drew (wrong target > early release > hesitation)."""
    from sim.experts import draw_corruption

    c, _ = draw_corruption(cfg, seed)
    drawn = {"wrong_target": c.wrong_target, "early_release": c.release, "hesitation": c.hesitate}
    return next((mode for mode, yes in drawn.items() if yes), "none")


def run_scale(scale: float, tasks: list[str], episodes: int, seed: int, workers: int) -> dict:
    """Roll out every task's episodes at one corruption scale; per-task statistics."""
    from sim.config import CorruptionConfig, SimConfig
    from sim.env import make_sim_env
    from sim.experts import ScriptedPolicy
    from sim.report import wilson_interval
    from sim.runner import Runner, episode_specs

    cfg = CorruptionConfig(scale=scale)
    make_env = functools.partial(make_sim_env, SimConfig(task="suite", render=False))
    results = {t: [] for t in tasks}
    with Runner(make_env, workers=workers) as runner:
        for r in runner.run(episode_specs(tasks, episodes, seed), ScriptedPolicy(cfg)):
            results[r.task].append(r)
            print(
                f"  scale {scale:g} {r.task:17s} seed {r.seed:10d} success={r.success!s:5} steps={r.steps}", flush=True
            )
    out = {}
    for task, rs in results.items():
        k, n = sum(r.success for r in rs), len(rs)
        low, high = wilson_interval(k, n)
        modes = {m: Counter() for m in MODES}
        for r in rs:
            modes[failure_mode(cfg, r.seed)][r.success] += 1
        out[task] = {
            "episodes": n, "successes": k, "rate": k / n, "ci95": [low, high],
            "mean_steps": sum(r.steps for r in rs) / n, "errors": sum(r.error is not None for r in rs),
            "by_failure_mode": {m: {"episodes": c.total(), "successes": c[True]} for m, c in modes.items()},
        }  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=40, help="episodes per task and scale")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0], help="corruption scales")
    parser.add_argument("--tasks", nargs="+", default=None, help="task names (default: every registered task)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (collect_sim's default: 0)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "expert_rates.json"))
    args = parser.parse_args()

    from sim.config import CorruptionConfig
    from sim.tasks import SUITE, task_names

    tasks = args.tasks or task_names(SUITE)
    start = time.perf_counter()
    results = {f"{s:g}": run_scale(s, tasks, args.episodes, args.seed, args.workers) for s in args.scales}
    report = {
        "benchmark": "expert_rates",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "config": {"episodes": args.episodes, "seed": args.seed, "workers": args.workers, "render": False,
                   "corruption_default": asdict(CorruptionConfig()), "band": BAND, "clean_min": CLEAN_MIN},
        "results": results,
        "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{'scale':>5} {'task':17s} {'success':>12} {'95% CI':>15}  failures by mode (episodes/successes)")
    for scale, per_task in results.items():
        for task, r in per_task.items():
            modes = " ".join(f"{m}={c['episodes']}/{c['successes']}" for m, c in r["by_failure_mode"].items())
            low, high = r["ci95"]
            print(f"{scale:>5} {task:17s} {r['successes']:3d}/{r['episodes']:<3d} {r['rate']:4.0%} "
                  f"[{low:4.0%}, {high:4.0%}]  {modes}")  # fmt: skip
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
