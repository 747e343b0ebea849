"""`train_value.py`: offline value learning (Cal-QL or IQL) on prepared RLDS data.

The loop: batch (loader position = step, so resume is exact) -> device, instruction embeddings from
a table computed once -> optional negative-instruction relabelling and augmentation (both drawn from
a per-step generator) -> `agent.update` -> logs, validation, checkpoints. Under torchrun each rank
trains on its shard with batch_size / world_size and gradients are averaged (values/agent.py); each
rank draws its own noise (`Distributed.seed`), and validation is split over the ranks too.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from configs.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, resuming, save_checkpoint
from configs.distributed import Distributed, gather_lists, main_first, mean_over_ranks, run_directory, start_training
from configs.errors import UserError, first_line
from configs.registry import Registry
from configs.run import log_file, record_environment, save_config, tensorboard_writer
from data.augment import augment_pair
from data.loader import MixtureDataset, build_datasets, make_loader
from data.prepare import prepare_data
from values.agent import Agent, step_generator
from values.config import TrainValueConfig, ValueConfig
from values.language import EmbeddingCache, make_language_encoder
from values.metrics import matched_auc, spearman

log = logging.getLogger(__name__)
AGENTS: Registry[str] = Registry("value algorithm")
AGENTS.register("calql")("values.calql.CalQLAgent")
AGENTS.register("iql")("values.iql.IQLAgent")


def check_value_config(cfg: ValueConfig) -> str:
    """The agent class path of `cfg.algo`; an unknown algorithm or actor encoder is a UserError naming the choices."""
    if cfg.actor_encoder not in ("separate", "critic"):
        raise UserError(
            f"value.actor_encoder={cfg.actor_encoder!r}: choose separate (V-GPS) or critic (shared, faster)."
        )
    return AGENTS.get(cfg.algo)


def make_agent(cfg: ValueConfig, lang_dim: int, discount: float, seed: int, channels_last: bool) -> Agent:
    import importlib

    module, _, name = check_value_config(cfg).rpartition(".")
    return getattr(importlib.import_module(module), name)(cfg, lang_dim, discount, seed, channels_last)


def use_compile(option: bool | None, device: torch.device, channels_last: bool = False) -> bool:
    """train_value's `compile`: true or false as given; null (the default) compiles on CUDA, in the default
    NCHW layout only: inductor's GroupNorm backward crashed in channels_last on an H200 (torch 2.11,
    "misaligned address"; docs/values.md)."""
    return device.type == "cuda" and not channels_last if option is None else bool(option)


def compile_encoders(agent: Agent, **options: Any) -> None:
    """torch.compile every image encoder of the agent, in place (`Module.compile`: the state-dict keys stay
    those of an uncompiled agent, so checkpoints load either way). Compiling happens at the first update;
    a failure there is a UserError (`checked_update`)."""
    for net in agent.children():
        if getattr(net, "encoder", None) is not None:
            net.encoder.compile(**options)


def _is_compile_error(err: BaseException) -> bool:
    import torch._dynamo.exc
    import torch._inductor.exc

    kinds = (torch._dynamo.exc.TorchDynamoException, getattr(torch._inductor.exc, "InductorError", None))
    return isinstance(err, tuple(k for k in kinds if k is not None))


def checked_update(agent: Agent, batch: dict[str, torch.Tensor], metrics: bool) -> dict[str, float]:
    """`agent.update`, with torch.compile's failures (no C compiler, no Triton, an inductor bug) turned into
    a message that names the way around them."""
    try:
        return agent.update(batch, metrics=metrics)
    except Exception as err:  # the compile errors are looked up only once something has failed
        if not _is_compile_error(err):
            raise
        cause = getattr(err, "inner_exception", None) or err  # BackendCompilerFailed wraps the compiler's error
        raise UserError(
            f"torch.compile of the value encoders failed: {type(cause).__name__}: {first_line(cause, 300)}\n"
            "Train without it: compile=false (about 1.7x slower per update on a GPU), or fix the compiler set-up "
            "(inductor needs a C compiler, and Triton on CUDA)."
        ) from err


# --- batches ----------------------------------------------------------------------------------


def to_device(batch: dict[str, Any], lang_table: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """Move the tensors the agent needs; `lang` (B, D) comes from the embedding table by instruction id."""
    keys = ("image", "next_image", "action", "reward", "terminal", "mc_return", "instruction_id", "success", "timestep")
    keys += ("state", "next_state") if "state" in batch else ()  # value.proprio
    out = {k: batch[k].to(device, non_blocking=True) for k in keys}
    out["lang"] = lang_table[out["instruction_id"]]
    return out


def relabel_negatives(
    batch: dict[str, torch.Tensor], lang_table: torch.Tensor, proportion: float, step_reward: float,
    discount: float, g: torch.Generator,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """V-GPS negatives: give a fraction of the rows another instruction; they become failures."""
    V = lang_table.shape[0]
    if proportion <= 0 or V < 2:
        return batch
    B = batch["action"].shape[0]
    chosen = torch.rand(B, generator=g, device=lang_table.device) < proportion
    shift = torch.randint(1, V, (B,), generator=g, device=lang_table.device)  # never the same instruction
    new_id = torch.where(chosen, (batch["instruction_id"] + shift) % V, batch["instruction_id"])
    out = dict(batch, instruction_id=new_id, lang=lang_table[new_id])
    out["reward"] = torch.where(chosen, torch.full_like(batch["reward"], step_reward), batch["reward"])
    out["terminal"] = torch.where(chosen, torch.zeros_like(batch["terminal"]), batch["terminal"])
    failure_return = step_reward / (1 - discount)  # V-GPS: -1 / (1 - gamma)
    out["mc_return"] = torch.where(chosen, torch.full_like(batch["mc_return"], failure_return), batch["mc_return"])
    return out


def training_batch(raw: dict[str, Any], lang_table: torch.Tensor, cfg: TrainValueConfig, step: int,
                   device: torch.device, dist: Distributed) -> dict[str, torch.Tensor]:  # fmt: skip
    """Step `step`'s batch on the device, relabelled and augmented with the step's generator; each
    rank draws its own (`Distributed.seed`), so the ranks' shards do not share their noise."""
    g = step_generator(dist.seed(cfg.seed + 7), step, device)
    batch = to_device(raw, lang_table, device)
    batch = relabel_negatives(batch, lang_table, cfg.value.negative_proportion, cfg.data.reward.step_reward,
                              cfg.data.reward.discount, g)  # fmt: skip
    if cfg.value.augment:
        batch["image"], batch["next_image"] = augment_pair(batch["image"], batch["next_image"], g)
    return batch


# --- validation -------------------------------------------------------------------------------


@torch.no_grad()
def validate(agent: Agent, data: MixtureDataset, weights: list[float], lang_table: torch.Tensor, cfg: TrainValueConfig,
             device: torch.device, dist: Distributed | None = None) -> dict[str, float]:  # fmt: skip
    """TD error on held-out transitions; success-vs-failure AUC and MC-return correlation of Q.

    The same `val_batches` batches every time; under torchrun each rank scores its shard of each
    batch (batch_size / world rows, as in training), the TD error is averaged over the ranks and the
    AUC and correlation are computed from every rank's Q values, so N ranks do the work of one."""
    dist = dist or Distributed()
    loader = make_loader(
        data, weights, cfg.batch_size // dist.world, seed=cfg.seed + 1, num_workers=cfg.data.num_workers,
        backend=cfg.data.loader, rank=dist.rank, world_size=dist.world, num_batches=cfg.val_batches,
    )  # fmt: skip
    sums: dict[str, float] = {}
    q, success, timestep, mc = [], [], [], []
    for i, raw in enumerate(loader):
        batch = to_device(raw, lang_table, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=agent.autocast):
            _, metrics = agent.losses(batch, step_generator(dist.seed(cfg.seed + 1), i, device))
            q_val = agent.target.q(batch["image"], batch["lang"], batch["action"], batch.get("state"))
            q.append(q_val.float().min(0).values.cpu())
        for name in ("td_error", "q_data"):
            sums[name] = sums.get(name, 0.0) + float(metrics[name])
        success.append(raw["success"])
        timestep.append(raw["timestep"])
        mc.append(raw["mc_return"])
    out = {f"val/{k}": v / max(cfg.val_batches, 1) for k, v in mean_over_ranks(sums, dist).items()}
    qs, ok, ts, mcs = (np.concatenate(gather_lists([t.numpy() for t in x], dist)) for x in (q, success, timestep, mc))
    known = ok >= 0
    if known.any() and len(np.unique(ok[known])) == 2:
        out["val/auc_success_matched"] = matched_auc(qs[known], ok[known] == 1, ts[known])
    out["val/spearman_mc_return"] = spearman(qs, mcs)
    return out


# --- the run ----------------------------------------------------------------------------------


def train_value(cfg: TrainValueConfig) -> Path:
    """Train; returns the run directory. Inputs are validated before anything is written."""
    check_value_config(cfg.value)
    dist, device = start_training(cfg.device, cfg.batch_size)
    with main_first(dist):  # rank 0 prepares the data; the others then read what it wrote
        prepared = prepare_data(cfg.data)
    train_data, weights = build_datasets(prepared, cfg.data, "train", proprio=cfg.value.proprio)
    val_data, val_weights = build_datasets(prepared, cfg.data, "val", proprio=cfg.value.proprio)
    language = make_language_encoder(cfg.value.language, device="cpu")
    cache = EmbeddingCache(language, device)
    train_lang, val_lang = cache.table(train_data.instructions), cache.table(val_data.instructions)
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank
    agent = make_agent(cfg.value, language.dim, cfg.data.reward.discount, dist.seed(cfg.seed), cfg.channels_last)
    agent = agent.to(device)
    agent.autocast = cfg.bf16 and device.type == "cuda"
    if cfg.channels_last:
        agent.to(memory_format=torch.channels_last)
    if use_compile(cfg.compile, device, cfg.channels_last):
        compile_encoders(agent)
    run_dir = run_directory(dist, cfg.resume, cfg.run_root, "train_value", cfg.name)
    with log_file(run_dir, dist.log_name):  # the resume line and a changed-options warning reach log.txt too
        start = _resume(agent, run_dir, device)
        state = {"prepared": prepared, "train": train_data, "language": language, "run_dir": run_dir}
        if dist.main:
            save_config(cfg, run_dir)
            record_environment(run_dir, start, device, dist.world)
        log.info("run %s: %s on %s, %d train / %d val transitions, %d instructions, start at step %d",
                 run_dir, cfg.value.algo, device, len(train_data), len(val_data),
                 len(train_data.instructions), start)  # fmt: skip
        val = (val_data, val_weights, val_lang)
        _loop(cfg, agent, dist, device, train_data, weights, train_lang, val, start, state)
    return run_dir


def _resume(agent: Agent, run_dir: Path, device: torch.device) -> int:
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return 0
    state, meta = load_checkpoint(ckpt, device)
    with resuming(ckpt):
        agent.load_state_dict(state)
    log.info("resumed from %s (step %d)", ckpt, meta["step"])
    return int(meta["step"])


def _loop(cfg: TrainValueConfig, agent: Agent, dist: Distributed, device: torch.device, data: MixtureDataset,
          weights: list[float], lang_table: torch.Tensor, val: tuple, start: int, state: dict) -> None:  # fmt: skip
    loader = make_loader(
        data, weights, cfg.batch_size // dist.world, seed=cfg.seed, num_workers=cfg.data.num_workers,
        backend=cfg.data.loader, rank=dist.rank, world_size=dist.world, start_batch=start,
        num_batches=max(cfg.steps - start, 0), pin_memory=device.type == "cuda",
    )  # fmt: skip
    writer = tensorboard_writer(state["run_dir"]) if dist.main else None
    bar = tqdm(
        total=cfg.steps, initial=start, desc=f"train {cfg.value.algo}", disable=not dist.main, dynamic_ncols=True
    )
    tick, step = time.perf_counter(), start
    for step, raw in enumerate(loader, start=start):
        batch = training_batch(raw, lang_table, cfg, step, device, dist)
        done = step + 1
        metrics = checked_update(agent, batch, metrics=done % cfg.log_every == 0 or done == cfg.steps)
        bar.update()
        if metrics and dist.main:
            metrics["samples_per_s"] = cfg.log_every * cfg.batch_size / (time.perf_counter() - tick)
            tick = time.perf_counter()
            _log(writer, bar, "train", metrics, done)
        validating = done % cfg.val_every == 0 or done == cfg.steps
        saving = done % cfg.ckpt_every == 0 or done == cfg.steps
        if validating or saving:  # no validation or checkpoint of weights a non-finite loss produced, on any rank
            agent.check_finite(dist)
        if validating:
            val_metrics = validate(agent, *val, cfg, device, dist)
            if dist.main:
                _log(writer, bar, "", val_metrics, done)
        if dist.main and saving:
            _save(cfg, agent, state, done)
    bar.close()
    if writer is not None:
        writer.close()


def _log(writer: Any, bar: tqdm, prefix: str, metrics: dict[str, float], step: int) -> None:
    for name, value in metrics.items():
        writer.add_scalar(f"{prefix}/{name}" if prefix else name, value, step)
    shown = {k.split("/")[-1]: f"{v:.3g}" for k, v in metrics.items() if not k.startswith("lr")}
    log.info("step %d %s", step, " ".join(f"{k}={v}" for k, v in shown.items()))


def _save(cfg: TrainValueConfig, agent: Agent, state: dict, step: int) -> Path:
    import json

    identity = state["language"].identity()
    files = {
        "config.yaml": OmegaConf.to_yaml(cfg, resolve=True),
        "dataset_statistics.json": json.dumps({n: p.stats for n, p in state["prepared"].items()}),
        "language.json": json.dumps({"encoder": identity, "instructions": state["train"].instructions}),
    }
    image_shape = list(state["train"].parts[0].store.image_shape)
    meta = {"algo": cfg.value.algo, "language": identity, "image_shape": image_shape, "datasets": state["train"].names}
    path = save_checkpoint(state["run_dir"], step, agent.state_dict(), meta, files)
    prune_checkpoints(state["run_dir"], max(cfg.keep_checkpoints, 1))
    log.info("saved %s", path)
    return path
