"""A trained critic, loaded from a `train_value.py` checkpoint, ready to score actions (DESIGN.md).

    scorer = load_critic("runs/train_value/<name>")          # or a checkpoint directory
    scorer.q(images, lang, normalised_actions)                # (ensemble, B), the Critic contract
    scorer.score(obs, actions)                                # (K,) for K canonical actions
    scorer.score_batch(observations, actions)                 # (N, K) for N observations

`score` encodes the image and the instruction once and evaluates all K actions in one batch of the
heads; actions are normalised with the *critic's own* training statistics (V-GPS's released code
re-scales queries with other bounds than it trained with; reference/vgps.md). As in V-GPS, scores
use the target critic's parameters and the minimum over the ensemble. Images of another size than
the critic was trained on are resized (antialiased) first.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.nn import functional as F

from configs.checkpoint import load_checkpoint, resolve_checkpoint
from configs.errors import UserError
from data.normalize import ActionNormalizer
from values.language import EmbeddingCache, make_language_encoder
from values.networks import Critic, FiLMResNet


class CriticScorer:
    """A critic network + its normalisation statistics + its language encoder."""

    def __init__(
        self, critic: Critic, normalizer: ActionNormalizer, language: EmbeddingCache, image_shape: Sequence[int]
    ) -> None:
        self.critic, self.normalizer, self.language = critic.eval(), normalizer, language
        self.image_shape = tuple(image_shape)
        self.device = next(critic.parameters()).device

    @torch.no_grad()
    def q(self, images: torch.Tensor, lang: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3), (B, D), normalised (B, 7) -> (ensemble, B)."""
        return self.critic.q(self._images(images), lang, actions).float()

    @torch.no_grad()
    def score_batch(self, observations: Sequence[dict[str, Any]], actions: np.ndarray | torch.Tensor) -> torch.Tensor:
        """N observations and their K canonical candidate actions (N, K, 7) -> (N, K) scores."""
        actions = torch.as_tensor(np.asarray(actions, dtype=np.float32), device=self.device)
        if actions.dim() != 3 or actions.shape[0] != len(observations) or actions.shape[-1] != 7:
            raise ValueError(f"actions must be (N={len(observations)}, K, 7), got {tuple(actions.shape)}")
        images = torch.stack([torch.as_tensor(o["image_primary"]) for o in observations]).to(self.device)
        lang = torch.stack([self.language.get(o["instruction"]) for o in observations])
        emb = self.critic.embed(self._images(images), lang)  # each image and instruction encoded once
        q = self.critic.q_from_embedding(emb, self.normalizer.normalize(actions))  # (E, N, K)
        return q.float().min(dim=0).values

    def score(self, obs: dict[str, Any], actions: np.ndarray | torch.Tensor) -> torch.Tensor:
        """One observation, K canonical actions (K, 7) -> (K,)."""
        return self.score_batch([obs], np.asarray(actions)[None])[0]

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        if tuple(images.shape[1:3]) == self.image_shape[:2]:
            return images
        x = F.interpolate(
            images.permute(0, 3, 1, 2).float(), size=self.image_shape[:2], mode="bilinear", antialias=True
        )
        return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def load_critic(
    path: str | Path, device: str | torch.device = "cpu", params: str = "target", dataset: str | None = None
) -> CriticScorer:
    """Load the critic of a run directory or checkpoint; `params` "target" (V-GPS) or "online"."""
    ckpt = resolve_checkpoint(path)
    cfg = OmegaConf.create((ckpt / "config.yaml").read_text())
    stats = json.loads((ckpt / "dataset_statistics.json").read_text())
    language_info = json.loads((ckpt / "language.json").read_text())
    name = dataset or next(iter(stats))
    if name not in stats:
        raise UserError(f"{ckpt} has statistics for {sorted(stats)}, not {name!r}.")
    encoder = make_language_encoder(language_info["encoder"], device="cpu")
    if encoder.identity() != language_info["encoder"]:
        raise UserError(
            f"{ckpt} was trained with language encoder {language_info['encoder']}, got {encoder.identity()}."
        )
    critic = Critic(FiLMResNet(cfg.value.encoder, encoder.dim), cfg.value.hidden, cfg.value.ensemble)
    state, meta = load_checkpoint(ckpt, device="cpu")
    prefix = {"target": "target.", "online": "critic."}[params]
    critic.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    critic.to(device)
    normalizer = ActionNormalizer(stats[name], cfg.data.normalization, source=f"{ckpt} statistics of {name}")
    return CriticScorer(critic, normalizer, EmbeddingCache(encoder, device), meta["image_shape"])
