"""How well a trained critic separates successful from failed episodes, on every held-out transition.

    python benchmarks/value_separation.py runs/train_value/critic                       # latest checkpoint
    python benchmarks/value_separation.py runs/train_value/critic/checkpoints/step_000001000 --params online
    python benchmarks/value_separation.py runs/train_qsft/<name> --qsft-mode ratio    # a Q-SFT Q-model

train_value.py's periodic validation samples `val_batches` random batches; this reads *all* held-out
transitions of the run's own data config (the episodes its `val_fraction` held out, or the dataset's
val split) in order, scores the dataset action with the critic (target parameters, min over the
ensemble, as steering does) and reports, as JSON:

- `auc_success_matched` (values/metrics.py): P(Q_success > Q_failure) over pairs at the same timestep,
  overall and per timestep bucket, with the number of pairs in each: early steps, where a failure
  has often not happened yet (an early release, say), cannot be separated by anything that sees only
  the present, so the per-bucket figures show where the separation comes from;
- `spearman_mc_return`: rank correlation of Q with the Monte-Carlo return;
- the mean Q of successful and failed episodes per timestep (the curves behind the AUC);
- `by_task`: the AUC, correlation and episode counts of each sim task (the registry's phrasings of
  each held-out instruction), when the data hold several, since a mixture's overall AUC can hide
  one task that the critic does not separate at all.

A train_qsft.py checkpoint is scored the way `steer.critic=qsft` scores candidates
(policies/qsft/policy.py): p_theta of the action's last token (`--qsft-mode p_theta`) or that over
pi_phi's (`ratio`). `--val-fraction` re-draws the held-out episodes (the split hashes episode keys, so
a smaller fraction's episodes are a subset of a larger one's): the same episodes for two runs whose
configs held out different fractions.

Writes `<out>` (default `<run>/value_separation.json`) and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs.checkpoint import resolve_checkpoint  # noqa: E402
from data.config import DataConfig  # noqa: E402
from data.loader import MixtureDataset, build_datasets  # noqa: E402
from data.prepare import prepare_data  # noqa: E402
from policies.qsft.policy import load_qsft  # noqa: E402
from policies.qsft.qsft import CRITIC_MODES  # noqa: E402
from values.critic import load_critic  # noqa: E402
from values.metrics import matched_auc, spearman  # noqa: E402


def separation(q: np.ndarray, success: np.ndarray, timestep: np.ndarray, mc: np.ndarray, edges: list[int]) -> dict:
    """Matched AUC overall and per [edges[i], edges[i+1]) timestep bucket, Spearman, per-step mean curves."""
    out: dict = {"transitions": len(q), "auc_success_matched": matched_auc(q, success, timestep)}
    out["spearman_mc_return"] = spearman(q, mc)
    buckets = []
    for lo, hi in itertools.pairwise(edges):
        sel = (timestep >= lo) & (timestep < hi)
        pairs = sum(
            int(success[sel & (timestep == t)].sum()) * int((~success[sel & (timestep == t)]).sum())
            for t in np.unique(timestep[sel])
        )
        auc = matched_auc(q[sel], success[sel], timestep[sel]) if pairs else float("nan")
        buckets.append({"timesteps": [lo, hi], "pairs": pairs, "auc_success_matched": auc})
    out["by_timestep"] = buckets
    curve = []
    for t in np.unique(timestep):
        at = timestep == t
        row = {"t": int(t)}
        for name, mask in (("success", at & success), ("failure", at & ~success)):
            row[f"q_{name}"] = float(q[mask].mean()) if mask.any() else None
            row[f"n_{name}"] = int(mask.sum())
        curve.append(row)
    out["mean_q_by_timestep"] = curve
    return out


def tasks_of(instructions: list[str]) -> list[str | None]:
    """The sim task whose phrasings include each instruction (None: no registered task, e.g. Bridge)."""
    from sim.tasks import TASKS

    phrasing = {text: name for name in TASKS.names() for text in TASKS.get(name).instructions}
    return [phrasing.get(text) for text in instructions]


def by_task(q: np.ndarray, success: np.ndarray, timestep: np.ndarray, mc: np.ndarray, episode: np.ndarray,
            task: np.ndarray) -> dict:  # fmt: skip
    """Per sim task: transitions, episodes, matched AUC (NaN if one class is missing) and Spearman."""
    out = {}
    for name in sorted({t for t in task if t is not None}):
        sel = task == name
        s = success[sel]
        out[name] = {
            "transitions": int(sel.sum()),
            "episodes": {"success": len(np.unique(episode[sel][s])), "failure": len(np.unique(episode[sel][~s]))},
            "auc_success_matched": matched_auc(q[sel], s, timestep[sel]) if 0 < s.sum() < len(s) else float("nan"),
            "spearman_mc_return": spearman(q[sel], mc[sel]),
        }
    return out


def held_out(run: str, val_fraction: float | None = None) -> tuple[Path, dict, MixtureDataset]:
    """(checkpoint dir, prepared datasets, held-out MixtureDataset) of a run's own data config.

    `val_fraction` replaces each dataset's held-out fraction (None keeps the run's).
    """
    ckpt = resolve_checkpoint(run)
    saved = OmegaConf.create((ckpt / "config.yaml").read_text())
    data_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), saved.data))
    if val_fraction is not None:
        for dataset in data_cfg.datasets.values():
            dataset.val_fraction = val_fraction
    prepared = prepare_data(data_cfg)
    proprio = bool(saved.get("value", {}).get("proprio", False))  # a critic that reads the state (value.proprio)
    return ckpt, prepared, build_datasets(prepared, data_cfg, "val", proprio=proprio)[0]


def is_qsft(ckpt: Path) -> bool:
    meta = ckpt / "meta.json"
    return meta.is_file() and json.loads(meta.read_text()).get("policy") == "qsft"


def critic_scorer(ckpt: Path, params: str, prepared: dict, val: MixtureDataset) -> Callable[[dict], torch.Tensor]:
    """batch -> Q of its dataset actions: target (or online) parameters, min over the ensemble, as steering."""
    scorer = load_critic(ckpt, params=params, dataset=next(iter(prepared)))
    lang = scorer.language.table(val.instructions)
    return lambda b: scorer.q(b["image"], lang[b["instruction_id"]], b["action"], b.get("state")).min(0).values


def qsft_scorer(ckpt: Path, mode: str) -> Callable[[dict], torch.Tensor]:
    """batch -> a Q-SFT model's Q of its dataset actions, as `steer.critic=qsft` scores candidates.

    The loader's actions are already normalised with the run's statistics, so they are tokenised
    directly (QSFTCritic would normalise canonical ones).
    """
    model = load_qsft(ckpt).model
    return lambda b: model.score(b["image"], b["instruction"], model.tokens.encode(b["action"])[:, None], mode)[:, 0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="train_value.py or train_qsft.py run directory, or a checkpoint directory")
    p.add_argument("--params", default="target", choices=["target", "online"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--buckets", type=int, nargs="+", default=[0, 10, 20, 30, 10**6], help="timestep bucket edges")
    p.add_argument("--qsft-mode", default="p_theta", choices=list(CRITIC_MODES), help="for a train_qsft.py run")
    p.add_argument("--val-fraction", type=float, default=None, help="held-out fraction instead of the run's")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    ckpt, prepared, val = held_out(args.run, args.val_fraction)
    qsft = is_qsft(ckpt)
    q_of = qsft_scorer(ckpt, args.qsft_mode) if qsft else critic_scorer(ckpt, args.params, prepared, val)
    qs, ok, ts, mcs, ids = [], [], [], [], []
    with torch.no_grad():
        for start in range(0, len(val), args.batch):
            b = val.__getitems__(list(range(start, min(start + args.batch, len(val)))))
            q = q_of(b)
            qs.append(q.numpy())
            ok.append(b["success"].numpy())
            ts.append(b["timestep"].numpy())
            mcs.append(b["mc_return"].numpy())
            ids.append(b["instruction_id"].numpy())
    q, success, timestep, mc = (np.concatenate(x) for x in (qs, ok, ts, mcs))
    episode = np.concatenate([part.episode + 10**9 * i for i, part in enumerate(val.parts)])  # unique across parts
    known = success >= 0
    if len(np.unique(success[known])) < 2:
        raise SystemExit("The held-out episodes are all successes or all failures: no separation to measure.")
    result = {
        "benchmark": "value_separation",
        "checkpoint": str(ckpt),
        "scorer": f"qsft:{args.qsft_mode}" if qsft else f"critic:{args.params}",
        "val_fraction": args.val_fraction,
        "episodes": {name: len(np.unique(episode[success == flag])) for name, flag in (("success", 1), ("failure", 0))},
        **separation(q[known], success[known] == 1, timestep[known], mc[known], args.buckets),
    }
    task = np.array(tasks_of(val.instructions), dtype=object)[np.concatenate(ids)]
    if len({t for t in task if t is not None}) > 1:
        result["by_task"] = by_task(q[known], success[known] == 1, timestep[known], mc[known], episode[known],
                                    task[known])  # fmt: skip
    out = Path(args.out) if args.out else Path(args.run) / "value_separation.json"
    out.write_text(json.dumps(result, indent=1))
    by = ", ".join(
        f"t{b['timesteps'][0]}-{b['timesteps'][1]}: {b['auc_success_matched']:.3f} ({b['pairs']} pairs)"
        for b in result["by_timestep"]
        if b["pairs"]
    )
    tasks = "".join(f", {n} {t['auc_success_matched']:.3f}" for n, t in result.get("by_task", {}).items())
    print(f"{ckpt}: AUC {result['auc_success_matched']:.3f} [{by}]{tasks}, spearman "
          f"{result['spearman_mc_return']:.3f}, {result['transitions']} transitions -> {out}")  # fmt: skip


if __name__ == "__main__":
    main()
