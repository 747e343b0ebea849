"""What the project's trained policies share: the model registry, policy checkpoints, `LearnedPolicy`.

A policy checkpoint is a `configs/checkpoint.py` directory whose `model.safetensors` holds exactly
the model's weights (optimiser, scheduler, RNG and loader position sit in `trainer_state.pt`), plus

    config.yaml               the resolved train_policy config (policy.model = the architecture)
    dataset_statistics.json   {dataset name: statistics} the actions were normalised with
    meta.json                 step, policy name, image size, normalisation mode, datasets
    <model files>             e.g. the text tokenizer's files, the language model's config

so `policy=<name> policy.checkpoint=<dir>` rebuilds the model without the training data or the hub.

A policy model (`MODELS`) is an nn.Module with `chunk`, `image_size`, `loss(batch, generator) ->
(loss, metrics)`, `evaluate(batch, generator) -> metrics`, `files() -> {name: text}`, and the class
methods `create(model_cfg, image_size)` (training: may load pretrained parts) and
`rebuild(model_cfg, image_size, checkpoint_dir)` (no download; weights are loaded afterwards).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from configs.checkpoint import MODEL_FILE, resolve_checkpoint, save_checkpoint
from configs.errors import UserError
from configs.registry import Registry
from data.normalize import ActionNormalizer
from policies.base import Observation, Policy, check_actions, fixed_batches
from policies.text import fix_text_length
from policies.vision import stack_images

MODELS: Registry[type] = Registry("policy model")
STATS_FILE, CONFIG_FILE = "dataset_statistics.json", "config.yaml"


def resolve_device(name: str) -> torch.device:
    """auto -> cuda if available, else cpu; a clear error for cuda without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA device is available; use device=cpu or device=auto.")
    return torch.device(name)


# --- checkpoints ---------------------------------------------------------------------------------


def save_policy_checkpoint(
    run_dir: Path, step: int, model: nn.Module, trainer: dict[str, Any], cfg: Any, stats: dict[str, Any],
    meta: dict[str, Any], weights: dict[str, torch.Tensor] | None = None, files: dict[str, str] | None = None,
) -> Path:  # fmt: skip
    """Write checkpoint `step`: model weights (safetensors), trainer state, config, statistics, model files.

    `weights` / `files` replace `model.state_dict()` / `model.files()` (a sharded model's gathered weights).
    """
    weights = _untied(model.state_dict() if weights is None else weights)
    if any(isinstance(v, torch.Tensor) for v in trainer.values()):
        raise ValueError("trainer state must hold no top-level tensors: they would land among the weights")
    files = {CONFIG_FILE: OmegaConf.to_yaml(cfg, resolve=True), STATS_FILE: json.dumps(stats),
             **(model.files() if files is None else files)}  # fmt: skip
    return save_checkpoint(run_dir, step, {**weights, **trainer}, meta, files)


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): copy the repeats."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, value in state.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        out[key] = value.clone() if ident in seen else value
        seen.add(ident)
    return out


@dataclass
class LoadedModel:
    model: nn.Module
    cfg: DictConfig  # the training config of the checkpoint
    stats: dict[str, Any]  # {dataset name: statistics}
    meta: dict[str, Any]
    path: Path


def _checkpoint_meta(path: Path) -> tuple[str, dict[str, Any]]:
    """(policy name, meta.json) of a resolved policy checkpoint directory, or a UserError saying what is missing."""
    for name in (CONFIG_FILE, STATS_FILE, "meta.json"):
        if not (path / name).is_file():
            raise UserError(f"{path} is not a policy checkpoint: it has no {name}.")
    meta = json.loads((path / "meta.json").read_text())
    name = meta.get("policy")
    if name is None:
        raise UserError(f"{path} is not a policy checkpoint (written by train_policy.py): meta.json has no policy.")
    return name, meta


def checkpoint_policy_name(path: str | Path) -> str:
    """The policy config group (vla, flow, ...) a train_policy.py checkpoint or run directory holds."""
    return _checkpoint_meta(resolve_checkpoint(path))[0]


def load_policy_model(path: str | Path, expect: str | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a trained policy model from a checkpoint (or run) directory; `expect` checks its policy name."""
    path = resolve_checkpoint(path)
    name, meta = _checkpoint_meta(path)
    cfg = OmegaConf.load(path / CONFIG_FILE)
    if expect is not None and name != expect:
        raise UserError(f"{path} holds a {name!r} policy, not {expect!r}; use policy={name}.")
    model = MODELS.get(name).rebuild(cfg.policy.model, int(meta["image_size"]), path)
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(str(path / MODEL_FILE)), strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the {name} architecture (missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}).")  # fmt: skip
    stats = json.loads((path / STATS_FILE).read_text())
    return LoadedModel(model.to(device).eval(), cfg, stats, meta, path)


def dataset_stats(stats: dict[str, Any], key: str | None, source: str) -> dict[str, Any]:
    """The statistics of dataset `key` (OpenVLA's unnorm_key); None picks the only one."""
    if key is None:
        if len(stats) != 1:
            raise UserError(f"{source} was trained on {sorted(stats)}: choose one with policy.unnorm_key=<name>.")
        return next(iter(stats.values()))
    if key not in stats:
        raise UserError(f"policy.unnorm_key={key!r} is not a dataset of {source}; it has {sorted(stats)}.")
    return stats[key]


def normalised_bounds(mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(7,) low and high of normalised actions: arm [-1, 1] (normal: Octo's +-5), gripper [0, 1]."""
    arm = 5.0 if mode == "normal" else 1.0
    return np.array([-arm] * 6 + [0.0], np.float32), np.array([arm] * 6 + [1.0], np.float32)


# --- the policy ----------------------------------------------------------------------------------


class LearnedPolicy(Policy):
    """A trained policy model behind the Policy contract: batched over slots, canonical actions out.

    Subclasses implement `_sample(images, instructions, k, slots) -> (N, k, chunk, 7)` normalised
    actions, drawing their noise with `draw` (each slot's rows from that slot's episode generator).
    With `fix_batch_rows`, `slots` ends in None for the filler rows of a padded batch.
    """

    def __init__(self, loaded: LoadedModel, cfg: Any, device: torch.device) -> None:
        super().__init__()
        self.model = loaded.model.to(device).eval()
        self.device, self.chunk = device, int(self.model.chunk)
        mode = loaded.cfg.data.normalization
        stats = dataset_stats(loaded.stats, cfg.unnorm_key, str(loaded.path))
        self.normalizer = ActionNormalizer(stats, mode, source=f"{loaded.path}/{STATS_FILE}")
        self.low, self.high = (torch.as_tensor(b, device=device) for b in normalised_bounds(mode))
        self.seed = int(cfg.seed)
        self.checkpoint = loaded.path

    def _sample(self, images: torch.Tensor, instructions: list[str], k: int, slots: list[int | None]) -> torch.Tensor:
        raise NotImplementedError

    def generator(self, slot: int) -> torch.Generator:
        """The torch generator of the slot's current episode, on the policy's device."""
        return self.episode_stream(slot, "sample", lambda seed: torch.Generator(self.device).manual_seed(seed))

    def draw(self, slots: Sequence[int | None], shape: tuple[int, ...], normal: bool = False) -> torch.Tensor:
        """(len(slots) * shape[0], *shape[1:]) float32 on the device: uniform in [0, 1) (or standard
        normal), rows i * shape[0] .. of slot i drawn from its own generator, so that they do not
        depend on the other slots of the batch (nor on the batch size). A filler row (slot None)
        gets zeros and consumes no generator."""
        fn = torch.randn if normal else torch.rand
        return torch.cat([
            fn(shape, generator=self.generator(s), device=self.device) if s is not None
            else torch.zeros(shape, device=self.device) for s in slots
        ])  # fmt: skip

    def fix_batch_rows(self, rows: int | None) -> None:
        """Policy.fix_batch_rows, and the instructions padded to a fixed length while rows are fixed."""
        super().fix_batch_rows(rows)
        fix_text_length(self.model, rows is not None)

    def sample_actions(self, obs: Observation, k: int, slot: int = 0) -> np.ndarray:
        """(k, chunk, 7) canonical candidate chunks for one observation."""
        return self.sample_actions_batch([obs], k, [slot])[0]

    def sample_actions_batch(
        self, observations: Sequence[Observation], k: int, slots: Sequence[int] | None = None
    ) -> np.ndarray:
        """(N, k, chunk, 7) canonical actions: one batched forward over the N observations (with
        `fix_batch_rows`: forwards of exactly that many rows, the last one padded)."""
        if k < 1:
            raise UserError(f"k={k}: a policy samples at least one action.")
        slots = list(range(len(observations))) if slots is None else list(slots)
        if len(slots) != len(observations):
            raise ValueError(f"{len(observations)} observations but {len(slots)} slots")
        images = [_image(o) for o in observations]
        instructions = [self._instruction(o, s) for o, s in zip(observations, slots, strict=True)]
        parts = []
        with torch.inference_mode():
            for rows, real in fixed_batches(len(observations), self.batch_rows):
                batch = stack_images([images[i] for i in rows], self.model.image_size).to(self.device)
                draw_slots = [slots[i] if j < real else None for j, i in enumerate(rows)]  # fillers draw nothing
                text = [instructions[i] for i in rows]
                norm = self._sample(batch, text, k, draw_slots)[:real]  # (real, k, chunk, 7)
                norm = torch.maximum(torch.minimum(norm.float(), self.high), self.low)
                parts.append(self.normalizer.unnormalize(norm).cpu().numpy())
        return np.stack([check_actions(a, k, self.chunk, type(self).__name__) for p in parts for a in p])

    def act_batch(self, observations: Sequence[Observation], slots: Sequence[int] | None = None) -> np.ndarray:
        """(N, chunk, 7): one sample per observation, in one batched forward."""
        return self.sample_actions_batch(observations, 1, slots)[:, 0]

    def _instruction(self, obs: Observation, slot: int) -> str:
        text = obs.get("instruction") or self.instructions.get(slot)
        if not text:
            raise UserError(f"No instruction for slot {slot}: call reset(instruction, slot) or set obs['instruction'].")
        return str(text)


def _image(obs: Observation) -> np.ndarray:
    if "image_primary" not in obs:
        raise UserError(f"The observation has no 'image_primary' (it has {sorted(obs)}).")
    return obs["image_primary"]
