"""Where do a Q-SFT checkpoint's backup targets come from? (the over-estimation diagnostic of docs/qsft.md)

    python benchmarks/qsft_backup.py runs/train_qsft/<name>                     # latest checkpoint
    python benchmarks/qsft_backup.py runs/train_qsft/<name> --val-fraction 0.2 --out backup.json

On every held-out transition of the run's own data config, at each token state inside the action
(after token j = 0..5, where the data's next token a_{j+1} is known), this compares the values the
backup could bootstrap from, all read off the target p_thetabar over pi_phi (gamma = 1 inside an
action, so each is an estimate of the robot step's Q):

- `data_token`:  p_thetabar(a_{j+1}) / pi_phi(a_{j+1}), the data's own continuation (a SARSA-style target);
- `pi_top`:      the ratio at pi_phi's most likely token;
- `double`:      the ratio at the token p_theta's ratio picks (`backup=double`);
- `max`:         the largest ratio over tokens with pi_phi > floor (`backup=max`, Q-SFT's backup);

next to `mc_return`, the transition's discounted return in the data (what `data_token` should match).
That comparison needs the run's data rewards in Q-SFT's units (`data.reward.success_reward=1
step_reward=0 discount=<gamma>`, as `backup=mc` runs have); for other runs it is refused and the
returns are left out of the JSON. For the max it also reports pi_phi's probability of the token
it picks and how often that is pi_phi's most likely token: a max that keeps choosing tokens pi_phi
finds unlikely, with ratios above the data's returns, is the backup leaving the data.

Writes JSON (default `<run>/qsft_backup.json`) and prints a summary line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.value_separation import held_out  # noqa: E402
from policies.qsft.policy import load_qsft  # noqa: E402
from policies.qsft.qsft import QSFTModel, double_ratio, log_q, max_ratio, ratio_support  # noqa: E402

ESTIMATES = ("data_token", "pi_top", "double", "max")


@torch.no_grad()
def backup_estimates(model: QSFTModel, batch: dict, floor: float) -> dict[str, torch.Tensor]:
    """Per transition and token state after token j = 0..5: the four estimates and the max's choice, (B, 6) each."""
    ids = model.tokens.encode(batch["action"])  # (B, 7)
    index = model.tokens.id_to_index(ids)

    def rows(backbone, labels: str) -> torch.Tensor:  # log-probabilities at the states after tokens 0..5
        logits = backbone.action_logits(backbone.prefix(batch["image"], batch["instruction"]), ids[:, :-1])
        return log_q(logits, labels)[:, 1:]

    # pi_phi: the softmax over the action tokens (labels "uniform"), as in the loss
    log_pi, log_t = rows(model.pi, "uniform"), rows(model.q_target, model.labels)
    log_online = rows(model.q, model.labels)
    log_ratio = log_t - log_pi
    nxt = index[:, 1:, None]  # the data's next token
    top = log_pi.argmax(-1, keepdim=True)
    support = ratio_support(log_pi, floor)
    pick = log_ratio.masked_fill(~support, float("-inf")).argmax(-1, keepdim=True)  # the max's token
    return {
        "data_token": log_ratio.gather(-1, nxt)[..., 0].exp(),
        "pi_top": log_ratio.gather(-1, top)[..., 0].exp(),
        "double": double_ratio(log_t, log_pi, log_online, floor)[0],
        "max": max_ratio(log_t, log_pi, floor)[0],
        "max_token_pi": log_pi.gather(-1, pick)[..., 0].exp(),
        "max_is_pi_top": (pick == top)[..., 0].float(),
        "data_token_supported": support.gather(-1, nxt)[..., 0].float(),
    }


def summarise(parts: dict[str, np.ndarray], mc: np.ndarray | None) -> dict:
    """Means over transitions and token states; per estimate also the fraction above 1 (clipped by the backup).

    mc: the transitions' returns in Q-SFT's units, or None (not comparable; left out).
    """
    out: dict = {"mc_return": None if mc is None else float(mc.mean())}
    for name in ESTIMATES:
        v = parts[name]
        out[name] = {"mean": float(v.mean()), "median": float(np.median(v)), "above_1": float((v > 1).mean())}
        if mc is not None:
            out[name]["mean_minus_mc_return"] = float((v - mc[:, None]).mean())
    supported = parts["data_token_supported"] == 1  # the data token above the floor: the max's own support
    if supported.any():
        out["data_token_where_supported"] = {
            "mean": float(parts["data_token"][supported].mean()),
            "median": float(np.median(parts["data_token"][supported])),
        }
        if mc is not None:
            out["data_token_where_supported"]["mc_return"] = float(
                np.broadcast_to(mc[:, None], supported.shape)[supported].mean()
            )
    out["max_token_pi_median"] = float(np.median(parts["max_token_pi"]))
    out["max_is_pi_top"] = float(parts["max_is_pi_top"].mean())
    out["data_token_supported"] = float(parts["data_token_supported"].mean())
    out["by_token_state"] = [
        {"after_token": j, **{name: float(parts[name][:, j].mean()) for name in ESTIMATES}} for j in range(6)
    ]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="train_qsft.py run directory, or a checkpoint directory")
    p.add_argument("--floor", type=float, default=None, help="the max's pi_phi floor (default: the run's pi_floor)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--val-fraction", type=float, default=None, help="held-out fraction instead of the run's")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    ckpt, _, val = held_out(args.run, args.val_fraction)
    loaded = load_qsft(ckpt)
    floor = args.floor if args.floor is not None else float(loaded.cfg.get("pi_floor", 1e-4))
    parts: dict[str, list] = {}
    mcs = []
    for start in range(0, len(val), args.batch):
        b = val.__getitems__(list(range(start, min(start + args.batch, len(val)))))
        for name, v in backup_estimates(loaded.model, b, floor).items():
            parts.setdefault(name, []).append(v.numpy())
        mcs.append(b["mc_return"].numpy())
    returns = np.concatenate(mcs)
    reward, gamma = loaded.cfg.data.reward, float(loaded.cfg.get("gamma", 0.98))
    units = (float(reward.success_reward), float(reward.step_reward), float(reward.discount)) == (1.0, 0.0, gamma)
    if not units:
        print(
            f"note: the run's data returns are not in Q-SFT's units (success_reward={reward.success_reward}, "
            f"step_reward={reward.step_reward}, discount={reward.discount}, gamma={gamma}): no mc_return comparison"
        )
    mc = returns if units else None
    joined = {name: np.concatenate(v) for name, v in parts.items()}
    result = {"benchmark": "qsft_backup", "checkpoint": str(ckpt), "floor": floor, "transitions": len(returns),
              "val_fraction": args.val_fraction, **summarise(joined, mc)}  # fmt: skip
    out = Path(args.out) if args.out else Path(args.run) / "qsft_backup.json"
    out.write_text(json.dumps(result, indent=1))
    means = ", ".join(
        f"{name} {result[name]['mean']:.3f} / {result[name]['median']:.3f} ({result[name]['above_1']:.0%} > 1)"
        for name in ESTIMATES
    )
    ret = "n/a" if mc is None else f"{result['mc_return']:.3f}"
    print(
        f"{ckpt}: mc_return {ret}; mean / median: {means}; data token above the floor "
        f"{result['data_token_supported']:.0%}; the max's token: median pi_phi {result['max_token_pi_median']:.3f}, "
        f"pi_phi's top {result['max_is_pi_top']:.0%} -> {out}"
    )


if __name__ == "__main__":
    main()
