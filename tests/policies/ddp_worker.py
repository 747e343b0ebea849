"""Run by tests/policies/test_train_policy.py under torchrun (2 CPU ranks, gloo):
`python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.policies.ddp_worker MODE ...`.

MODE step OUT: two SFT steps of the tiny VLA (deterministic: no sampled noise), each rank on half of a fixed
          batch with gradients averaged over the ranks, against one model on the whole batch; rank 0
          writes the comparison (tests/distributed.py `compare_with_reference`) to OUT.
MODE train OVERRIDES...: train_policy with the tiny VLA config and the overrides.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from configs.distributed import end_distributed


def step_mode(out: Path) -> None:
    from configs.distributed import setup_distributed
    from policies.learned import MODELS
    from policies.training import _train_step, make_optimizer
    from tests.distributed import compare_with_reference
    from tests.policies.conftest import IMAGE_SIZE, tiny_model_config
    from tests.qsft.helpers import images

    dist = setup_distributed("cpu")
    torch.set_num_threads(1)
    cfg = tiny_model_config("vla", "grad_clip=1.0", "lr=1e-3", "warmup_steps=0", "lr_schedule=constant")

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return MODELS.get("vla").create(cfg.policy.model, IMAGE_SIZE).train()

    g = torch.Generator().manual_seed(0)
    data = {"image": images(4, 1), "action": torch.rand(4, 7, generator=g) * 2 - 1,
            "instruction": ["go", "reach forward", "pick up the red cube", "go"]}  # fmt: skip
    reference, ranked, initial = model(), model(), model().state_dict()
    half = {k: v[2 * dist.rank : 2 * dist.rank + 2] for k, v in data.items()}
    # the reference takes the whole batch on every rank (the average of equal gradients is that gradient)
    for net, batch, rank_dist in ((reference, data, None), (ranked, half, dist)):
        optimizer, scheduler = make_optimizer(net, cfg)
        for step in range(2):
            _train_step(cfg, net, optimizer, scheduler, dict(batch), step, False, rank_dist)
    result = compare_with_reference(ranked.state_dict(), reference.state_dict(), initial)
    if dist.main:
        out.write_text(json.dumps(result))
    end_distributed()


def train_mode(overrides: list[str]) -> None:
    from policies.training import train_policy
    from tests.policies.conftest import tiny_model_config

    torch.set_num_threads(1)
    train_policy(tiny_model_config("vla", *overrides))
    end_distributed()


if __name__ == "__main__":
    if sys.argv[1] == "step":
        step_mode(Path(sys.argv[2]))
    else:
        train_mode(sys.argv[2:])
