"""A trained Q-SFT checkpoint as a Policy (`policy=qsft`) and as a critic for steering another policy.

    python eval_sim.py policy=qsft policy.checkpoint=runs/train_qsft/<name> policy.beta=1

A Q-SFT checkpoint is a policy checkpoint (policies/learned.py) whose weights hold `pi.*`, `q.*`
and `q_target.*`, written by train_qsft.py; `load_qsft` rebuilds it without the data or the hub.
`QSFTCritic` scores K canonical candidate actions of any policy (`score(obs, (K, 7)) -> (K,)`, the
CriticScorer contract of values/critic.py) from p_theta's probability of each action's last token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from configs.checkpoint import MODEL_FILE, resolve_checkpoint
from configs.errors import UserError
from data.normalize import ActionNormalizer
from policies.base import ACTION_DIM, POLICIES, Observation, Policy, fixed_batches
from policies.learned import CONFIG_FILE, STATS_FILE, LearnedPolicy, LoadedModel, dataset_stats, resolve_device
from policies.qsft.lora import lora_enabled, merge_lora
from policies.qsft.qsft import CRITIC_MODES, QSFTModel
from policies.text import fix_text_length
from policies.vision import stack_images

NAME = "qsft"


def load_qsft(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild pi_phi, p_theta and the target of a train_qsft.py checkpoint (or run) directory."""
    from safetensors.torch import load_file

    path = resolve_checkpoint(path)
    for name in (CONFIG_FILE, STATS_FILE, "meta.json"):
        if not (path / name).is_file():
            raise UserError(f"{path} is not a policy checkpoint: it has no {name}.")
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("policy") != NAME:
        raise UserError(f"{path} holds a {meta.get('policy')!r} policy, not 'qsft'; train one with train_qsft.py.")
    cfg = OmegaConf.load(path / CONFIG_FILE)
    model = QSFTModel.rebuild(cfg.policy.model, int(meta["image_size"]), path)
    missing, unexpected = model.load_state_dict(load_file(str(path / MODEL_FILE)), strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the Q-SFT architecture (missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}).")  # fmt: skip
    if lora_enabled(cfg.policy.model):  # acting: adapters folded into their weights, no per-token cost
        merge_lora(model)
    stats = json.loads((path / STATS_FILE).read_text())
    return LoadedModel(model.to(device).eval(), cfg, stats, meta, path)


class QSFTPolicy(LearnedPolicy):
    """pi(a|s) ∝ pi_phi(a|s) exp(beta p_theta(a|s)) token by token: (K, 1, 7) canonical actions per observation."""

    def __init__(self, loaded: LoadedModel, cfg: Any, device: torch.device) -> None:
        super().__init__(loaded, cfg, device)
        self.beta, self.temperature, self.top_k = float(cfg.beta), float(cfg.temperature), int(cfg.top_k)
        self.value, self.floor, self.fused = str(cfg.select_value), float(cfg.select_floor), bool(cfg.fused)
        if self.value not in CRITIC_MODES:
            raise UserError(f"policy.select_value={self.value!r}; use one of {', '.join(CRITIC_MODES)}.")
        if not 0 < self.floor < 1:
            raise UserError(f"policy.select_floor={self.floor}: it must lie in (0, 1).")

    def _sample(self, images: torch.Tensor, instructions: list[str], k: int, slots: list[int | None]) -> torch.Tensor:
        uniform = self.draw(slots, (k, ACTION_DIM)) if self.temperature > 0 else None
        ids = self.model.select(images, instructions, k, self.beta, self.temperature, self.top_k, None, self.value,
                                self.floor, self.fused, uniform)  # fmt: skip
        return self.model.tokens.decode(ids)[:, :, None]  # (N, K, 7) -> (N, K, chunk=1, 7)


@POLICIES.register(NAME)
def _qsft(cfg: Any) -> Policy:
    if not cfg.get("checkpoint"):
        raise UserError("policy=qsft needs policy.checkpoint=<dir>; train one with `python train_qsft.py`.")
    device = resolve_device(cfg.device)
    return QSFTPolicy(load_qsft(cfg.checkpoint, device), cfg, device)


class QSFTCritic:
    """Scores candidate actions of another policy with a Q-SFT checkpoint (`policies.steering.Scorer`).

    `mode`: p_theta (Theorem 4.1's conservative lower estimate of Q) or ratio (p_theta / pi_phi, the
    estimate inside the backup). Actions are normalised with the checkpoint's own statistics.
    """

    def __init__(self, loaded: LoadedModel, mode: str = "p_theta", dataset: str | None = None) -> None:
        if mode not in CRITIC_MODES:
            raise UserError(f"Q-SFT critic mode {mode!r}; use one of {', '.join(CRITIC_MODES)}.")
        self.model, self.mode = loaded.model.eval(), mode
        self.device = next(self.model.parameters()).device
        stats = dataset_stats(loaded.stats, dataset, str(loaded.path))
        self.normalizer = ActionNormalizer(stats, loaded.cfg.data.normalization, source=f"{loaded.path}/{STATS_FILE}")
        self.batch_rows: int | None = None

    def fix_batch_rows(self, rows: int | None) -> None:
        """Score exactly `rows` observations per forward from now on, padded (policies/base.py), with
        the instructions padded to a fixed length."""
        self.batch_rows = rows
        fix_text_length(self.model, rows is not None)

    @torch.no_grad()
    def score_batch(self, observations: Sequence[Observation], actions: np.ndarray | torch.Tensor) -> torch.Tensor:
        """N observations and canonical actions (N, K, 7) -> (N, K) Q estimates, one batched forward per model."""
        actions = np.asarray(actions.cpu() if isinstance(actions, torch.Tensor) else actions, np.float32)
        if actions.ndim != 3 or actions.shape[0] != len(observations) or actions.shape[-1] != 7:
            raise ValueError(f"actions must be (N={len(observations)}, K, 7), got {actions.shape}")
        ids = torch.from_numpy(self.model.tokens.encode(self.normalizer.normalize(actions))).to(self.device)
        images = [o["image_primary"] for o in observations]
        instructions = [str(o["instruction"]) for o in observations]
        outs = []
        for rows, real in fixed_batches(len(observations), self.batch_rows):
            batch = stack_images([images[i] for i in rows], self.model.image_size).to(self.device)
            outs.append(self.model.score(batch, [instructions[i] for i in rows], ids[rows], self.mode)[:real])
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def score(self, obs: Observation, actions: np.ndarray | torch.Tensor) -> torch.Tensor:
        """One observation, K canonical actions (K, 7) -> (K,)."""
        return self.score_batch([obs], np.asarray(actions, np.float32)[None])[0]


def load_qsft_critic(path: str | Path, mode: str = "p_theta", device: str = "auto", dataset: str | None = None) -> Any:
    """A QSFTCritic from a train_qsft.py run or checkpoint directory."""
    return QSFTCritic(load_qsft(path, resolve_device(device)), mode, dataset)
