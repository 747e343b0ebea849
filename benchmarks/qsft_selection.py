"""What does Q-SFT's selection rule do to pi_phi, token by token? (the selection diagnostic of docs/qsft.md)

    python benchmarks/qsft_selection.py runs/train_qsft/<name> --beta 100
    python benchmarks/qsft_selection.py runs/train_qsft/<name> --beta 100 --val-fraction 0.2 --out sel.json

On every held-out transition of the run's own data config, at each of the 7 token states of the
data's action (teacher forcing: the data's tokens before it), this compares four distributions over
the 256 action tokens:

- `pi`:      pi_phi, i.e. SFT sampled at temperature 1;
- `t05`:     pi_phi at temperature 0.5, softmax(2 log pi_phi), the sharper-SFT baseline;
- `qsft`:    Algorithm 1's rule pi_phi exp(beta p_theta) (`selection_logits`, `--value`);
- `control`: the same rule with pi_phi in place of p_theta, pi_phi exp(beta pi_phi).

For each it reports the mean entropy (nats), the probability of pi_phi's most likely token and of
the data's token, and `reweight_auc`: the success-vs-failure ROC-AUC (pairs matched on timestep) of
log(rule(a_data) / pi_phi(a_data)) summed over the action's 7 tokens, i.e. whether the rule moves
probability towards the actions of successful episodes more than towards those of failed ones. It also
reports the total variation distance between `qsft` and each of the others. A rule that only sharpens
pi_phi has a low entropy and a reweight AUC near 0.5; one that carries values has an AUC above 0.5.

Writes JSON (default `<run>/qsft_selection.json`) and prints a summary line.
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
from policies.qsft.qsft import QSFTModel, log_q, selection_logits  # noqa: E402
from values.metrics import matched_auc  # noqa: E402

RULES = ("pi", "t05", "qsft", "control")


@torch.no_grad()
def rule_log_probs(
    model: QSFTModel, batch: dict, beta: float, value: str = "p_theta", floor: float = 0.02
) -> dict[str, torch.Tensor]:
    """log-probabilities (B, 7, 256) of the four rules at the data action's token states (teacher forcing)."""
    ids = model.tokens.encode(batch["action"])  # (B, 7)

    def logits(backbone) -> torch.Tensor:  # rows 0..6: the states before each of the 7 tokens
        return backbone.action_logits(backbone.prefix(batch["image"], batch["instruction"]), ids[:, :-1])

    pi_logits = logits(model.pi)[..., 1:]  # pi_phi: the softmax over the action tokens
    log_pi = pi_logits.log_softmax(-1)
    q_probs = log_q(logits(model.q), model.labels).exp()
    return {
        "pi": log_pi,
        "t05": (2 * log_pi).log_softmax(-1),
        "qsft": selection_logits(pi_logits, q_probs, beta, value, floor).log_softmax(-1),
        "control": selection_logits(pi_logits, log_pi.exp(), beta).log_softmax(-1),
    }


def token_statistics(rules: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per transition (B,): each rule's mean entropy and probability of pi's top / the data token over the
    7 token states, its log re-weighting of the data action (summed), and TV distances to `qsft`."""
    top = rules["pi"].argmax(-1, keepdim=True)
    pi_data = rules["pi"].gather(-1, index[..., None])[..., 0]  # (B, 7)
    out = {}
    for name, logp in rules.items():
        p = logp.exp()
        out[f"{name}_entropy"] = -(p * logp.nan_to_num(neginf=0.0)).sum(-1).mean(-1)
        out[f"{name}_p_top"] = p.gather(-1, top)[..., 0].mean(-1)
        data = logp.gather(-1, index[..., None])[..., 0]  # (B, 7)
        out[f"{name}_p_data"] = data.exp().mean(-1)
        out[f"{name}_reweight"] = (data - pi_data).clamp(min=-50.0).sum(-1)  # -inf (token cut by a floor) -> -50
        if name != "qsft":
            out[f"tv_qsft_{name}"] = 0.5 * (rules["qsft"].exp() - p).abs().sum(-1).mean(-1)
    return out


def summarise(parts: dict[str, np.ndarray], success: np.ndarray, timestep: np.ndarray) -> dict:
    known = success >= 0
    result: dict = {"transitions": len(success), "success_fraction": float((success[known] == 1).mean())}
    for name in RULES:
        result[name] = {stat: float(parts[f"{name}_{stat}"].mean()) for stat in ("entropy", "p_top", "p_data")} | {
            "reweight_auc": matched_auc(parts[f"{name}_reweight"][known], success[known] == 1, timestep[known])
        }
        if name != "qsft":
            result[name]["tv_to_qsft"] = float(parts[f"tv_qsft_{name}"].mean())
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="train_qsft.py run directory, or a checkpoint directory")
    p.add_argument("--beta", type=float, default=1.0, help="the rule's beta (the paper's policy.beta)")
    p.add_argument("--value", default="p_theta", choices=("p_theta", "ratio"), help="as policy.select_value")
    p.add_argument("--floor", type=float, default=0.02, help="as policy.select_floor (value=ratio only)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--val-fraction", type=float, default=None, help="held-out fraction instead of the run's")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    ckpt, _, val = held_out(args.run, args.val_fraction)
    model = load_qsft(ckpt).model
    parts: dict[str, list] = {}
    success, timestep = [], []
    for start in range(0, len(val), args.batch):
        b = val.__getitems__(list(range(start, min(start + args.batch, len(val)))))
        index = model.tokens.id_to_index(model.tokens.encode(b["action"]))
        for name, v in token_statistics(rule_log_probs(model, b, args.beta, args.value, args.floor), index).items():
            parts.setdefault(name, []).append(v.numpy())
        success.append(b["success"].numpy())
        timestep.append(b["timestep"].numpy())
    joined = {name: np.concatenate(v) for name, v in parts.items()}
    result = {"benchmark": "qsft_selection", "checkpoint": str(ckpt), "beta": args.beta, "value": args.value,
              "val_fraction": args.val_fraction,
              **summarise(joined, np.concatenate(success), np.concatenate(timestep))}  # fmt: skip
    out = Path(args.out) if args.out else Path(args.run) / "qsft_selection.json"
    out.write_text(json.dumps(result, indent=1))
    line = "; ".join(
        f"{name}: H {result[name]['entropy']:.2f}, p_top {result[name]['p_top']:.3f}, "
        f"reweight AUC {result[name]['reweight_auc']:.3f}"
        for name in RULES
    )
    print(f"{ckpt} (beta {args.beta}, {result['transitions']} transitions): {line} -> {out}")


if __name__ == "__main__":
    main()
