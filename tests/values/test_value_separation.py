"""benchmarks/value_separation.py's per-timestep-bucket separation, on hand-made values."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "value_separation.py"


def load_script(name: str = "value_separation"):
    """A benchmarks/ script as a module."""
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_buckets_split_the_matched_pairs_and_their_auc() -> None:
    separation = load_script().separation
    # t = 0: 2 successes (q 1, 3) vs 1 failure (q 2) -> 1 of 2 pairs won; t = 5: 1 success (q 5) vs 2
    # failures (q 4, 6) -> 1 of 2; t = 12: 1 success (q 9) vs 1 failure (q 0) -> 1 of 1; t = 13: failures only
    q = np.array([1, 3, 2, 5, 4, 6, 9, 0, 7], float)
    success = np.array([1, 1, 0, 1, 0, 0, 1, 0, 0], bool)
    timestep = np.array([0, 0, 0, 5, 5, 5, 12, 12, 13])
    mc = -np.arange(9, dtype=float)
    out = separation(q, success, timestep, mc, [0, 10, 20])
    assert out["transitions"] == 9
    assert out["auc_success_matched"] == 3 / 5
    early, late = out["by_timestep"]
    assert (early["timesteps"], early["pairs"], early["auc_success_matched"]) == ([0, 10], 4, 0.5)
    assert (late["timesteps"], late["pairs"], late["auc_success_matched"]) == ([10, 20], 1, 1.0)
    at13 = next(r for r in out["mean_q_by_timestep"] if r["t"] == 13)
    assert at13 == {"t": 13, "q_success": None, "n_success": 0, "q_failure": 7.0, "n_failure": 1}
    at0 = out["mean_q_by_timestep"][0]
    assert (at0["q_success"], at0["q_failure"]) == (2.0, 2.0)


def test_by_task_separates_each_task_and_maps_phrasings_to_tasks() -> None:
    script = load_script()
    assert script.tasks_of(["pick up the cube", "stack the red block on the green block", "open the door"]) == [
        "lift", "stack", None,
    ]  # fmt: skip
    # lift: episodes 0 (success, q 1 then 4) and 1 (failure, q 2 then 3) -> t 0 lost, t 1 won: AUC 1/2;
    # stack: episodes 2 (success, q 5) and 3 (failure, q 0) -> AUC 1
    q = np.array([1, 4, 2, 3, 5, 0, 9], float)
    success = np.array([1, 1, 0, 0, 1, 0, 1], bool)
    timestep = np.array([0, 1, 0, 1, 0, 0, 0])
    episode = np.array([0, 0, 1, 1, 2, 3, 4])
    task = np.array(["lift", "lift", "lift", "lift", "stack", "stack", None], dtype=object)
    out = script.by_task(q, success, timestep, -q, episode, task)
    assert list(out) == ["lift", "stack"]  # a row of no registered task (episode 4) is in neither
    assert out["lift"]["auc_success_matched"] == 0.5 and out["stack"]["auc_success_matched"] == 1.0
    assert out["lift"]["episodes"] == {"success": 1, "failure": 1} and out["stack"]["transitions"] == 2
    assert out["lift"]["spearman_mc_return"] == -1.0
    only_successes = script.by_task(q[:2], success[:2], timestep[:2], q[:2], episode[:2], task[:2])
    assert np.isnan(only_successes["lift"]["auc_success_matched"])


def test_steer_preferences_measure_what_the_argmax_moves() -> None:
    module = load_script("steer_preferences")
    # one frame, 3 candidates: Q increases with the gripper component only; dx is constant
    first = np.zeros((1, 3, 7))
    first[0, :, 6] = [0.0, 0.5, 1.0]
    first[0, :, 1] = [1.0, -1.0, 0.0]  # dy: another order than Q
    q = np.array([[0.0, 1.0, 2.0]])
    shift, corr = module.preferences(first, q)
    sd = np.std([0.0, 0.5, 1.0])
    np.testing.assert_allclose(shift[0, 6], (1.0 - 0.5) / sd)
    np.testing.assert_allclose(corr[0, 6], 1.0)
    assert shift[0, 0] == 0 and corr[0, 0] == 0  # a constant component
    np.testing.assert_allclose(corr[0, 1], np.corrcoef([0.0, 1.0, 2.0], [1.0, -1.0, 0.0])[0, 1])
    sd, spread = module.choice(first, q)
    np.testing.assert_allclose(sd[0], first[0].std(0))
    assert sd[0, 0] == 0 and spread.tolist() == [2.0]


def test_steer_oracle_summary_on_hand_computed_branches() -> None:
    module = load_script("steer_oracle")
    # 2 states, 3 candidates, 2 rollouts each; the critic picks candidate 1 in both
    outcomes = np.array([[[1, 1], [0, 0], [1, 0]], [[0, 0], [0, 1], [0, 0]]])
    q = np.array([[0.1, 0.9, 0.5], [0.0, 1.0, 0.0]])
    out = module.oracle_summary(outcomes, q)
    assert out["success_mean"] == round((0.5 + 1 / 6) / 2, 4)
    assert out["critic_pick"] == 0.25 and out["critic_pick_gain"] == round((-0.5 + 1 / 3) / 2, 4)
    # oracle, state 0: by rollout 0 {0, 2} tie -> rollout 1 gives 0.5; by rollout 1 {0} -> 1; state 1:
    # by rollout 0 all tie -> 1/3; by rollout 1 {1} -> 0
    assert out["oracle_pick"] == round((0.75 + 1 / 6) / 2, 4) and out["oracle_pick_gain"] == 0.125
    # between-candidate mean squares 0.5 and 1/6, within 1/6 and 1/6: sigma_b = 1/12, sigma_w = 1/6
    assert out["choice_share"] == round(1 / 3, 4)
    # pairs with different outcomes: 3 in state 0 (all ordered wrongly), 2 in state 1 (both right)
    assert out["concordance"] == 0.4 and out["concordance_pairs"] == 5
    with pytest.raises(ValueError, match="do not match"):
        module.oracle_summary(outcomes, q[:, :2])
