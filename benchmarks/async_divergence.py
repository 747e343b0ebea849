"""How far apart a lockstep and an async (`runner.lockstep=false`) run of the same episodes drift.

    python benchmarks/async_divergence.py --checkpoint runs/train_policy/flow_lift64 --task lift --size 64
    python benchmarks/async_divergence.py ... --task lift+stack     # episodes of both tasks in one run
    python benchmarks/async_divergence.py ... --free-batch       # runner.fixed_batch=false

Every policy draws an episode's random numbers from that episode's seed (policies/base.py), so the
two runner modes give a policy the same observations and the same noise at the first step. What can
still differ is the floating-point rounding of a batched model, whose kernels depend on the batch
size, and the simulation may amplify it; the runner's fixed batch rows (`runner.fixed_batch`, on by
default) remove that. The script records `--episodes` episodes per task with the policy of
`--checkpoint` (any `policy=<name>` config via --policy) three times: lockstep, async, lockstep
again, and reports per episode whether the lockstep rerun and the async run were bit-identical, the
first step at which the async actions differ and the first at which the observations do, the
largest action difference at steps 0, 5 and 20, and the two outcomes. JSON out (`--out`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_policy(args: argparse.Namespace):
    """The policy as eval_sim.py builds it from `policy=<name> policy.checkpoint=<dir>` (+ --override)."""
    from hydra import compose, initialize_config_dir

    from configs import CONFIG_DIR
    from configs.schema import register
    from sim.evaluate import build_policy as build

    register()
    overrides = [f"policy={args.policy}", f"policy.checkpoint={args.checkpoint}", f"policy.device={args.device}",
                 *args.override]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return build(compose("eval_sim", overrides=overrides))


def first_differing_observation(a, b) -> int | None:
    """The first step whose image or state differs between two trajectories (None: all equal)."""
    n = min(len(a.state), len(b.state))
    for t in range(n):
        if not (np.array_equal(a.state[t], b.state[t]) and np.array_equal(a.images[t], b.images[t])):
            return t
    return None


def run(args: argparse.Namespace) -> dict:
    from sim.config import SimConfig
    from sim.env import make_sim_env
    from sim.runner import Runner, episode_specs
    from sim.tasks import task_names

    specs = episode_specs(task_names(args.task), args.episodes, args.seed, record=lambda i: True)
    make_env = functools.partial(make_sim_env, SimConfig(task=args.task, image_size=args.size))
    runs = []
    for lockstep in (True, False, True):
        policy = build_policy(args)
        with Runner(make_env, workers=args.workers, lockstep=lockstep, fixed_batch=not args.free_batch) as runner:
            runs.append({r.seed: r for r in runner.run(specs, policy)})
        policy.close()
    episodes = []
    for seed, first in runs[0].items():
        a, b, again = first.trajectory.action, runs[1][seed].trajectory.action, runs[2][seed].trajectory.action
        n = min(len(a), len(b))
        diff = np.abs(a[:n] - b[:n]).max(-1)
        obs_step = first_differing_observation(first.trajectory, runs[1][seed].trajectory)
        episodes.append({
            "seed": seed,
            "task": first.task,
            "lockstep_rerun_identical": bool(a.shape == again.shape and np.array_equal(a, again)),
            "async_identical": bool(a.shape == b.shape and np.array_equal(a, b)),
            "first_differing_step": int(np.argmax(diff > 0)) if (diff > 0).any() else None,
            # observation t is what action t was chosen from: an earlier observation difference
            # than action difference points at the simulation or the renderer, not the policy
            "first_differing_observation": obs_step,
            "max_action_diff": {str(t): float(diff[t]) for t in (0, 5, 20) if t < n},
            "success_lockstep": first.success, "success_async": runs[1][seed].success,
        })  # fmt: skip
    return {
        "benchmark": "async_divergence",
        "config": vars(args),
        "episodes": episodes,
        "outcome_differs": sum(e["success_lockstep"] != e["success_async"] for e in episodes),
        "async_identical": sum(e["async_identical"] for e in episodes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a train_policy.py run or checkpoint directory")
    parser.add_argument("--policy", default="flow", help="policy=<name> of the checkpoint (flow, vla, qsft)")
    parser.add_argument("--task", default="lift", help="a task or a selection (lift+stack, suite)")
    parser.add_argument("--size", type=int, default=64, help="camera image side (the policy's training size)")
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1000, help="eval_sim's default seed: its first episodes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--free-batch", action="store_true", help="runner.fixed_batch=false: batches of the ready rows")
    parser.add_argument("--override", nargs="*", default=[], help="more eval_sim overrides (e.g. steer=true ...)")
    parser.add_argument("--out", default="benchmarks/results/async_divergence.json")
    args = parser.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")
    result = run(args)
    for e in result["episodes"]:
        print(f"{e['task']} seed {e['seed']}: lockstep rerun identical {e['lockstep_rerun_identical']}, "
              f"async identical "
              f"{e['async_identical']}, first differing step "
              f"{e['first_differing_step']} (observation {e['first_differing_observation']}), "
              f"max |action diff| {e['max_action_diff']}, success lockstep "
              f"{e['success_lockstep']} / async {e['success_async']}")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
