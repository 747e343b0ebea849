"""Run by tests/qsft/test_fsdp.py under torchrun (2 CPU ranks, gloo): `python -m torch.distributed.run
--standalone --nproc_per_node=2 -m tests.qsft.fsdp_worker MODE OUT [overrides...]`.

MODE step:  two Q-SFT steps of an FSDP-sharded tiny model, each rank on half of a fixed batch, and the
            same two steps of an unsharded copy on the whole batch; rank 0 writes the largest weight
            difference to OUT (JSON).
MODE train: train_qsft with the overrides (rank 0 writes the run as usual).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def step_mode(out: Path) -> None:
    import copy

    import torch.distributed as tdist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from configs.distributed import setup_distributed
    from policies.qsft.training import make_optimizer, shard
    from tests.qsft.helpers import images, qsft_config, tiny_qsft_model

    dist = setup_distributed("cpu")
    torch.set_num_threads(1)
    cfg = qsft_config("grad_clip=1.0", "lr=1e-3", "lr_behaviour=1e-3", "warmup_steps=0", "lr_schedule=constant")
    g = torch.Generator().manual_seed(0)
    data = {
        "image": images(4, 1), "next_image": images(4, 2), "action": torch.rand(4, 7, generator=g) * 2 - 1,
        "reward": torch.tensor([0.0, 1.0, 0.0, 0.0]), "terminal": torch.tensor([0.0, 1.0, 0.0, 0.0]),
        "instruction": ["go", "reach forward", "pick up the red cube", "go"],
    }  # fmt: skip
    reference = tiny_qsft_model(0).train()
    sharded = copy.deepcopy(reference)
    shard(sharded)
    half = {k: v[2 * dist.rank : 2 * dist.rank + 2] for k, v in data.items()}
    for model, batch in ((reference, data), (sharded, half)):
        optimizer, _ = make_optimizer(model, cfg)
        for _ in range(2):
            q_loss, bc_loss, _ = model.losses(batch, 0.98, 1e-4)
            optimizer.zero_grad(set_to_none=True)
            (q_loss + bc_loss).backward()
            torch.nn.utils.clip_grad_norm_(model.q.parameters(), 1.0)
            torch.nn.utils.clip_grad_norm_(model.pi.parameters(), 1.0)
            optimizer.step()
            model.update_target(0.1)
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.main:
        ref = reference.state_dict()
        diff = {k: float((full[k] - ref[k]).abs().max()) for k in ref}
        moved = {k: float((ref[k] - tiny_qsft_model(0).state_dict()[k]).abs().max()) for k in ref}
        out.write_text(json.dumps({"keys_equal": sorted(full) == sorted(ref), "max_diff": max(diff.values()),
                                   "moved": sum(v > 0 for v in moved.values()), "keys": len(ref)}))  # fmt: skip
    tdist.destroy_process_group()


def train_mode(overrides: list[str]) -> None:
    import torch.distributed as tdist

    from policies.qsft.training import train_qsft
    from tests.qsft.helpers import qsft_config

    torch.set_num_threads(1)
    train_qsft(qsft_config(*overrides))
    if tdist.is_initialized():
        tdist.destroy_process_group()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "step":
        step_mode(Path(sys.argv[2]))
    else:
        train_mode(sys.argv[2:])
