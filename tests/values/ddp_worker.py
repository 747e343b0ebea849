"""Run by tests/values/test_ddp.py under torchrun (2 CPU ranks, gloo):
`python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.values.ddp_worker MODE OUT ...`.

MODE step OUT: two IQL updates (deterministic: no sampled actions) with each rank on half of a fixed
          batch and the gradients averaged over the ranks (values/agent.py), against the same updates
          of one agent on the whole batch; rank 0 writes the comparison (tests/distributed.py
          `compare_with_reference`) to OUT.
MODE validate OUT OVERRIDES...: train_value's validation split over the ranks against one process
          validating every batch alone (IQL: deterministic), and training step 0's batch
          (relabelled, augmented) made from the same rows on each rank; rank 0 writes them to OUT.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from configs.distributed import end_distributed


def step_mode(out: Path) -> None:
    from configs.distributed import setup_distributed
    from tests.distributed import compare_with_reference
    from tests.values.helpers import LANG_DIM, small_value_config, value_batch
    from values.train import make_agent

    dist = setup_distributed("cpu")
    torch.set_num_threads(1)

    def agent() -> torch.nn.Module:
        torch.manual_seed(0)
        return make_agent(small_value_config("iql", "resnet10t"), LANG_DIM, 0.98, seed=3, channels_last=False)

    data = [value_batch(4, 32, seed=step) for step in range(2)]
    reference, ranked, initial = agent(), agent(), agent().state_dict()
    for batch in data:
        reference.update(batch)  # the same whole batch on both ranks: averaging changes nothing
        ranked.update({k: v[2 * dist.rank : 2 * dist.rank + 2] for k, v in batch.items()})
    result = compare_with_reference(ranked.state_dict(), reference.state_dict(), initial)
    if dist.main:
        out.write_text(json.dumps(result))
    end_distributed()


def compose_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from configs import CONFIG_DIR
    from configs.schema import register

    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose("train_value", overrides=["+experiment=debug", *overrides])


def validate_mode(out: Path, overrides: list[str]) -> None:
    from configs.distributed import Distributed, gather_lists, main_first, setup_distributed
    from data.loader import build_datasets
    from data.prepare import prepare_data
    from values.language import EmbeddingCache, make_language_encoder
    from values.train import make_agent, training_batch, validate

    dist = setup_distributed("cpu")
    torch.set_num_threads(1)
    cfg = compose_cfg(["value=iql", *overrides])
    with main_first(dist):
        prepared = prepare_data(cfg.data)
    val, weights = build_datasets(prepared, cfg.data, "val")
    language = make_language_encoder(cfg.value.language, device="cpu")
    lang = EmbeddingCache(language, torch.device("cpu")).table(val.instructions)
    torch.manual_seed(cfg.seed)
    agent = make_agent(cfg.value, language.dim, cfg.data.reward.discount, dist.seed(cfg.seed), False)
    rows, q = [], agent.target.q
    agent.target.q = lambda image, *rest: rows.append(image.shape[0]) or q(image, *rest)  # count this rank's rows
    shared = validate(agent, val, weights, lang, cfg, torch.device("cpu"), dist)
    agent.target.q = q
    alone = validate(agent, val, weights, lang, cfg, torch.device("cpu"))  # every batch whole, on each rank
    # training step 0's batch (relabelled, augmented) from the same raw rows on every rank
    raw = val.__getitems__([0, 1, 2, 3])  # no loader (and no loader threads left running at exit)
    mine = training_batch(raw, lang, cfg, 0, torch.device("cpu"), dist)
    one = training_batch(raw, lang, cfg, 0, torch.device("cpu"), Distributed())  # a single process's draw

    def summary(batch: dict) -> dict:
        return {"image": batch["image"].float().mean((1, 2, 3)).tolist(), "lang": batch["instruction_id"].tolist()}

    noise, rows = gather_lists([summary(mine)], dist), gather_lists([rows], dist)
    if dist.main:
        result = {"shared": shared, "alone": alone, "noise": noise, "one": summary(one), "rows": rows}
        out.write_text(json.dumps(result))
    end_distributed()


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "step":
        step_mode(Path(rest[0]))
    else:
        validate_mode(Path(rest[0]), rest[1:])
