"""Does Q-SFT learn values? A CPU-sized check on the toy reaching data (data/synthetic.py), no simulator.

    python benchmarks/qsft_values.py --steps 600 --labels uniform dummy

Half the episodes succeed (the gripper moves +x and closes; reward 1 at the end), half wander -x
and fail. Every episode starts in the same state, so from the first frame an RL policy should move
+x while behaviour cloning copies the 50/50 mixture. For each label form, a tiny Q-SFT model is
trained with train_qsft (random init, pi_phi jointly), then on held-out episodes:

- auc_<mode>:        ROC AUC of the critic (p_theta or p_theta / pi_phi of the dataset action's
                     last token) separating transitions of successful from failed episodes; auc_pi_phi
                     is pi_phi's own probability of it (no values: how far likelihood alone goes),
- plus_x_beta<b>:    fraction of 64 sampled first actions (temperature 1) with dx > 0, for beta = 0
                     (pi_phi alone = SFT) and beta > 0 (Q-SFT's selection rule).

Writes benchmarks/results/qsft_values.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODES = ("p_theta", "ratio")
sys.path.insert(0, str(REPO))

TINY = [  # a one-block ViT at 32 px and a 2-layer Llama (hidden 64): ~0.1 s per step on one CPU thread
    "policy.model.vla.vision.arch=vit_tiny_patch16_224", "policy.model.vla.vision.grid=null",
    "+policy.model.vla.vision.kwargs={img_size: 32, patch_size: 8, embed_dim: 64, depth: 1, num_heads: 2}",
    "policy.model.vla.lm.hidden_size=64", "policy.model.vla.lm.layers=2", "policy.model.vla.lm.heads=2",
    "data.num_workers=0", "device=cpu", "data.datasets.sim.val_fraction=0.25",
]  # fmt: skip


def write_data(root: Path, episodes: int, image_size: int) -> Path:
    from data.features import sim_dataset_spec
    from data.rlds_writer import stage_episode, write_rlds
    from data.synthetic import reaching_episode

    rng = np.random.default_rng(0)
    for i in range(episodes):
        episode = reaching_episode(rng, i, success=i % 2 == 0, image_size=image_size, length=12)
        stage_episode(root / "staging", f"{i:04d}", episode)
    write_rlds(root / "staging", root / "data", "robosteer_sim_suite", "1.0.0", sim_dataset_spec(image_size))
    return root / "data"


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties count half."""
    pos, neg = scores[positive], scores[~positive]
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def evaluate(run_dir: Path, cfg, betas: list[float]) -> dict:
    import torch

    from data.loader import build_datasets
    from data.prepare import prepare_data
    from policies.qsft.policy import load_qsft

    model = load_qsft(run_dir).model
    val, _ = build_datasets(prepare_data(cfg.data), cfg.data, "val")
    batch = val.__getitems__(list(range(len(val))))
    ids = model.tokens.encode(batch["action"])[:, None]  # (N, 1, 7): the dataset action of each transition
    out = {"val_transitions": len(val)}
    with torch.no_grad():
        success = batch["success"].numpy() == 1
        p_theta, ratio = (model.score(batch["image"], batch["instruction"], ids, m)[:, 0].numpy() for m in MODES)
        out["auc_p_theta"], out["auc_ratio"] = auc(p_theta, success), auc(ratio, success)
        out["auc_pi_phi"] = auc(p_theta / ratio, success)  # the behaviour likelihood alone: the no-value baseline
        first = np.nonzero(batch["timestep"].numpy() == 0)[0][:1]
        g = torch.Generator().manual_seed(0)
        for beta in betas:
            chosen = model.select(batch["image"][first], [batch["instruction"][first[0]]], 64, beta, 1.0, 0, g)
            out[f"plus_x_beta{beta:g}"] = float((model.tokens.decode(chosen)[0, :, 0] > 0).float().mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--episodes", type=int, default=48)
    parser.add_argument("--labels", nargs="+", default=["uniform", "dummy"])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 4.0, 16.0])
    parser.add_argument("--extra", nargs="*", default=[], help="more train_qsft overrides")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "qsft_values.json"))
    args = parser.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    from configs import CONFIG_DIR
    from configs.schema import register
    from policies.qsft.training import train_qsft

    torch.set_num_threads(1)
    register()
    results: dict = {"steps": args.steps, "batch": args.batch, "episodes": args.episodes, "extra": args.extra}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = write_data(Path(tmp), args.episodes, 32)
        for labels in args.labels:
            overrides = [*TINY, f"data.data_dir={data_dir}", f"run_root={tmp}/runs", f"name={labels}",
                         f"steps={args.steps}", f"batch_size={args.batch}", f"policy.model.labels={labels}",
                         "warmup_steps=50", "lr=3e-4", "lr_behaviour=3e-4", "log_every=100", "val_every=0",
                         f"ckpt_every={args.steps}", *args.extra]  # fmt: skip
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
                cfg = compose("train_qsft", overrides=overrides)
            run_dir = train_qsft(cfg)
            logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            results[labels] = {"final_train": logged[-1], **evaluate(run_dir, cfg, args.betas)}
            print(json.dumps({labels: results[labels]}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
