"""Which action components does a critic prefer among a policy's K candidates? (steering diagnostics)

    python benchmarks/steer_preferences.py --policy runs/train_policy/flow --critic runs/train_value/critic
    python benchmarks/steer_preferences.py --policy <run> --critic <run> --frames 400 --k 10 --out prefs.json

When steering hurts, the first question is what the critic is choosing. This takes held-out frames
of the critic's own data config (the episodes its `val_fraction` held out, or the val split), lets
the policy sample K candidate chunks for each (the steered policy's `rank_batch`, so exactly what
`eval_sim.py steer=true` scores), and reports per canonical action component, overall and by
timestep bucket:

- `chosen_minus_mean_in_sd`: how far the argmax candidate lies from the mean candidate, in units of
  the candidates' standard deviation (0 = the critic does not care about this component);
- `corr_q_action`: the correlation between Q and the component across the K candidates, averaged
  over frames;
- `candidate_sd`: the candidates' standard deviation per component (canonical units), averaged over
  frames: how much choice the policy leaves the critic (a confident policy leaves little);
- `q_spread`: the mean of max - min of Q over the K candidates.

Writes JSON (default `<critic run>/steer_preferences.json`) and prints it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.value_separation import held_out  # noqa: E402 - the run's held-out data, as value_separation reads it

COMPONENTS = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")


def preferences(first: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First actions (N, K, 7) and scores (N, K) -> per frame: (argmax - mean) / sd and corr(Q, component), (N, 7)."""
    mean, sd = first.mean(1), first.std(1)
    chosen = first[np.arange(len(q)), q.argmax(1)]
    shift = np.where(sd > 1e-6, (chosen - mean) / np.maximum(sd, 1e-6), 0.0)
    qc = q - q.mean(1, keepdims=True)
    ac = first - mean[:, None]
    denom = np.sqrt((qc**2).sum(1))[:, None] * np.sqrt((ac**2).sum(1))
    corr = np.where(denom > 1e-12, (qc[:, :, None] * ac).sum(1) / np.maximum(denom, 1e-12), 0.0)
    return shift, corr


def choice(first: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First actions (N, K, 7) and scores (N, K) -> the candidates' sd per component (N, 7) and the
    Q spread, max - min over K (N,): how much there is to choose from, and how much the critic cares."""
    return first.std(1), q.max(1) - q.min(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="policy checkpoint or train_policy.py run directory")
    p.add_argument("--policy-name", default=None, help="policy config group (flow, vla...); default: the checkpoint's")
    p.add_argument("--critic", required=True, help="train_value.py run or checkpoint directory")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--frames", type=int, default=400)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--buckets", type=int, nargs="+", default=[0, 8, 20, 10**6], help="timestep bucket edges")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from hydra import compose, initialize_config_dir

    from configs import CONFIG_DIR
    from configs.schema import register
    from policies.learned import checkpoint_policy_name
    from sim.evaluate import build_policy

    register()
    args.policy_name = args.policy_name or checkpoint_policy_name(args.policy)
    overrides = [f"policy={args.policy_name}", f"policy.checkpoint={args.policy}", "steer=true",
                 f"steering.critic={args.critic}", f"steering.k={args.k}", "steering.beta=0"]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        steered = build_policy(compose("eval_sim", overrides=overrides))
    _, _, val = held_out(args.critic)
    rng = np.random.default_rng(args.seed)
    idx = np.sort(rng.choice(len(val), min(args.frames, len(val)), replace=False))
    frames = val.__getitems__(list(idx))
    # the policies read no state; a critic trained with value.proprio does: the batch's normalised state mapped
    # back (the critic clips it to the same bounds again, so it sees exactly the batch's value)
    states_of = getattr(steered.critic, "state_normalizer", None)
    states = states_of.unnormalize(frames["state"].numpy()) if states_of else np.zeros((len(idx), 7), np.float32)
    shifts, corrs, sds, spreads = [], [], [], []
    for start in range(0, len(idx), args.batch):
        rows = list(range(start, min(start + args.batch, len(idx))))
        obs = [{"image_primary": frames["image"][i].numpy(), "state": states[i],
                "instruction": frames["instruction"][i]} for i in rows]  # fmt: skip
        for slot, i in enumerate(rows):
            steered.reset(frames["instruction"][i], slot=slot)
        candidates, q = steered.rank_batch(obs, args.k, list(range(len(rows))))
        shift, corr = preferences(candidates[:, :, 0], q)
        shifts.append(shift)
        corrs.append(corr)
        sd, spread = choice(candidates[:, :, 0], q)
        sds.append(sd)
        spreads.append(spread)
    shift, corr, timestep = np.concatenate(shifts), np.concatenate(corrs), frames["timestep"].numpy()
    sd, spread = np.concatenate(sds), np.concatenate(spreads)
    result = {"benchmark": "steer_preferences", "policy": args.policy, "critic": args.critic, "k": args.k}
    groups = [("all", np.ones(len(timestep), bool))]
    groups += [(f"t{lo}-{hi}", (timestep >= lo) & (timestep < hi)) for lo, hi in itertools.pairwise(args.buckets)]
    for name, sel in groups:
        if sel.any():
            result[name] = {
                "frames": int(sel.sum()),
                "chosen_minus_mean_in_sd": dict(zip(COMPONENTS, np.round(shift[sel].mean(0), 3).tolist(), strict=True)),
                "corr_q_action": dict(zip(COMPONENTS, np.round(corr[sel].mean(0), 3).tolist(), strict=True)),
                "candidate_sd": dict(zip(COMPONENTS, np.round(sd[sel].mean(0), 4).tolist(), strict=True)),
                "q_spread": round(float(spread[sel].mean()), 3),
            }
    out = Path(args.out) if args.out else Path(args.critic) / "steer_preferences.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
