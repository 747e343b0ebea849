"""A continuous chunked policy in the spirit of Octo, with a flow-matching action head.

Trunk (Octo's token layout at small scale): the instruction's byte tokens (learned embeddings and
positions), the image tokens of a timm encoder (projected, learned positions) and one readout
token go through a pre-norm transformer; observation tokens attend to each other, the readout
attends to everything and nothing attends to the readout (Octo's readouts are passive). The
readout's output conditions the head.

Head: a residual MLP (Octo's diffusion-head shape) predicting the velocity of a rectified flow
(Lipman et al. 2023, "Flow Matching for Generative Modeling"; Liu et al. 2023, rectified flow) over a
chunk of `chunk` normalised actions:

    x_t = (1 - t) * noise + t * actions,   t ~ U[0, 1],   noise ~ N(0, I)
    loss = || v(x_t, t | obs) - (actions - noise) ||^2       over valid chunk steps only

Sampling integrates dx/dt = v from t = 0 (noise) to t = 1 with `flow_steps` Euler steps. K samples
per observation encode the observation once and integrate K noises in one batch. Octo uses a
20-step DDPM head instead; flow matching needs fewer steps for the same quality.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from configs.errors import UserError
from policies.base import ACTION_DIM, POLICIES, Observation, Policy
from policies.chunking import ActionChunker
from policies.config import FlowModelConfig
from policies.learned import MODELS, LearnedPolicy, load_policy_model, resolve_device
from policies.text import ByteTokenizer, pad_ids
from policies.vision import VisionEncoder


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x (B, L, W); allowed (B, 1, L, L) bool, True where query i may attend to key j."""
        B, L, W = x.shape
        # (B, L, 3W) -> 3 x (B, heads, L, W / heads)
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + self.proj(attn.transpose(1, 2).reshape(B, L, W))  # (B, heads, L, d) -> (B, L, W)
        return x + self.mlp(self.norm2(x))


class FlowHead(nn.Module):
    """Velocity v(x_t, t | cond): (M, cond_dim), (M, A), (M,) -> (M, A)."""

    def __init__(self, cond_dim: int, action_dim: int, hidden: int, blocks: int, time_dim: int = 64) -> None:
        super().__init__()
        self.time_dim = time_dim
        self.time = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.inp = nn.Linear(cond_dim + time_dim + action_dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 4 * hidden), nn.SiLU(), nn.Linear(4 * hidden, hidden))
            for _ in range(blocks)
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, action_dim))

    def forward(self, cond: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        half = self.time_dim // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
        angles = 1000.0 * t.float()[:, None] * freqs[None]  # (M, half): sinusoidal features of t in [0, 1]
        temb = self.time(torch.cat([angles.sin(), angles.cos()], dim=-1)).to(cond.dtype)
        h = self.inp(torch.cat([cond, temb, x.to(cond.dtype)], dim=-1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class FlowModel(nn.Module):
    """Image + instruction -> transformer trunk -> readout -> flow head over (chunk, 7) normalised actions."""

    #: instructions padded to this many tokens; None: to the batch's longest (policies/text.py `fix_text_length`)
    text_length: int | None = None

    def __init__(self, cfg: FlowModelConfig, image_size: int) -> None:
        super().__init__()
        if cfg.width % cfg.heads:
            raise UserError(f"policy.model.width={cfg.width} must be divisible by heads={cfg.heads}.")
        self.cfg, self.chunk, self.image_size = cfg, int(cfg.chunk), int(image_size)
        self.max_text_tokens = int(cfg.max_text_tokens)
        self.text = ByteTokenizer()
        self.vision = VisionEncoder(cfg.vision, cfg.vision.image_size or image_size)
        W = cfg.width
        self.image_proj = nn.Linear(self.vision.dim, W)
        self.image_pos = nn.Parameter(0.02 * torch.randn(1, self.vision.num_tokens(), W))
        self.text_embed = nn.Embedding(self.text.vocab_size, W)
        self.text_pos = nn.Parameter(0.02 * torch.randn(1, self.max_text_tokens, W))
        self.readout = nn.Parameter(0.02 * torch.randn(1, 1, W))
        self.blocks = nn.ModuleList(Block(W, cfg.heads) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(W)
        self.head = FlowHead(W, self.chunk * ACTION_DIM, cfg.head_hidden, cfg.head_blocks)
        self._ids: dict[str, list[int]] = {}

    @classmethod
    def create(cls, cfg: FlowModelConfig, image_size: int) -> FlowModel:
        return cls(cfg, image_size)

    @classmethod
    def rebuild(cls, cfg: Any, image_size: int, path: Path) -> FlowModel:
        from omegaconf import OmegaConf

        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        cfg.vision.pretrained = False  # the checkpoint's weights follow
        return cls(cfg, image_size)

    def files(self) -> dict[str, str]:
        return {}

    def encode(self, images: torch.Tensor, instructions: Sequence[str]) -> torch.Tensor:
        """uint8 images (B, H, W, 3) + B instructions -> readout features (B, width)."""
        image = self.image_proj(self.vision(images)) + self.image_pos  # (B, T_img, W)
        B, T, device = image.shape[0], image.shape[1], image.device
        ids, mask = pad_ids(self._text_ids(instructions), self.text.pad_id, side="right", length=self.text_length)
        ids, mask = ids.to(device), mask.to(device)
        text = self.text_embed(ids) + self.text_pos[:, : ids.shape[1]]  # right padding: token j at position j
        x = torch.cat([text.to(image.dtype), image, self.readout.expand(B, -1, -1).to(image.dtype)], dim=1)
        L = x.shape[1]
        keys = torch.cat([mask, torch.ones((B, T + 1), dtype=torch.bool, device=device)], dim=1)  # (B, L)
        keys[:, -1] = False  # nothing attends to the readout ...
        allowed = keys[:, None, None, :].expand(B, 1, L, L).clone()  # (B, 1, L_query, L_key)
        allowed[:, :, -1, -1] = True  # ... except the readout itself
        for block in self.blocks:
            x = block(x, allowed)
        return self.norm(x[:, -1])

    def _text_ids(self, instructions: Sequence[str]) -> list[list[int]]:
        for text in set(instructions) - set(self._ids):
            self._ids[text] = self.text.encode([text.lower()])[0][: self.max_text_tokens]
        return [self._ids[t] for t in instructions]

    def velocity(self, cond: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(M, width), (M, chunk, 7), (M,) -> (M, chunk, 7)."""
        return self.head(cond, x.flatten(1), t).view(x.shape)

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """Flow-matching loss on the batch's action chunks (B, chunk, 7), masked past episode ends."""
        actions, valid = _chunks(batch, self.chunk)
        cond = self.encode(batch["image"], batch["instruction"])
        noise = torch.randn(actions.shape, generator=generator, device=actions.device)
        t = torch.rand(actions.shape[0], generator=generator, device=actions.device)
        x_t = (1 - t[:, None, None]) * noise + t[:, None, None] * actions
        error = (self.velocity(cond, x_t, t).float() - (actions - noise)).pow(2).mean(-1)  # (B, chunk)
        loss = (error * valid).sum() / valid.sum().clamp(min=1)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Loss plus the L1 error of one sampled chunk (normalised units, valid steps)."""
        _, metrics = self.loss(batch, generator)
        actions, valid = _chunks(batch, self.chunk)
        sampled = self.sample(batch["image"], batch["instruction"], 1, generator)[:, 0]
        err = (sampled.float() - actions).abs().mean(-1)
        metrics["sample_l1"] = (err * valid).sum() / valid.sum().clamp(min=1)
        return metrics

    @torch.no_grad()
    def sample(
        self, images: torch.Tensor, instructions: Sequence[str], k: int, generator: torch.Generator | None = None,
        noise_scale: float = 1.0, steps: int | None = None, noise: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """K normalised chunks per observation (N, K, chunk, 7): encode once, integrate K noises in one batch.

        `noise`: the (N * K, chunk, 7) standard normal starting points (else drawn from `generator`).
        """
        cond = self.encode(images, instructions).repeat_interleave(k, dim=0)  # (N * K, W): row n * K + j
        M, steps = cond.shape[0], steps or self.cfg.flow_steps
        if noise is None:
            noise = torch.randn((M, self.chunk, ACTION_DIM), generator=generator, device=cond.device)
        elif noise.shape != (M, self.chunk, ACTION_DIM):
            raise ValueError(f"noise of shape {tuple(noise.shape)}, expected {(M, self.chunk, ACTION_DIM)}")
        x = noise_scale * noise
        for i in range(steps):
            t = torch.full((M,), i / steps, device=cond.device)
            x = x + self.velocity(cond, x, t).float() / steps
        return x.view(-1, k, self.chunk, ACTION_DIM)  # (N * K, ...) -> (N, K, ...)


def _chunks(batch: dict[str, Any], chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, chunk, 7) normalised target actions and (B, chunk) float validity.

    Steps past an episode's end hold its last action (the loader pads with zeros, and a zero
    gripper means "closed"): the noisy input of those steps then looks like what the policy itself
    would produce, while the loss still ignores them.
    """
    if chunk == 1:
        return batch["action"][:, None].float(), torch.ones_like(batch["action"][:, :1], dtype=torch.float32)
    actions, valid = batch["action_chunk"].float(), batch["action_chunk_mask"]
    if actions.shape[1] != chunk:
        raise ValueError(f"batch chunks have {actions.shape[1]} steps, the model predicts {chunk}")
    last = valid.sum(1, keepdim=True).clamp(min=1) - 1  # (B, 1): valid steps form a prefix
    held = torch.minimum(torch.arange(chunk, device=actions.device)[None], last)  # (B, chunk) source step
    return actions.gather(1, held[..., None].expand(-1, -1, actions.shape[-1])), valid.float()


MODELS.register("flow")(FlowModel)


class FlowPolicy(LearnedPolicy):
    """The trained flow policy: `sample_actions` -> (K, chunk, 7); `act` runs the per-slot chunker."""

    def __init__(self, loaded: Any, cfg: Any, device: torch.device) -> None:
        super().__init__(loaded, cfg, device)
        self.noise_scale = float(cfg.noise_scale)
        self.chunker = ActionChunker(self.chunk, int(cfg.exec_horizon), bool(cfg.ensemble), float(cfg.ensemble_temp))

    def reset(self, instruction: str, slot: int = 0, seed: int | None = None) -> None:
        super().reset(instruction, slot, seed)
        self.chunker.reset(slot)

    def _sample(self, images: torch.Tensor, instructions: list[str], k: int, slots: list[int | None]) -> torch.Tensor:
        noise = self.draw(slots, (k, self.chunk, ACTION_DIM), normal=True)
        return self.model.sample(images, instructions, k, noise_scale=self.noise_scale, noise=noise)

    def act(self, obs: Observation, slot: int = 0) -> np.ndarray:
        return self.act_batch([obs], [slot])[0]

    def act_batch(self, observations: Sequence[Observation], slots: Sequence[int] | None = None) -> np.ndarray:
        """(N, chunk, 7): predicts only for the slots whose chunker asks for it, in one batch."""
        slots = list(range(len(observations))) if slots is None else list(slots)
        todo = [i for i, s in enumerate(slots) if self.chunker.needs_prediction(s)]
        if todo:
            chunks = self.sample_actions_batch([observations[i] for i in todo], 1, [slots[i] for i in todo])
            for i, chunk in zip(todo, chunks[:, 0], strict=True):
                self.chunker.push(slots[i], chunk)
        return np.stack([self.chunker.next(s) for s in slots])


@POLICIES.register("flow")
def _flow(cfg: Any) -> Policy:
    if not cfg.get("checkpoint"):
        raise UserError(
            "policy=flow needs policy.checkpoint=<dir>; train one with `python train_policy.py policy=flow`."
        )
    device = resolve_device(cfg.device)
    return FlowPolicy(load_policy_model(cfg.checkpoint, "flow", device), cfg, device)
