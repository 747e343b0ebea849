"""Small value-learning configs and synthetic batches in the trainer's batch format, shared by tests."""

from __future__ import annotations

import torch

from values.config import EncoderConfig, LanguageConfig, ValueConfig

LANG_DIM = 32


def small_value_config(algo: str, arch: str = "resnet18") -> ValueConfig:
    return ValueConfig(algo=algo, encoder=EncoderConfig(arch=arch), hidden=[64, 64],
                       language=LanguageConfig(name="hash", dim=LANG_DIM), warmup_steps=1)  # fmt: skip


def value_batch(batch: int, size: int, device: str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """A random transition batch as values/train.py feeds agent.update (sparse -1 rewards, no terminals)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (2, batch, size, size, 3), generator=g, dtype=torch.uint8)
    out = {
        "image": images[0], "next_image": images[1], "lang": torch.randn(batch, LANG_DIM, generator=g),
        "action": torch.rand(batch, 7, generator=g) * 2 - 1, "reward": -torch.ones(batch),
        "terminal": torch.zeros(batch), "mc_return": -torch.rand(batch, generator=g) * 20,
    }  # fmt: skip
    return {k: v.to(device) for k, v in out.items()}
