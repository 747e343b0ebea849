"""Run by tests/qsft/test_fsdp.py under torchrun (2 CPU ranks, gloo): `python -m torch.distributed.run
--standalone --nproc_per_node=2 -m tests.qsft.fsdp_worker MODE OUT [overrides...]`.

MODE step:  two Q-SFT steps of an FSDP-sharded tiny model (VLA, VLA with LoRA, Idefics3), each rank on
            half of a fixed batch, and the same two steps of an unsharded copy on the whole batch;
            rank 0 writes the largest weight difference per model to OUT (JSON).
MODE train: train_qsft with the overrides (rank 0 writes the run as usual).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from configs.distributed import end_distributed


def models(variant: str, root: Path, dist: object) -> object:
    """A tiny Q-SFT model: the VLA backbone, the same with LoRA adapters, or a tiny Idefics3 (a Hugging Face VLM)."""
    import torch

    from policies.qsft.qsft import QSFTModel
    from tests.qsft.helpers import qsft_config, tiny_idefics3, tiny_qsft_model

    if variant == "vla":
        return tiny_qsft_model(0)
    if variant == "vla_lora":
        torch.manual_seed(0)
        overrides = ("policy.model.lora.rank=4", "policy.model.lora.train_modules=[projector]")
        return QSFTModel.create(qsft_config(*overrides).policy.model, 32)
    from configs.distributed import main_first
    from policies.qsft.backbone import HFVLMBackbone
    from policies.qsft.config import HFVLMConfig

    with main_first(dist):  # rank 0 writes the checkpoint, then every rank loads it
        source = tiny_idefics3(root / "idefics3") if dist.main else root / "idefics3"
    return QSFTModel(HFVLMBackbone.load(HFVLMConfig(source=str(source), prompt="<image>{instruction}"), 32),
                     labels="dummy")  # fmt: skip


def step_mode(out: Path) -> None:
    """Per model variant: two steps sharded (half a batch per rank) against two unsharded on the whole batch."""
    import copy
    import tempfile

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from configs.distributed import broadcast, setup_distributed
    from policies.qsft.training import make_optimizer, shard
    from tests.qsft.helpers import images, qsft_config

    dist = setup_distributed("cpu")
    torch.set_num_threads(1)
    cfg = qsft_config("grad_clip=1.0", "lr=1e-3", "lr_behaviour=1e-3", "warmup_steps=0", "lr_schedule=constant")
    g = torch.Generator().manual_seed(0)
    data = {
        "image": images(4, 1), "next_image": images(4, 2), "action": torch.rand(4, 7, generator=g) * 2 - 1,
        "reward": torch.tensor([0.0, 1.0, 0.0, 0.0]), "terminal": torch.tensor([0.0, 1.0, 0.0, 0.0]),
        "instruction": ["go", "reach forward", "pick up the red cube", "go"],
    }  # fmt: skip
    half = {k: v[2 * dist.rank : 2 * dist.rank + 2] for k, v in data.items()}
    root = Path(broadcast(tempfile.mkdtemp() if dist.main else None, dist))  # one directory all ranks see
    results = {}
    for variant in ("vla", "vla_lora", "idefics3"):
        reference = models(variant, root, dist).train()
        initial = {k: v.clone() for k, v in reference.state_dict().items()}
        sharded = copy.deepcopy(reference)
        shard(sharded)
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
        if not dist.main:  # the gathered weights are on rank 0 only
            continue
        ref = reference.state_dict()
        trained = {n for n, p in reference.named_parameters() if p.requires_grad}
        results[variant] = {
            "keys_equal": sorted(full) == sorted(ref),
            "max_diff": max(float((full[k] - ref[k]).abs().max()) for k in ref),
            "trained": len(trained), "trained_moved": sum(not torch.equal(ref[k], initial[k]) for k in trained),
        }  # fmt: skip
    if dist.main:
        out.write_text(json.dumps(results))
    end_distributed()


def train_mode(overrides: list[str]) -> None:
    from policies.qsft.training import train_qsft
    from tests.qsft.helpers import qsft_config

    torch.set_num_threads(1)
    train_qsft(qsft_config(*overrides))
    end_distributed()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "step":
        step_mode(Path(sys.argv[2]))
    else:
        train_mode(sys.argv[2:])
