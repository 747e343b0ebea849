"""The `openvla` Policy: config, un-normalisation with the mask, canonical actions, inputs, reproducibility."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from configs.errors import UserError
from policies.action_tokens import ActionTokenizer
from policies.base import make_policy
from policies.openvla.policy import OpenVLAPolicy, action_stats, bin_centres, to_canonical, unnormalize
from policies.openvla.tiny import TINY_STATS
from tests.openvla.helpers import observation, openvla_config, plain_greedy_decode
from tests.policies.conftest import compose_config


def test_config_defaults() -> None:
    cfg = compose_config(["policy=openvla"]).policy
    assert (cfg.name, cfg.path, cfg.unnorm_key, cfg.dtype) == (
        "openvla",
        "openvla/openvla-7b",
        "bridge_orig",
        "bfloat16",
    )
    assert (cfg.quantization, cfg.temperature, cfg.top_k, cfg.greedy_act) == (None, 1.0, 0, True)


def test_unnormalisation_with_the_mask_by_hand() -> None:
    q01 = [-0.029, -0.042, -0.026, -0.081, -0.092, -0.153, 0.0]
    q99 = [0.029, 0.041, 0.04, 0.078, 0.077, 0.146, 1.0]
    s = action_stats({"bridge_orig": {"action": {"q01": q01, "q99": q99, "mask": [True] * 6 + [False]}}}, None, "x")
    # ids -> bins 32000 - id - 1 -> centres: 31999 -> bin 0 = -254/255; 31744 and 31745 -> bin 254 = 254/255;
    # 31872 -> bin 127 = 0; a non-action id 100 -> bin 254; a padding id 32001 -> bin 0 (clipped both ways).
    ids = np.array([31999, 31744, 31872, 100, 32001, 31745, 31999])
    c = 254 / 255
    normalised = bin_centres(ActionTokenizer(32000), ids)
    np.testing.assert_allclose(normalised, [-c, c, 0, c, -c, c, -c], atol=1e-15)
    expected = [
        0.5 * (1 - c) * 0.058 - 0.029,  # 0.5 (n + 1)(q99 - q01) + q01
        0.5 * (1 + c) * 0.083 - 0.042,
        0.5 * 1 * 0.066 - 0.026,
        0.5 * (1 + c) * 0.159 - 0.081,
        0.5 * (1 - c) * 0.169 - 0.092,
        0.5 * (1 + c) * 0.299 - 0.153,
        -c,  # the gripper is not un-normalised (mask False) ...
    ]
    actions = unnormalize(normalised, s)
    np.testing.assert_allclose(actions, expected, rtol=1e-12, atol=1e-12)
    assert to_canonical(actions)[-1] == 0.0  # ... and clipped to [0, 1] for the canonical action (1 = open)
    assert to_canonical(actions).dtype == np.float32


def test_a_missing_mask_unnormalises_every_dimension_as_published() -> None:
    s = action_stats({"d": {"action": {"q01": [0.0] * 7, "q99": [2.0] * 7}}}, "d", "x")
    np.testing.assert_allclose(unnormalize(np.full(7, 0.5), s), np.full(7, 1.5))


def test_unnorm_key_is_checked() -> None:
    assert action_stats(TINY_STATS, "fractal20220817_data", "x")["q99"][0] == 0.18
    with pytest.raises(UserError, match=r"trained on 2 datasets: choose policy.unnorm_key from \['bridge_orig'"):
        action_stats(TINY_STATS, None, "x")
    with pytest.raises(UserError, match=r"policy.unnorm_key='bridge' is not a dataset of x; it has \['bridge_orig'"):
        action_stats(TINY_STATS, "bridge", "x")
    with pytest.raises(UserError, match=r"lack \['q99'\]"):
        action_stats({"d": {"action": {"q01": [0.0] * 7}}}, "d", "x")
    with pytest.raises(UserError, match="not 7-dimensional"):
        action_stats({"d": {"action": {"q01": [0.0] * 6, "q99": [1.0] * 6}}}, "d", "x")


@pytest.fixture(scope="module")
def policy(tiny_dir: Path) -> OpenVLAPolicy:
    return make_policy(openvla_config(tiny_dir))


def test_act_is_the_published_greedy_action(policy: OpenVLAPolicy) -> None:
    obs = observation(2)
    policy.reset(obs["instruction"])
    pixel_values, input_ids = policy.inputs(obs)
    ids = plain_greedy_decode(policy.model, pixel_values, input_ids, restrict=False)
    expected = to_canonical(unnormalize(bin_centres(policy.model.tokens, np.array(ids)), policy.stats))
    np.testing.assert_array_equal(policy.act(obs), expected[None])


def test_sample_actions_are_canonical_candidates(policy: OpenVLAPolicy) -> None:
    actions = policy.sample_actions(observation(3), 20)
    assert actions.shape == (20, 1, 7) and actions.dtype == np.float32
    q01, q99 = TINY_STATS["bridge_orig"]["action"]["q01"], TINY_STATS["bridge_orig"]["action"]["q99"]
    assert (actions[..., :6] >= np.array(q01[:6]) - 1e-6).all() and (actions[..., :6] <= np.array(q99[:6]) + 1e-6).all()
    assert ((actions[..., 6] >= 0) & (actions[..., 6] <= 1)).all()
    assert len(np.unique(actions[:, 0, 0])) > 1


def test_seeds_and_greedy_act_option(tiny_dir: Path) -> None:
    obs = observation(4)
    a, b = make_policy(openvla_config(tiny_dir)), make_policy(openvla_config(tiny_dir))
    np.testing.assert_array_equal(a.sample_actions(obs, 6), b.sample_actions(obs, 6))
    other = make_policy(openvla_config(tiny_dir, "policy.seed=1"))
    assert not np.array_equal(a.sample_actions(obs, 6), other.sample_actions(obs, 6))
    sampled = make_policy(openvla_config(tiny_dir, "policy.greedy_act=false", "policy.temperature=0"))
    # greedy over action ids (masked) vs over the whole vocabulary: the random model prefers other ids
    assert sampled.act(obs).shape == (1, 7)
    np.testing.assert_array_equal(sampled.act(obs), sampled.sample_actions(obs, 3)[0])
    assert not np.array_equal(sampled.act(obs), a.act(obs))


def test_inputs_follow_the_model_dtype(tiny_dir: Path) -> None:
    policy = make_policy(openvla_config(tiny_dir, "policy.dtype=bfloat16"))
    pixel_values, input_ids = policy.inputs(observation(0))
    assert pixel_values.dtype == torch.bfloat16 and input_ids.dtype == torch.long
    assert policy.act(observation(0)).shape == (1, 7)
