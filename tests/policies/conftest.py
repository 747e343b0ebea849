"""Shared fixtures of the policy tests: tiny configs, tiny checkpoints, and a small sim dataset.

`contract_config(name, root)` builds, for every registered policy, a config that acts on this
machine in well under a second. A newly registered policy must add its builder to
`CONTRACT_BUILDERS`; the contract tests fail until it does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from configs import CONFIG_DIR
from configs.schema import register
from tests.threads import one_thread  # noqa: F401 - autouse: one intra-op thread

IMAGE_SIZE = 32
# A ViT of one block at 32 px: patch tokens without a CNN's cost.
TINY_VISION = [
    "policy.model.vision.arch=vit_tiny_patch16_224",
    "+policy.model.vision.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
    "policy.model.vision.grid=null",
]
TINY = {
    "vla": [*TINY_VISION, "policy.model.lm.hidden_size=32", "policy.model.lm.layers=2", "policy.model.lm.heads=2"],
    "flow": [
        *TINY_VISION, "policy.model.width=32", "policy.model.layers=1", "policy.model.heads=2",
        "policy.model.head_hidden=32", "policy.model.head_blocks=1", "policy.model.flow_steps=3",
    ],
}  # fmt: skip
# Training settings of the debug runs (train_policy tests).
DEBUG_TRAIN = [
    "batch_size=8", "warmup_steps=2", "log_every=1", "val_every=2", "val_batches=1", "ckpt_every=2",
    "keep_checkpoints=10", "data.num_workers=0", "device=cpu", "data.datasets.sim.val_fraction=0.25",
]  # fmt: skip


def compose_config(overrides: list[str]) -> DictConfig:
    """The train_policy config with `overrides` (a policy's config is its `policy` node)."""
    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose("train_policy", overrides=overrides)


def tiny_model_config(name: str, *overrides: str) -> DictConfig:
    return compose_config([f"policy={name}", *TINY[name], *overrides])


def fake_stats(seed: int = 0) -> dict[str, Any]:
    """Normalisation statistics of random canonical actions (cm-scale deltas, gripper in {0, 1})."""
    from data.normalize import dataset_statistics

    rng = np.random.default_rng(seed)
    actions = np.concatenate([rng.normal(0, 0.01, (500, 6)), rng.integers(0, 2, (500, 1))], axis=1)
    return {"sim": dataset_statistics(actions, rng.normal(size=(500, 7)), 10)}


def tiny_checkpoint(name: str, root: Path, seed: int = 0) -> Path:
    """A checkpoint of a randomly initialised tiny `name` model, as train_policy writes it."""
    import importlib

    import torch

    from policies.learned import MODELS, save_policy_checkpoint

    importlib.import_module(f"policies.{name}")  # registers the model class
    cfg = tiny_model_config(name)
    torch.manual_seed(seed)
    model = MODELS.get(name).create(cfg.policy.model, IMAGE_SIZE)
    meta = {"policy": name, "image_size": IMAGE_SIZE, "chunk": model.chunk, "normalization": "bounds_q99"}
    save_policy_checkpoint(root, 0, model, {}, cfg, fake_stats(seed), meta)
    return root


def _learned(name: str) -> Callable[[Path], DictConfig]:
    def build(root: Path) -> DictConfig:
        cfg = tiny_model_config(name).policy
        cfg.checkpoint, cfg.device = str(tiny_checkpoint(name, root)), "cpu"
        return cfg

    return build


def _qsft(root: Path) -> DictConfig:
    from tests.qsft.helpers import qsft_contract_config  # lazy: it imports this module

    return qsft_contract_config(root)


@functools.cache
def _random_policy_server() -> Any:
    """One server of the `random` policy on a free loopback port for the whole session (daemon threads)."""
    from policies.base import make_policy
    from policies.server import PolicyServer

    cfg = compose_config(["policy=random", "policy.chunk=2"]).policy
    return PolicyServer(lambda: make_policy(cfg), host="127.0.0.1", port=0, max_clients=64).start()


def _remote(root: Path) -> DictConfig:
    """A client of `_random_policy_server` (each client gets its own server-side policy)."""
    cfg = compose_config(["policy=remote"]).policy
    cfg.host, cfg.port, cfg.timeout_s = "127.0.0.1", _random_policy_server().port, 10.0
    return cfg


def _octo(root: Path) -> DictConfig:
    reason = "Octo runs in its own JAX environment (docs/serving.md); tests/serve/test_octo.py covers its logic"
    pytest.importorskip("octo.model.octo_model", reason=reason)
    return compose_config(["policy=octo"]).policy


CONTRACT_BUILDERS: dict[str, Callable[[Path], DictConfig]] = {
    "random": lambda root: compose_config(["policy=random"]).policy,
    "vla": _learned("vla"),
    "flow": _learned("flow"),
    "qsft": _qsft,
    "scripted": lambda root: compose_config(["policy=scripted"]).policy,
    "remote": _remote,
    "octo": _octo,
    "openvla": lambda root: __import__("tests.openvla.helpers", fromlist=["*"]).openvla_contract_config(root),
}


def contract_config(name: str, root: Path) -> DictConfig:
    if name not in CONTRACT_BUILDERS:
        pytest.fail(f"policy {name!r} is registered but has no tiny config: add it to CONTRACT_BUILDERS in {__file__}")
    return CONTRACT_BUILDERS[name](root)


def observation(seed: int, instruction: str = "reach forward", size: int = 48) -> dict[str, Any]:
    """An observation with a random (size, size, 3) image (resized by the policy to its training size).

    It also carries the `privileged` state of a lift episode (a cube near the gripper), which the
    scripted experts act on and every other policy ignores.
    """
    rng = np.random.default_rng(seed)
    state = np.concatenate([np.array([0.5, 0.0, 0.2]) + rng.normal(0, 0.05, 3), rng.normal(0, 0.1, 3), [1.0]])
    privileged = {
        "task": "lift",
        "seed": seed,
        "object_pos": state[:3] + rng.normal(0, 0.05, 3) - [0, 0, 0.15],
        "object_yaw": np.float32(rng.uniform(-np.pi, np.pi)),
        "object_size": np.full(3, 0.02),
    }
    return {
        "image_primary": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "state": state.astype(np.float32),
        "instruction": instruction,
        "privileged": privileged,
    }


@pytest.fixture(scope="session")
def policy_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data_dir holding robosteer_sim_suite/1.0.0 (what `data=sim` reads): 24 toy reaching episodes, 32 px."""
    from data.features import sim_dataset_spec
    from data.rlds_writer import stage_episode, write_rlds
    from data.synthetic import reaching_episode

    root = tmp_path_factory.mktemp("policy_sim")
    rng = np.random.default_rng(0)
    for i in range(24):
        episode = reaching_episode(rng, i, success=i % 2 == 0, image_size=IMAGE_SIZE, length=12)
        stage_episode(root / "staging", f"{i:04d}", episode)
    write_rlds(root / "staging", root / "data", "robosteer_sim_suite", "1.0.0", sim_dataset_spec(IMAGE_SIZE))
    return root / "data"
