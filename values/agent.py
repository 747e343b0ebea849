"""What Cal-QL and IQL agents share: optimisation, per-step randomness, state, data parallelism.

Agent contract (DESIGN.md): `update(batch) -> dict[str, float]` of flat metrics and `state_dict()`
covering networks, target networks, optimiser, scheduler and step, so a killed run resumes exactly.

A batch on the training device holds `image`, `next_image` uint8 (B, H, W, 3), `lang` (B, D)
instruction embeddings, `action` normalised (B, 7), `reward`, `terminal`, `mc_return` (B,).

Exactness: every random draw of an update (policy samples, random CQL actions, augmentation) comes
from a generator seeded by (seed, step), so step k does the same thing whether or not the run was
interrupted before it, and no RNG state needs saving.

Data parallelism (torchrun): each rank computes its losses on its shard of the batch, then
`average_gradients` all-reduces the gradients once per step before the optimiser step, which is
what DistributedDataParallel does; the agents use several networks, several forward passes and one
combined backward per step, which DDP's per-module reducer does not support.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from configs.distributed import Distributed, average_gradients, mean_over_ranks
from values.config import ValueConfig


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A generator whose stream depends only on (seed, step)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) % 2**63)
    return g


class Agent(ABC, nn.Module):
    """Networks + optimiser of one value-learning algorithm."""

    def __init__(self, cfg: ValueConfig, discount: float, seed: int) -> None:
        super().__init__()
        self.cfg, self.discount, self.seed = cfg, discount, seed
        self.step = 0
        self.autocast = False  # bf16 autocast, set by the trainer on GPU
        self._first_bad: torch.Tensor | None = None  # on the device: the first step with a non-finite loss, or -1

    def make_optimizer(self, groups: list[dict[str, Any]]) -> None:
        """One Adam over parameter groups (each with its own lr), linear warm-up then constant."""
        self.optimizer = torch.optim.Adam(groups)
        warmup = max(self.cfg.warmup_steps, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))

    @abstractmethod
    def losses(
        self, batch: dict[str, torch.Tensor], g: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss (one backward updates every network) and metric tensors."""

    @abstractmethod
    def after_step(self) -> None:
        """Target-network updates."""

    def update(self, batch: dict[str, torch.Tensor], metrics: bool = True) -> dict[str, float]:
        """One gradient step on `batch`; returns flat metrics (skipped, i.e. {}, if metrics=False).

        A non-finite loss is noted on the device, without waiting for the GPU at every step, and
        raises FloatingPointError at the next step that returns metrics, or at `check_finite` (which
        the trainer calls before validating and before writing a checkpoint, so that no checkpoint
        holds the weights it produced).
        """
        device = batch["action"].device
        g = step_generator(self.seed, self.step, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss, values = self.losses(batch, g)
        if self._first_bad is None or self._first_bad.device != loss.device:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach()) & (self._first_bad < 0)
        self._first_bad = torch.where(bad, self.step, self._first_bad)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients([p for group in self.optimizer.param_groups for p in group["params"]])
        if self.cfg.grad_clip_norm > 0:  # per network, as optax chains clip_by_global_norm before each Adam
            for group in self.optimizer.param_groups:
                torch.nn.utils.clip_grad_norm_(group["params"], self.cfg.grad_clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.after_step()
        self.step += 1
        if not metrics:
            return {}
        names = list(values)
        stacked = [values[n].detach().float().reshape(()) for n in names] + [self._first_bad.float()]
        *numbers, first_bad = torch.stack(stacked).tolist()  # one sync
        self._raise_if_bad(int(first_bad))
        out = dict(zip(names, numbers, strict=True))
        out["lr_critic"] = self.scheduler.get_last_lr()[0]
        return out

    def check_finite(self, dist: Distributed | None = None) -> None:
        """Raise FloatingPointError if any update so far had a non-finite loss (waits for the device).

        Under torchrun (`dist`, every rank calls it) on any rank: a NaN on one rank reaches every rank's
        weights through the averaged gradients, though the other ranks' own losses were finite then.
        """
        first_bad = -1 if self._first_bad is None else int(self._first_bad)
        anywhere = dist is not None and dist.world > 1 and mean_over_ranks({"bad": float(first_bad >= 0)}, dist)["bad"]
        self._raise_if_bad(first_bad)
        if anywhere:
            raise FloatingPointError(f"non-finite loss on another rank (noticed after step {self.step}); the weights "
                                     "it produced are not saved.")  # fmt: skip

    def _raise_if_bad(self, first_bad: int) -> None:
        if first_bad >= 0:
            raise FloatingPointError(
                f"non-finite loss at step {first_bad} (noticed after step {self.step}); the weights it produced "
                "are not saved. Check the data for NaN or infinite values, or lower the learning rate, and "
                "resume from the last checkpoint."
            )

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        state = super().state_dict(*args, **kwargs)
        state["optimizer"] = self.optimizer.state_dict()
        state["scheduler"] = self.scheduler.state_dict()
        state["step"] = self.step
        return state

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> Any:  # type: ignore[override]
        state = dict(state)
        self.optimizer.load_state_dict(state.pop("optimizer"))
        self.scheduler.load_state_dict(state.pop("scheduler"))
        self.step = int(state.pop("step"))
        return super().load_state_dict(state, strict=strict)


def uniform_actions(shape: tuple[int, ...], g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniform in [-1, 1]^7, the box random CQL actions are drawn from."""
    return torch.rand(shape, generator=g, device=device) * 2 - 1


UNIFORM_LOG_DENSITY = 7 * math.log(0.5)  # log of the uniform density on [-1, 1]^7
