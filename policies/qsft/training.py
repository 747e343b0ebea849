"""`train_qsft.py`: Q-SFT of pi_phi and p_theta (policies/qsft/qsft.py) on prepared robot episodes.

The loop is train_policy's (policies/training.py, whose schedule, logs, RNG capture and metric
truncation it reuses): batch (loader position = step) -> rewards mapped to [0, 1] -> optional
augmentation of s and s' with the same crop, drawn from a generator seeded by (seed, step) -> one
AdamW step on q_loss (+ bc_weight * bc_loss when pi_phi trains jointly), bf16 autocast on GPU ->
Polyak step of the target -> logs (console, TensorBoard, metrics.jsonl), validation, checkpoints.
A checkpoint holds pi_phi, p_theta, the target, the optimiser, scheduler, RNG states and step, so a
killed run resumes exactly; plus the config, statistics and backbone files `policy=qsft` acts with.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from configs.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, resuming
from configs.distributed import Distributed, main_first, mean_over_ranks, run_directory, start_training
from configs.errors import UserError
from configs.run import log_file, record_environment, save_config
from data.loader import build_datasets, make_loader
from data.prepare import prepare_data
from policies.config import VLAModelConfig
from policies.learned import save_policy_checkpoint
from policies.qsft.config import TrainQSFTConfig
from policies.qsft.lora import lora_enabled, share_frozen_weights
from policies.qsft.policy import NAME
from policies.qsft.qsft import BACKUPS, QSFTModel, unit_rewards
from policies.training import (
    METRICS_FILE,
    _get_rng,
    _set_rng,
    _truncate_metrics,
    lr_factor,
    step_generator,
    training_loop,
)

log = logging.getLogger(__name__)
BATCH_KEYS = ("image", "next_image", "action", "reward", "terminal", "mc_return")


def check_config(cfg: TrainQSFTConfig) -> None:
    """Fail before anything loads or is written."""
    if cfg.behaviour not in ("joint", "frozen"):
        raise UserError(f"behaviour={cfg.behaviour!r}; use joint (SFT alongside) or frozen (trained beforehand).")
    if not 0 < cfg.pi_floor < 1:
        raise UserError(f"pi_floor={cfg.pi_floor}: it must lie in (0, 1).")
    if not 0 <= cfg.gamma <= 1 or not 0 < cfg.polyak <= 1:
        raise UserError(f"gamma={cfg.gamma} must lie in [0, 1] and polyak={cfg.polyak} in (0, 1].")
    if cfg.backup not in BACKUPS:
        raise UserError(f"backup={cfg.backup!r}; use one of {', '.join(BACKUPS)}.")
    reward = cfg.data.reward
    if cfg.backup == "mc" and (reward.success_reward, reward.step_reward, reward.discount) != (1.0, 0.0, cfg.gamma):
        raise UserError(
            "backup=mc uses the data layer's Monte-Carlo returns as Q targets, so they must be in Q-SFT's units: "
            f"add data.reward.success_reward=1 data.reward.step_reward=0 data.reward.discount={cfg.gamma} "
            f"(now {reward.success_reward}, {reward.step_reward}, {reward.discount})."
        )
    if not reward.terminal_on_success and reward.success_steps > 1:
        raise UserError(
            f"data.reward.terminal_on_success=false with data.reward.success_steps={reward.success_steps}: each "
            "rewarded step would bootstrap into the next one, so returns would exceed 1, which Q-SFT's targets "
            "(probabilities) cannot hold. Keep terminal_on_success=true, or set success_steps=1."
        )
    model = cfg.policy.model
    if int(model.lora.rank) > 0 and model.backbone == "vla" and not model.init:
        raise UserError(
            "policy.model.lora adapts a pretrained model, but this VLA starts from random weights: give "
            "policy.model.init=<train_policy vla run> (or a VLM: vlm=<name>), or set lora.rank=0."
        )
    if cfg.behaviour == "frozen" and not (cfg.policy.model.init or cfg.policy.model.backbone == "hf"):
        raise UserError("behaviour=frozen keeps pi_phi as initialised: give policy.model.init=<train_policy vla run>.")


def make_optimizer(model: QSFTModel, cfg: TrainQSFTConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over p_theta (lr) and, if joint, pi_phi (lr_behaviour); no decay on vectors; warm-up + cosine."""
    if cfg.lr_schedule not in ("cosine", "constant"):
        raise UserError(f"lr_schedule={cfg.lr_schedule!r}; use cosine or constant.")
    modules = [(model.q, cfg.lr)] + ([(model.pi, cfg.lr_behaviour)] if cfg.behaviour == "joint" else [])
    groups = []
    for module, lr in modules:
        params = [p for p in module.parameters() if p.requires_grad]
        groups.append({"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr": lr})
        groups.append({"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": lr})
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def train_qsft(cfg: TrainQSFTConfig) -> Path:
    """Train (or resume); returns the run directory. Inputs are validated before anything is written.

    Under torchrun every rank trains on its shard of each batch (batch_size / world) and pi_phi,
    p_theta and the target are sharded with FSDP (`shard`); rank 0 writes logs and checkpoints.
    """
    check_config(cfg)
    dist, device = start_training(cfg.device, cfg.batch_size)
    with main_first(dist):  # rank 0 prepares the data; the others then read what it wrote
        prepared = prepare_data(cfg.data)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    image_size = int(next(iter(prepared.values())).train.image_shape[0])
    model = QSFTModel.create(cfg.policy.model, image_size).to(device)
    if cfg.policy.model.backbone == "vla" and cfg.policy.model.init:  # the checkpoint's architecture is the one saved
        cfg.policy.model.vla = OmegaConf.merge(OmegaConf.structured(VLAModelConfig), model.pi.net.cfg)
    if cfg.behaviour == "frozen":
        model.freeze_behaviour()
    shared = share_frozen_weights(model) if lora_enabled(cfg.policy.model) and dist.world == 1 else 0
    if cfg.gradient_checkpointing:
        model.pi.gradient_checkpointing()
        model.q.gradient_checkpointing()
    files = model.files()  # before sharding: the backbone files describe the unsharded model
    if dist.world > 1:
        shard(model)
    train = build_datasets(prepared, cfg.data, "train")
    val = build_datasets(prepared, cfg.data, "val") if cfg.val_every > 0 else None
    optimizer, scheduler = make_optimizer(model, cfg)
    run_dir = run_directory(dist, cfg.resume, cfg.run_root, "train_qsft", cfg.name)
    meta = {
        "policy": NAME, "image_size": image_size, "chunk": 1, "normalization": cfg.data.normalization,
        "datasets": train[0].names, "instructions": train[0].instructions, "gamma": cfg.gamma,
    }  # fmt: skip
    run = {"dir": run_dir, "stats": {n: p.stats for n, p in prepared.items()}, "meta": meta, "device": device,
           "dist": dist, "files": files}  # fmt: skip
    with log_file(run_dir, dist.log_name):  # the resume line and a changed-options warning reach log.txt too
        start = _resume(run_dir, model, optimizer, scheduler, device, dist)
        if dist.main:
            save_config(cfg, run_dir)
            record_environment(run_dir, start, device, dist.world)
        log.info(
            "run %s: Q-SFT on a %s backbone (3 x %.2fM parameters) on %s, rank %d of %d, %d train transitions, "
            "start at step %d", run_dir, cfg.policy.model.backbone,
            sum(p.numel() for p in model.q.parameters()) / 1e6, device, dist.rank, dist.world, len(train[0]), start,
        )  # fmt: skip
        if shared:
            log.info("LoRA: the three copies share their frozen base weights (%.2fM fewer parameters in memory)",
                     shared / 1e6)  # fmt: skip
        _loop(cfg, model, optimizer, scheduler, train, val, start, run)
    return run_dir


def shard(model: QSFTModel) -> None:
    """FSDP (PyTorch's fully_shard) over the ranks: each decoder layer of pi_phi, p_theta and the target its own
    unit (the classes the transformers model names as `_no_split_modules`), then each backbone as a whole.

    Weights, gradients and AdamW state are split over the ranks; a unit's weights are gathered for its
    forward and backward only. Q-SFT calls a backbone through `prefix` and `action_logits`, not `forward`,
    so both are registered as FSDP forward methods.
    """
    try:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    except ImportError:
        raise UserError(f"FSDP (train_qsft under torchrun) needs torch >= 2.6, found {torch.__version__}.") from None
    for backbone in (model.pi, model.q, model.q_target):
        names = set(getattr(backbone._model(), "_no_split_modules", None) or [])
        for layer in [m for m in backbone.modules() if type(m).__name__ in names]:
            fully_shard(layer)
        fully_shard(backbone)
        for method in ("prefix", "action_logits"):
            register_fsdp_forward_method(backbone, method)


def _resume(run_dir: Path, model: nn.Module, optimizer: Any, scheduler: Any, device: torch.device,
            dist: Distributed) -> int:  # fmt: skip
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return 0
    state, meta = load_checkpoint(ckpt, device if dist.world == 1 else "cpu")
    weights = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    full = StateDictOptions(full_state_dict=True)  # every rank reads the whole checkpoint and keeps its shard
    saved = state["optimizer"]
    by_index = any(isinstance(p, int) for g in saved["param_groups"] for p in g["params"])  # written before FSDP
    if by_index and dist.world > 1:
        raise UserError(f"{ckpt} predates FSDP checkpoints: resume it in one process, not under torchrun.")
    with resuming(ckpt):
        set_model_state_dict(model, weights, options=full)
        if by_index:
            optimizer.load_state_dict(saved)
        else:  # parameter names as keys: any number of ranks can resume it
            set_optimizer_state_dict(model, optimizer, saved, options=full)
    scheduler.load_state_dict(state["scheduler"])
    _set_rng(state["rng"])
    step = int(meta["step"])
    if dist.main:
        _truncate_metrics(run_dir / METRICS_FILE, step)
    log.info("resumed from %s (step %d)", ckpt, step)
    return step


def to_device(raw: dict[str, Any], cfg: TrainQSFTConfig, device: torch.device) -> dict[str, Any]:
    """The transition keys Q-SFT reads, on the device, with rewards mapped to [0, 1]."""
    batch = {k: raw[k].to(device, non_blocking=True) for k in BATCH_KEYS}
    batch["reward"] = unit_rewards(batch["reward"], cfg.data.reward.success_reward, cfg.data.reward.step_reward)
    batch["instruction"] = raw["instruction"]
    return batch


def _loop(cfg: TrainQSFTConfig, model: QSFTModel, optimizer: Any, scheduler: Any, train: tuple, val: tuple | None,
          start: int, run: dict[str, Any]) -> None:  # fmt: skip
    device, dist = run["device"], run["dist"]
    autocast = cfg.bf16 and device.type == "cuda"
    training_loop(
        cfg, model, train, start, run, "train qsft",
        step=lambda raw, i: _train_step(cfg, model, optimizer, scheduler, to_device(raw, cfg, device), i, autocast,
                                        dist.rank),
        validate=None if val is None else lambda: validate(model, val, cfg, device, autocast, dist),
        save=lambda done: _save(cfg, model, optimizer, scheduler, run, done),  # every rank: it gathers
        lr=lambda: scheduler.get_last_lr()[0],
    )  # fmt: skip


def _train_step(cfg: TrainQSFTConfig, model: QSFTModel, optimizer: Any, scheduler: Any, batch: dict[str, Any],
                step: int, autocast: bool, rank: int = 0) -> dict[str, torch.Tensor]:  # fmt: skip
    if cfg.augment:
        from data.augment import augment_pair

        g = step_generator(Distributed(rank=rank).seed(cfg.seed), step, batch["image"].device)
        batch["image"], batch["next_image"] = augment_pair(batch["image"], batch["next_image"], g)
    joint = cfg.behaviour == "joint"
    with torch.autocast(batch["image"].device.type, dtype=torch.bfloat16, enabled=autocast):
        q_loss, bc_loss, metrics = model.losses(
            batch, cfg.gamma, cfg.pi_floor, train_behaviour=joint, backup=cfg.backup
        )
    loss = q_loss + cfg.bc_weight * bc_loss if joint else q_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        metrics["grad_norm_q"] = _full(nn.utils.clip_grad_norm_(model.q.parameters(), cfg.grad_clip))
        if joint:
            metrics["grad_norm_pi"] = _full(nn.utils.clip_grad_norm_(model.pi.parameters(), cfg.grad_clip))
    optimizer.step()
    scheduler.step()
    model.update_target(cfg.polyak)
    metrics["loss"] = loss.detach()
    return {k: v.detach() for k, v in metrics.items()}


@torch.no_grad()
def validate(model: QSFTModel, val: tuple, cfg: TrainQSFTConfig, device: torch.device, autocast: bool,
             dist: Distributed | None = None) -> dict[str, float]:  # fmt: skip
    """Mean loss metrics over `val_batches` held-out batches (fixed order; under torchrun split over the ranks)."""
    dist = dist or Distributed()
    loader: Iterable = make_loader(val[0], val[1], max(cfg.batch_size // dist.world, 1), seed=cfg.seed + 1,
                                   num_workers=cfg.data.num_workers, backend=cfg.data.loader, rank=dist.rank,
                                   world_size=dist.world, num_batches=cfg.val_batches)  # fmt: skip
    model.eval()
    sums: dict[str, float] = {}
    for raw in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            metrics = model.evaluate(to_device(raw, cfg, device), cfg.gamma, cfg.pi_floor, cfg.backup)
        sums = {k: sums.get(k, 0.0) + float(v) for k, v in metrics.items()}
    model.train()
    return {f"val/{k}": v / max(cfg.val_batches, 1) for k, v in mean_over_ranks(sums, dist).items()}


def _save(cfg: TrainQSFTConfig, model: QSFTModel, optimizer: Any, scheduler: Any, run: dict, step: int) -> Path | None:
    """Every rank gathers the full weights and optimiser state (collectives); rank 0 writes them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    dist = run["dist"]
    options = StateDictOptions(full_state_dict=True, cpu_offload=dist.world > 1)  # ranks > 0 get nothing
    weights = get_model_state_dict(model, options=options)
    trainer = {"optimizer": get_optimizer_state_dict(model, optimizer, options=options),
               "scheduler": scheduler.state_dict(), "rng": _get_rng()}  # fmt: skip
    if not dist.main:
        return None
    path = save_policy_checkpoint(run["dir"], step, model, trainer, cfg, run["stats"], run["meta"], weights,
                                  run["files"])  # fmt: skip
    prune_checkpoints(run["dir"], max(cfg.keep_checkpoints, 1))
    log.info("saved %s", path)
    return path


def _full(value: torch.Tensor) -> torch.Tensor:
    """A value FSDP returns as a sharded DTensor (e.g. a gradient norm), as a plain tensor."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
