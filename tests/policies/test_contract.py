"""The Policy contract, for every registered policy (tests/policies/conftest.py builds tiny configs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from configs.errors import UserError
from policies.base import POLICIES, _import_policy_modules, make_policy
from policies.learned import dataset_stats
from tests.policies.conftest import contract_config, fake_stats, observation, tiny_checkpoint, tiny_model_config

_import_policy_modules()
NAMES = POLICIES.names()


def test_the_project_policies_are_registered() -> None:
    assert {"random", "vla", "flow"} <= set(NAMES)


def check(actions: np.ndarray, shape: tuple[int, ...]) -> None:
    assert actions.shape == shape and actions.dtype == np.float32 and np.isfinite(actions).all()


@pytest.mark.parametrize("name", NAMES)
def test_shapes_dtypes_and_finiteness(name: str, tmp_path: Path) -> None:
    policy = make_policy(contract_config(name, tmp_path))
    c = policy.chunk
    policy.reset("reach forward", slot=0)
    policy.reset("go", slot=1)
    o0, o1 = observation(0), observation(1, "go")
    check(policy.sample_actions(o0, 5), (5, c, 7))
    check(policy.sample_actions(o0, 1), (1, c, 7))
    check(policy.act(o0), (c, 7))
    check(policy.act_batch([o0, o1], [0, 1]), (2, c, 7))
    check(policy.sample_actions_batch([o0, o1], 3, [0, 1]), (2, 3, c, 7))
    policy.close()


@pytest.mark.parametrize("name", NAMES)
def test_slots_are_independent(name: str, tmp_path: Path) -> None:
    """Slot 0's actions do not depend on slot 1's observation, instruction or resets (same seed)."""
    cfg = contract_config(name, tmp_path)
    a, b = make_policy(cfg), make_policy(cfg)
    for policy in (a, b):
        policy.reset("reach forward", slot=0)
        policy.reset("go", slot=1)
    o0 = observation(0)
    first_a = a.sample_actions_batch([o0, observation(1, "go")], 3, [0, 1])
    first_b = b.sample_actions_batch([o0, observation(2, "go")], 3, [0, 1])
    np.testing.assert_allclose(first_a[0], first_b[0], rtol=1e-5, atol=1e-6)
    b.reset("a much longer instruction for the second slot", slot=1)
    act_a = a.act_batch([o0, observation(1, "go")], [0, 1])
    act_b = b.act_batch([o0, observation(3, "a much longer instruction for the second slot")], [0, 1])
    np.testing.assert_allclose(act_a[0], act_b[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["vla", "flow", "openvla"])
def test_learned_policies_refuse_bad_input(name: str, tmp_path: Path) -> None:
    policy = make_policy(contract_config(name, tmp_path))
    with pytest.raises(UserError, match="image_primary"):
        policy.sample_actions({"instruction": "go"}, 2)
    with pytest.raises(UserError, match="uint8"):
        policy.sample_actions({"image_primary": np.zeros((32, 32, 3), np.float32), "instruction": "go"}, 2)
    with pytest.raises(UserError, match="No instruction"):
        policy.sample_actions({"image_primary": np.zeros((32, 32, 3), np.uint8)}, 2, slot=4)
    with pytest.raises(UserError, match="k=0"):
        policy.sample_actions(observation(0), 0)


@pytest.mark.parametrize("name", ["vla", "flow"])
def test_checkpoint_errors_name_the_fix(name: str, tmp_path: Path) -> None:
    cfg = tiny_model_config(name).policy
    cfg.device = "cpu"
    with pytest.raises(UserError, match=f"policy.checkpoint=<dir>.*train_policy.py policy={name}"):
        make_policy(cfg)
    cfg.checkpoint = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="No checkpoint at"):
        make_policy(cfg)
    other = "flow" if name == "vla" else "vla"
    cfg.checkpoint = str(tiny_checkpoint(other, tmp_path / other))
    with pytest.raises(UserError, match=f"holds a '{other}' policy.*policy={other}"):
        make_policy(cfg)


def test_unknown_policy_suggests_the_closest() -> None:
    with pytest.raises(UserError, match=r"Did you mean 'vla'.*Known: .*flow.*random.*vla"):
        make_policy(OmegaConf.create({"name": "vlaa"}))


def test_unnorm_key_is_required_for_mixtures_and_checked() -> None:
    stats = {"bridge": fake_stats(0)["sim"], "fractal": fake_stats(1)["sim"]}
    with pytest.raises(UserError, match=r"policy.unnorm_key=<name>"):
        dataset_stats(stats, None, "ckpt")
    with pytest.raises(UserError, match="not a dataset"):
        dataset_stats(stats, "sim", "ckpt")
    assert dataset_stats(stats, "fractal", "ckpt") is stats["fractal"]
