"""Config schemas of the policy group (`configs/policy/*.yaml`).

Each policy has its own schema (a subclass of `PolicyConfig`) registered as `<name>_schema`; its
yaml starts with `defaults: [<name>_schema]` and only chooses values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING


@dataclass
class PolicyConfig:
    # Registry name of the policy (policies/base.py POLICIES).
    name: str = MISSING


@dataclass
class RandomPolicyConfig(PolicyConfig):
    name: str = "random"
    # Arm deltas are uniform in +-translation metres and +-rotation radians per step.
    translation: float = 0.02
    rotation: float = 0.1
    chunk: int = 1
    seed: int = 0


def register(cs: Any) -> None:
    cs.store(group="policy", name="random_schema", node=RandomPolicyConfig)
