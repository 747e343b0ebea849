"""Helpers of the OpenVLA tests: the policy config of a tiny checkpoint, observations, a plain decode loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from policies.action_tokens import ActionTokenizer
from tests.policies.conftest import compose_config


def openvla_config(path: Path | str, *overrides: str) -> DictConfig:
    """`policy=openvla` pointed at a checkpoint directory, float32 on the CPU."""
    cfg = compose_config(["policy=openvla", "policy.dtype=float32", "policy.device=cpu", *overrides]).policy
    cfg.path = str(path)
    return cfg


def openvla_contract_config(root: Path) -> DictConfig:
    """tests/policies/conftest.py CONTRACT_BUILDERS: a tiny checkpoint written under the test's directory."""
    from policies.openvla.tiny import write_tiny_checkpoint

    return openvla_config(write_tiny_checkpoint(root / "openvla"))


def observation(seed: int = 0, instruction: str = "put the spoon on the towel", size: int = 64) -> dict[str, Any]:
    image = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return {"image_primary": image, "instruction": instruction}


@torch.no_grad()
def plain_greedy_decode(model: Any, pixel_values: torch.Tensor, input_ids: torch.Tensor, restrict: bool) -> list[int]:
    """7 greedy tokens, each from a full forward over the whole sequence so far (no cache): what
    `generate(max_new_tokens=7, do_sample=False)` computes; `restrict` masks every non-action id."""
    tokens: ActionTokenizer = model.tokens
    embed = model.language_model.get_input_embeddings()
    sequence, chosen = model.embed_prefix(pixel_values, input_ids), []
    for _ in range(7):
        logits = model.language_model(inputs_embeds=sequence).logits[0, -1].float()
        token = int((tokens.mask_logits(logits) if restrict else logits).argmax())
        chosen.append(token)
        sequence = torch.cat([sequence, embed(torch.tensor([[token]]))], dim=1)
    return chosen
