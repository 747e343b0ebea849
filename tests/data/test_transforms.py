"""Reference values for the standardisation, reward, return and normalisation math."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from configs.errors import UserError
from data.config import RewardConfig
from data.datasets import DATASETS, binarize_gripper, bridge, relabel_actions
from data.normalize import ActionNormalizer, MissingStatisticError, compute_stats, dataset_statistics
from data.rewards import episode_returns, label_rewards, mc_returns, steps_to_end

# -- gripper binarisation (Octo's binarize_gripper_actions) -----------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ([1.0, 0.97, 0.7, 0.3, 0.02, 0.0, 0.5, 1.0], [1, 1, 0, 0, 0, 0, 1, 1]),  # closing, then opening
        ([0.0, 0.5, 0.99], [0, 1, 1]),
        ([1.0, 0.4, 0.6], [1, 0.6, 0.6]),  # trailing in-between values keep the raw last value
        ([0.04, 0.96], [0, 1]),
    ],
)
def test_binarize_gripper(raw: list[float], expected: list[float]) -> None:
    np.testing.assert_allclose(binarize_gripper(np.array(raw)), expected, atol=1e-6)


def test_relabel_is_achieved_delta_with_commanded_gripper() -> None:
    state = np.array([[0, 0, 0, 0, 0, 3.1, 1], [0.01, -0.02, 0.03, 0.1, 0, -3.1, 1], [0.02, 0, 0, 0, 0, -3.0, 0]])
    gripper = np.array([1.0, 0.0, 0.0])
    out = relabel_actions(state.astype(np.float32), gripper.astype(np.float32))
    np.testing.assert_allclose(out[0], [0.01, -0.02, 0.03, 0.1, 0, -6.2, 1.0], atol=1e-6)
    np.testing.assert_allclose(out[1], [0.01, 0.02, -0.03, -0.1, 0, 0.1, 0.0], atol=1e-6)
    wrapped = relabel_actions(state.astype(np.float32), gripper.astype(np.float32), wrap_angles=True)
    assert wrapped[0, 5] == pytest.approx(-6.2 + 2 * np.pi, abs=1e-5)


def test_bridge_standardisation() -> None:
    T = 5
    state = np.cumsum(np.full((T, 7), 0.01, np.float32), axis=0)
    action = np.zeros((T, 7), np.float32)
    action[:, 6] = [1.0, 0.6, 0.0, 0.0, 0.0]  # the last action is the builder's null action
    raw = {"steps/observation/state": state, "steps/action": action, "steps/language_instruction": [" put it "] * T}
    canon = bridge(raw)
    assert canon.instruction == "put it"
    np.testing.assert_array_equal(canon.frames, np.arange(T))
    assert canon.action.shape == (T - 1, 7)
    np.testing.assert_allclose(canon.action[:, :6], 0.01, atol=1e-6)
    np.testing.assert_allclose(canon.action[:, 6], [1, 0, 0, 0])
    dropped = bridge(raw, drop_first_step=True)
    np.testing.assert_array_equal(dropped.frames, np.arange(1, T))
    np.testing.assert_array_equal(dropped.action, canon.action[1:])
    assert dropped.state.shape == (T - 1, 7)
    commanded = bridge({**raw, "steps/action": action + 0.5}, relabel=False)
    np.testing.assert_allclose(commanded.action[:, :6], 0.5)


def test_unknown_dataset_suggests_the_closest() -> None:
    with pytest.raises(UserError, match="Did you mean 'bridge'"):
        DATASETS.get("brdge")


# -- rewards and Monte-Carlo returns -----------------------------------------------------------


def test_rewards_and_returns_hand_computed() -> None:
    # episode A: 5 transitions, success; episode B: 3 transitions, failure.
    to_end = steps_to_end(np.array([5, 3]))
    np.testing.assert_array_equal(to_end, [4, 3, 2, 1, 0, 2, 1, 0])
    success = np.array([1, 1, 1, 1, 1, 0, 0, 0], bool)
    cfg = RewardConfig(success_steps=3, success_reward=0.0, step_reward=-1.0, discount=0.5)
    reward, terminal = label_rewards(to_end, success, cfg)
    np.testing.assert_array_equal(reward, [-1, -1, 0, 0, 0, -1, -1, -1])
    np.testing.assert_array_equal(terminal, [0, 0, 1, 1, 1, 0, 0, 0])
    returns = mc_returns(reward, terminal, to_end, cfg.discount)
    # A: G4=G3=G2=0 (terminal), G1=-1+0.5*0=-1, G0=-1+0.5*-1=-1.5. B: -1, -1.5, -1.75 from the end.
    np.testing.assert_allclose(returns, [-1.5, -1.0, 0, 0, 0, -1.75, -1.5, -1.0])
    # by default (V-GPS's reverse scan) a failed episode keeps the discounted sum up to its time-out
    assert cfg.failure_return == "truncated"
    np.testing.assert_allclose(episode_returns(reward, terminal, to_end, success, cfg), returns)
    # Cal-QL's failed episodes: step_reward / (1 - discount) = -2 at every step; successes unchanged
    calql = RewardConfig(success_steps=3, step_reward=-1.0, discount=0.5, failure_return="constant")
    np.testing.assert_allclose(
        episode_returns(reward, terminal, to_end, success, calql), [-1.5, -1.0, 0, 0, 0, -2.0, -2.0, -2.0]
    )
    for bad, message in ((RewardConfig(failure_return="zero"), "use one of constant, truncated"),
                         (RewardConfig(discount=1.0, failure_return="constant"),
                          r"needs data.reward.discount in \[0, 1\)")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            episode_returns(reward, terminal, to_end, success, bad)


def test_qsft_style_rewards() -> None:
    to_end = steps_to_end(np.array([4]))
    cfg = RewardConfig(success_steps=1, success_reward=1.0, step_reward=0.0, discount=0.9)
    reward, terminal = label_rewards(to_end, np.ones(4, bool), cfg)
    returns = mc_returns(reward, terminal, to_end, cfg.discount)
    np.testing.assert_allclose(returns, [0.729, 0.81, 0.9, 1.0], rtol=1e-6)


# -- normalisation ---------------------------------------------------------------------------------


def _stats() -> dict:
    rng = np.random.default_rng(0)
    actions = rng.uniform(-2, 2, (1000, 7))
    actions[:, 6] = rng.integers(0, 2, 1000)
    actions[:, 4] = 0.3  # a dimension that never varies
    return dataset_statistics(actions, rng.normal(size=(1000, 7)), 10)


def test_stats_reference_values() -> None:
    values = np.arange(101, dtype=np.float64)[:, None] * np.array([[1.0, -2.0]])
    s = compute_stats(values)
    assert s["count"] == 101
    np.testing.assert_allclose(s["mean"], [50, -100])
    np.testing.assert_allclose(s["q01"], [1, -198])  # linear interpolation at rank 1 of 0..100
    np.testing.assert_allclose(s["q99"], [99, -2])
    np.testing.assert_allclose(s["min"], [0, -200])


def test_bounds_q99_maps_and_inverts() -> None:
    stats = _stats()
    norm = ActionNormalizer(stats, "bounds_q99")
    q01, q99 = np.array(stats["action"]["q01"]), np.array(stats["action"]["q99"])
    a = np.stack([q01, q99, (q01 + q99) / 2, q99 + 5]).astype(np.float32)
    a[:, 6] = [0, 1, 1, 0]
    out = norm.normalize(a)
    np.testing.assert_allclose(out[0, [0, 1, 2, 3, 5]], -1, atol=1e-5)
    np.testing.assert_allclose(out[1, [0, 1, 2, 3, 5]], 1, atol=1e-5)
    np.testing.assert_allclose(out[2, [0, 1, 2, 3, 5]], 0, atol=1e-5)
    np.testing.assert_allclose(out[3, [0, 1, 2, 3, 5]], 1)  # clipped
    np.testing.assert_array_equal(out[:, 4], 0)  # constant dimension -> 0 (OpenVLA)
    np.testing.assert_array_equal(out[:, 6], a[:, 6])  # gripper untouched
    back = norm.unnormalize(out[:3])
    np.testing.assert_allclose(back[:, [0, 1, 2, 3, 5, 6]], a[:3, [0, 1, 2, 3, 5, 6]], atol=1e-5)


def test_numpy_and_torch_agree() -> None:
    norm = ActionNormalizer(_stats(), "normal")
    a = np.random.default_rng(1).normal(size=(8, 7)).astype(np.float32)
    np.testing.assert_allclose(norm.normalize(torch.from_numpy(a)).numpy(), norm.normalize(a), atol=1e-6)
    arm = [0, 1, 2, 3, 5]  # dimension 4 never varies in the statistics: it maps to 0, not invertible
    np.testing.assert_allclose(norm.unnormalize(norm.normalize(a))[:, arm], a[:, arm], atol=1e-4)


def test_missing_statistic_is_an_error() -> None:
    stats = _stats()
    del stats["action"]["q99"]
    with pytest.raises(MissingStatisticError, match="have no 'q99'"):
        ActionNormalizer(stats, "bounds_q99")
    with pytest.raises(UserError, match="Unknown normalisation mode"):
        ActionNormalizer(_stats(), "minmax")
