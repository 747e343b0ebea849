"""Is there anything for a critic to choose? The true value of each steering candidate, by rollouts.

    python benchmarks/steer_oracle.py --policy runs/train_policy/flow --critic runs/train_value/critic \
        --task lift --image-size 64 --states 30 --k 8 --rollouts 2

Steering helps only if the K candidates the policy proposes differ in how likely they are to succeed,
and the critic ranks them by it. `steer_preferences.py` measures what the critic prefers on data
frames; this measures what the choice is worth, in the simulator. For `--states` states (the base
policy run to a random step t of an evaluation episode: the same seeds as `eval_sim.py seed=...`),
it saves the simulator state (`SimEnv.snapshot`), lets the steered policy's `rank_batch` draw K
candidates and score them, exactly as `eval_sim.py steer=true` does, then for each candidate restores
the state `--rollouts` times, executes the candidate's first action (what steering executes) and
lets the base policy finish the episode. The outcome of a branch is its success.

Reported (`summary`), over states, with 95% intervals where it applies:
- `success_mean`: the branches' mean success: the base policy's value at these states;
- `critic_pick`: the success of the critic's argmax candidate, and `critic_pick_gain` over the mean:
  one step of argmax steering, what the critic's choice is worth;
- `oracle_pick`: the success of the best candidate by half of the rollouts, measured on the other
  half (unbiased for what a critic as good as `rollouts / 2` rollouts could get); `oracle_pick_gain`;
- `choice_share`: the share of the branches' outcome variance that the choice of candidate explains
  (one-way random-effects ANOVA over candidates within states): near 0, no critic can help;
- `concordance`: over pairs of candidates of one state whose outcomes differ, how often the critic
  orders them as the outcomes do (0.5: no better than chance), with the pair count.

Every state's K scores and outcomes are in `states`, for other statistics. Writes JSON (`--out`,
default `<critic run>/steer_oracle_<task>.json`) and prints the summary. Costs about
states * k * rollouts * (remaining steps) environment steps: 14 states * 8 * 2 Lift branches at 64 px
took 6 minutes with the flow policy on 2 CPU cores (docs/steering.md has the results).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _interval(values: np.ndarray) -> list[float]:
    """Mean +- 1.96 standard errors of per-state values."""
    if len(values) < 2:
        return [float("nan"), float("nan")]
    half = 1.96 * float(values.std(ddof=1)) / math.sqrt(len(values))
    return [round(float(values.mean()) - half, 4), round(float(values.mean()) + half, 4)]


def oracle_summary(outcomes: np.ndarray, q: np.ndarray) -> dict[str, Any]:
    """Branch outcomes (S, K, R) and critic scores (S, K) -> the summary the module docstring describes."""
    outcomes, q = np.asarray(outcomes, np.float64), np.asarray(q, np.float64)
    states, k, rollouts = outcomes.shape
    if q.shape != (states, k):
        raise ValueError(f"scores {q.shape} do not match outcomes {outcomes.shape}")
    per_candidate = outcomes.mean(2)  # (S, K)
    mean = per_candidate.mean(1)
    critic = per_candidate[np.arange(states), q.argmax(1)]
    result: dict[str, Any] = {"states": states, "k": k, "rollouts": rollouts,
                              "success_mean": round(float(mean.mean()), 4)}  # fmt: skip
    result["critic_pick"] = round(float(critic.mean()), 4)
    result["critic_pick_gain"] = round(float((critic - mean).mean()), 4)
    result["critic_pick_gain_ci95"] = _interval(critic - mean)
    if rollouts >= 2:
        half = rollouts // 2
        oracle = (
            _best_on(outcomes[:, :, :half], outcomes[:, :, half:])
            + _best_on(outcomes[:, :, half:], outcomes[:, :, :half])
        ) / 2
        result["oracle_pick"] = round(float(oracle.mean()), 4)
        result["oracle_pick_gain"] = round(float((oracle - mean).mean()), 4)
        result["oracle_pick_gain_ci95"] = _interval(oracle - mean)
        between = rollouts * per_candidate.var(1, ddof=1)  # mean squares between candidates, per state
        within = outcomes.var(2, ddof=1).mean(1)  # ... and within them
        sigma_between = float(((between - within) / rollouts).mean())
        sigma_within = float(within.mean())
        total = sigma_between + sigma_within
        result["choice_share"] = round(sigma_between / total, 4) if total > 0 else 0.0
    agree, pairs = 0.0, 0
    for s in range(states):
        for i in range(k):
            for j in range(i + 1, k):
                d = per_candidate[s, i] - per_candidate[s, j]
                if d != 0:
                    pairs += 1
                    dq = q[s, i] - q[s, j]
                    agree += 0.5 if dq == 0 else float(np.sign(dq) == np.sign(d))
    result["concordance"] = round(agree / pairs, 4) if pairs else float("nan")
    result["concordance_pairs"] = pairs
    return result


def _best_on(choose: np.ndarray, judge: np.ndarray) -> np.ndarray:
    """Per state: the mean of `judge` (S, K, r) over the candidates with the best mean of `choose`
    (ties: every best candidate equally likely)."""
    score = choose.mean(2)
    best = score == score.max(1, keepdims=True)
    return (judge.mean(2) * best).sum(1) / best.sum(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="policy checkpoint or train_policy.py run directory")
    p.add_argument("--policy-name", default=None, help="policy config group (flow, vla...); default: the checkpoint's")
    p.add_argument("--critic", required=True, help="steering.critic: a train_value.py or train_qsft.py run, or random")
    p.add_argument("--task", default="lift")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--states", type=int, default=30)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--rollouts", type=int, default=2, help="branches per candidate (>= 2 for the oracle)")
    p.add_argument("--t-max", type=int, default=30, help="states are at a step drawn from [0, t-max]")
    p.add_argument("--seed", type=int, default=1000, help="eval_sim.py's seed: the episodes' initial states")
    p.add_argument(
        "--override",
        nargs="*",
        default=[],
        help="more eval_sim overrides (policy.noise_scale=1.5 steering.qsft_mode=ratio)",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.states < 1 or args.k < 2 or args.rollouts < 1 or args.t_max < 0:
        p.error("need --states >= 1, --k >= 2 (something to choose from), --rollouts >= 1 and --t-max >= 0")

    from hydra import compose, initialize_config_dir

    from configs import CONFIG_DIR
    from configs.schema import register
    from policies.learned import checkpoint_policy_name
    from sim.env import SimEnv
    from sim.evaluate import build_policy
    from sim.runner import episode_seed

    register()
    args.policy_name = args.policy_name or checkpoint_policy_name(args.policy)
    overrides = [f"policy={args.policy_name}", f"policy.checkpoint={args.policy}", "steer=true", f"sim={args.task}",
                 f"steering.critic={args.critic}", f"steering.k={args.k}", "steering.beta=0",
                 f"sim.image_size={args.image_size}", *args.override]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("eval_sim", overrides=overrides)
    steered = build_policy(cfg)
    base = steered.base
    branches = args.k * args.rollouts
    trunk = SimEnv(args.task, cfg.sim)
    envs = [SimEnv(args.task, cfg.sim) for _ in range(branches)]
    rng = np.random.default_rng(args.seed)
    records, started = [], time.perf_counter()
    for i in range(args.states):
        seed = episode_seed(args.seed, args.task, i)
        obs = trunk.reset(seed)
        steered.reset(obs["instruction"], slot=0, seed=seed)
        t_branch, done = int(rng.integers(0, args.t_max + 1)), False
        for _ in range(t_branch):
            obs, _, done, info = trunk.step(base.act_batch([obs], [0])[0, 0])
            if done:
                break
        if done:  # succeeded (or timed out) before the branch point: nothing to choose there
            records.append({"seed": seed, "t": trunk.t, "ended_before_branch": True, "success": bool(info["success"])})
            continue
        snap = trunk.snapshot()
        candidates, q = steered.rank_batch([obs], args.k, [0])
        outcome = np.zeros((args.k, args.rollouts), bool)
        observations, live = [], []
        for b, env in enumerate(envs):
            c, r = divmod(b, args.rollouts)
            env.restore(snap)
            base.reset(
                obs["instruction"], slot=1 + b, seed=int(np.random.SeedSequence([seed, c, r]).generate_state(1)[0])
            )
            o, _, d, info = env.step(candidates[0, c, 0])
            outcome[c, r] = info["success"]
            if not d:
                observations.append(o)
                live.append(b)
        while live:
            actions = base.act_batch(observations, [1 + b for b in live])[:, 0]
            observations, still = [], []
            for b, action in zip(live, actions, strict=True):
                o, _, d, info = envs[b].step(action)
                c, r = divmod(b, args.rollouts)
                outcome[c, r] = info["success"]
                if not d:
                    observations.append(o)
                    still.append(b)
            live = still
        records.append({"seed": seed, "t": t_branch, "q": np.round(q[0], 4).tolist(),
                        "outcomes": outcome.astype(int).tolist(),
                        "first_actions": np.round(candidates[0, :, 0], 4).tolist()})  # fmt: skip
        print(f"state {i + 1}/{args.states} (t={t_branch}): success by candidate "
              f"{outcome.mean(1).round(2).tolist()}, critic picks {int(q[0].argmax())} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    branched = [r for r in records if "q" in r]
    if not branched:
        raise SystemExit("every episode ended before its branch point: lower --t-max")
    summary = oracle_summary(np.array([r["outcomes"] for r in branched]), np.array([r["q"] for r in branched]))
    summary["ended_before_branch"] = len(records) - len(branched)
    result = {"benchmark": "steer_oracle", "policy": args.policy, "policy_name": args.policy_name,
              "critic": args.critic, "task": args.task, "image_size": args.image_size, "t_max": args.t_max,
              "seed": args.seed, "overrides": args.override, "seconds": round(time.perf_counter() - started, 1),
              "summary": summary, "states": records}  # fmt: skip
    trunk.close()
    for env in envs:
        env.close()
    steered.close()
    out = Path(args.out) if args.out else Path(args.critic) / f"steer_oracle_{args.task}.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
