"""`train_policy.py`: behaviour cloning of the project's generalists (`vla`: SFT on action tokens,
`flow`: flow matching on action chunks) on prepared RLDS data.

The loop: batch (loader position = step, so a resumed run sees exactly the batches it would have
seen) -> device -> optional augmentation and the model's loss noise, both drawn from a generator
seeded by (seed, step) -> AdamW step (bf16 autocast on GPU, gradient clipping, warm-up + cosine
schedule) -> logs (console, TensorBoard, metrics.jsonl), validation, checkpoints. A checkpoint holds
the weights, optimiser, scheduler, RNG states and step, plus what a policy needs to act: resolved
config, normalisation statistics, tokenizer files (policies/learned.py).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from configs.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, resuming
from configs.distributed import (
    Distributed,
    average_gradients,
    main_first,
    mean_over_ranks,
    run_directory,
    start_training,
)
from configs.errors import UserError
from configs.run import log_file, record_environment, save_config, tensorboard_writer
from data.loader import MixtureDataset, build_datasets, make_loader
from data.prepare import prepare_data
from policies import flow, vla  # noqa: F401 - register the models
from policies.config import TrainPolicyConfig
from policies.learned import MODELS, save_policy_checkpoint

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


def check_losses_since_log(sums: dict[str, Any], count: int, done: int, dist: Distributed) -> None:
    """Before a checkpoint that is not also a log step: the `count` steps since the last log had finite
    losses on every rank (a NaN on one rank reaches every rank's weights through the averaged gradients),
    so that no checkpoint holds weights a non-finite loss produced. Every rank must call it."""
    if count and not math.isfinite(mean_over_ranks({"loss": sums["loss"]}, dist)["loss"]):
        raise FloatingPointError(
            f"non-finite training loss in the {count} steps up to step {done}; checkpoint {done} is not written. "
            "Check the data for NaN or infinite values, or lower the learning rate, and resume."
        )


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A generator whose stream depends only on (seed, step): resumed steps draw the same noise."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) % 2**63)
    return g


def lr_factor(step: int, cfg: TrainPolicyConfig) -> float:
    """Multiplier of cfg.lr at `step`: linear warm-up, then cosine to min_lr_ratio (or constant)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min((step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1), 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, cfg: TrainPolicyConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW without weight decay on biases, norms and embeddings-of-one-vector; LambdaLR schedule."""
    if cfg.lr_schedule not in ("cosine", "constant"):
        raise UserError(f"lr_schedule={cfg.lr_schedule!r}; use cosine or constant.")
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def to_device(raw: dict[str, Any], device: torch.device) -> dict[str, Any]:
    keys = ("image", "action", "action_chunk", "action_chunk_mask")
    batch = {k: raw[k].to(device, non_blocking=True) for k in keys if k in raw}
    batch["instruction"] = raw["instruction"]
    return batch


# --- the run -------------------------------------------------------------------------------------


def train_policy(cfg: TrainPolicyConfig) -> Path:
    """Train (or resume); returns the run directory. Inputs are validated before anything is written.

    Under torchrun (data parallel) every rank trains a full copy on its shard of each batch
    (batch_size / world rows), gradients are averaged over the ranks, and rank 0 writes logs and checkpoints.
    """
    if cfg.policy.name not in MODELS:
        raise UserError(
            f"policy={cfg.policy.name} is not trainable; train_policy.py trains {', '.join(MODELS.names())}."
        )
    dist, device = start_training(cfg.device, cfg.batch_size)
    with main_first(dist):  # rank 0 prepares the data; the others then read what it wrote
        prepared = prepare_data(cfg.data)
    torch.manual_seed(cfg.seed)
    image_size = int(next(iter(prepared.values())).train.image_shape[0])
    model = MODELS.get(cfg.policy.name).create(cfg.policy.model, image_size).to(device)
    train, weights = build_datasets(prepared, cfg.data, "train", action_horizon=model.chunk)
    val = build_datasets(prepared, cfg.data, "val", action_horizon=model.chunk) if cfg.val_every > 0 else None
    if device.type == "cuda" and cfg.channels_last:
        model.vision.channels_last = True
        model.vision.net.to(memory_format=torch.channels_last)
    optimizer, scheduler = make_optimizer(model, cfg)
    run_dir = run_directory(dist, cfg.resume, cfg.run_root, "train_policy", cfg.name)
    stats = {name: p.stats for name, p in prepared.items()}
    meta = {
        "policy": cfg.policy.name, "image_size": image_size, "chunk": model.chunk,
        "normalization": cfg.data.normalization, "datasets": train.names, "instructions": train.instructions,
    }  # fmt: skip
    run = {"dir": run_dir, "stats": stats, "meta": meta, "device": device, "dist": dist}
    with log_file(run_dir, dist.log_name):  # the resume line and a changed-options warning reach log.txt too
        start = _resume(run_dir, model, optimizer, scheduler, device, dist.main)
        if dist.main:
            save_config(cfg, run_dir)
            record_environment(run_dir, start, device, dist.world)
        n_params = sum(p.numel() for p in model.parameters())
        log.info(
            "run %s: %s (%.2fM parameters) on %s, %d train transitions, %d instructions, start at step %d",
            run_dir, cfg.policy.name, n_params / 1e6, device, len(train), len(train.instructions), start,
        )  # fmt: skip
        _loop(cfg, model, optimizer, scheduler, (train, weights), val, start, run)
    return run_dir


def _resume(run_dir: Path, model: nn.Module, optimizer: Any, scheduler: Any, device: torch.device,
            main: bool = True) -> int:  # fmt: skip
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return 0
    state, meta = load_checkpoint(ckpt, device)
    with resuming(ckpt):
        model.load_state_dict({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng(state["rng"])
    step = int(meta["step"])
    if main:
        _truncate_metrics(run_dir / METRICS_FILE, step)
    log.info("resumed from %s (step %d)", ckpt, step)
    return step


def _loop(cfg: TrainPolicyConfig, model: nn.Module, optimizer: Any, scheduler: Any, train: tuple,
          val: tuple | None, start: int, run: dict[str, Any]) -> None:  # fmt: skip
    device, dist = run["device"], run["dist"]
    autocast = cfg.bf16 and device.type == "cuda"

    def save(done: int) -> None:
        if dist.main:  # every rank holds the same weights
            _save(cfg, model, optimizer, scheduler, run, done)

    training_loop(
        cfg, model, train, start, run, f"train {cfg.policy.name}",
        step=lambda raw, i: _train_step(cfg, model, optimizer, scheduler, to_device(raw, device), i, autocast, dist),
        validate=None if val is None else lambda: validate(model, val, cfg, device, autocast, dist),
        save=save, lr=lambda: scheduler.get_last_lr()[0],
    )  # fmt: skip


def training_loop(cfg: Any, model: nn.Module, train: tuple, start: int, run: dict[str, Any], desc: str,
                  step: Callable[[dict[str, Any], int], dict[str, torch.Tensor]],
                  validate: Callable[[], dict[str, float]] | None, save: Callable[[int], Any],
                  lr: Callable[[], float]) -> None:  # fmt: skip
    """The loop train_policy and train_qsft share: this rank's shard of each batch from `start` to
    `cfg.steps` through `step(raw batch, step index) -> metrics` (tensors, summed on the device: no
    sync per step); every `log_every` steps the mean over the steps and ranks (a non-finite loss stops
    the run), TensorBoard, metrics.jsonl and the progress bar on rank 0; `validate()` every
    `val_every` steps; `save(done)` (on every rank: it may gather) every `ckpt_every` steps and at the
    end, after checking the losses since the last log."""
    device, dist = run["device"], run["dist"]
    loader = make_loader(
        train[0], train[1], cfg.batch_size // dist.world, seed=cfg.seed, num_workers=cfg.data.num_workers,
        backend=cfg.data.loader, rank=dist.rank, world_size=dist.world, start_batch=start,
        num_batches=max(cfg.steps - start, 0), pin_memory=device.type == "cuda",
    )  # fmt: skip
    writer = tensorboard_writer(run["dir"]) if dist.main else None
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, dynamic_ncols=True, disable=not dist.main)
    sums: dict[str, torch.Tensor] = {}
    count, tick = 0, time.perf_counter()
    model.train()
    for index, raw in enumerate(loader, start=start):
        metrics = step(raw, index)
        sums = {k: sums.get(k, 0.0) + v for k, v in metrics.items()}  # tensors: no device sync per step
        count, done = count + 1, index + 1
        bar.update()
        if done % cfg.log_every == 0 or done == cfg.steps:
            logged = {f"train/{k}": v / count for k, v in mean_over_ranks(sums, dist).items()}
            if not math.isfinite(logged["train/loss"]):
                raise FloatingPointError(f"non-finite training loss in the {count} steps up to step {done}")
            logged["train/lr"] = lr()
            logged["train/samples_per_s"] = count * cfg.batch_size / (time.perf_counter() - tick)
            if dist.main:
                _log(writer, bar, run["dir"], logged, done)
            sums, count, tick = {}, 0, time.perf_counter()
        if validate is not None and (done % cfg.val_every == 0 or done == cfg.steps):
            metrics = validate()
            if dist.main:
                _log(writer, bar, run["dir"], metrics, done)
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            check_losses_since_log(sums, count, done, dist)
            save(done)
    bar.close()
    if writer is not None:
        writer.close()


def _train_step(cfg: TrainPolicyConfig, model: nn.Module, optimizer: Any, scheduler: Any, batch: dict[str, Any],
                step: int, autocast: bool, dist: Distributed | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    g = step_generator((dist or Distributed()).seed(cfg.seed), step, batch["image"].device)  # ranks draw apart
    if cfg.augment:
        from data.augment import augment

        batch["image"] = augment(batch["image"], g)
    with torch.autocast(batch["image"].device.type, dtype=torch.bfloat16, enabled=autocast):
        loss, metrics = model.loss(batch, g)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients([p for p in model.parameters() if p.requires_grad])  # no-op in one process
    if cfg.grad_clip > 0:
        metrics["grad_norm"] = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    return {k: v.detach() for k, v in metrics.items()}


@torch.no_grad()
def validate(model: nn.Module, val: tuple[MixtureDataset, list[float]], cfg: TrainPolicyConfig,
             device: torch.device, autocast: bool, dist: Distributed | None = None) -> dict[str, float]:  # fmt: skip
    """Mean of the model's `evaluate` metrics over `val_batches` held-out batches (fixed order; under
    torchrun each rank its shard, then the mean over the ranks)."""
    dist = dist or Distributed()
    loader: Iterable = make_loader(val[0], val[1], max(cfg.batch_size // dist.world, 1), seed=cfg.seed + 1,
                                   num_workers=cfg.data.num_workers, backend=cfg.data.loader, rank=dist.rank,
                                   world_size=dist.world, num_batches=cfg.val_batches)  # fmt: skip
    model.eval()
    sums: dict[str, float] = {}
    for i, raw in enumerate(loader):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            g = step_generator(dist.seed(cfg.seed + 1), i, device)
            metrics = model.evaluate(to_device(raw, device), g)
        sums = {k: sums.get(k, 0.0) + float(v) for k, v in metrics.items()}
    model.train()
    return {f"val/{k}": v / max(cfg.val_batches, 1) for k, v in mean_over_ranks(sums, dist).items()}


# --- logs and checkpoints ------------------------------------------------------------------------


def _log(writer: Any, bar: tqdm, run_dir: Path, metrics: dict[str, float], step: int) -> None:
    for name, value in metrics.items():
        writer.add_scalar(name, value, step)
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    shown = {k: v for k, v in metrics.items() if k.endswith(("loss", "accuracy", "l1"))}
    bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in shown.items()})
    log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in shown.items()))


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines up to `step` (a killed run may have logged past its last checkpoint)."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def _save(cfg: TrainPolicyConfig, model: nn.Module, optimizer: Any, scheduler: Any, run: dict, step: int) -> Path:
    trainer = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _get_rng()}
    path = save_policy_checkpoint(run["dir"], step, model, trainer, cfg, run["stats"], run["meta"])
    prune_checkpoints(run["dir"], max(cfg.keep_checkpoints, 1))
    log.info("saved %s", path)
    return path


def _get_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
