"""Safety layer: workspace clamp, per-step limits, gripper sanity, NaN refusal, watchdog, pacing."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from configs.errors import UserError
from real_robot.protocol import DEFAULT_ENV_PARAMS
from real_robot.safety import Pacer, SafetyConfig, SafetyLayer, UnsafeActionError, Watchdog, resolve_limits

LIMITS = resolve_limits(SafetyConfig(), DEFAULT_ENV_PARAMS)
START = np.array([0.3, 0.0, 0.15, 0.0, 0.0, 0.0, 1.0], np.float32)


def layer(**overrides) -> SafetyLayer:
    safety = SafetyLayer(replace(LIMITS, **overrides))
    safety.start(START)
    return safety


def act(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


def test_defaults_come_from_the_service_env_params() -> None:
    assert LIMITS.workspace_low == [0.1, -0.15, -0.1] and LIMITS.workspace_high == [0.45, 0.25, 0.18]
    assert LIMITS.yaw_range == [-1.57, 1.57]
    explicit = resolve_limits(replace(SafetyConfig(), workspace_low=[0, 0, 0], workspace_high=[1, 1, 1],
                                      yaw_range=[-1, 1]), None)  # fmt: skip
    assert explicit.workspace_high == [1, 1, 1]
    with pytest.raises(UserError, match="override_workspace_boundaries"):
        resolve_limits(SafetyConfig(), {})
    with pytest.raises(UserError, match="low < high"):
        resolve_limits(replace(SafetyConfig(), workspace_low=[1, 0, 0]), DEFAULT_ENV_PARAMS)
    with pytest.raises(UserError, match="max_translation"):
        resolve_limits(replace(SafetyConfig(), max_translation=0), DEFAULT_ENV_PARAMS)


def test_a_safe_action_passes_unchanged() -> None:
    safety = layer()
    action = act(0.01, -0.01, 0.005, 0.05, -0.05, 0.1, 0.0)
    np.testing.assert_array_equal(safety.filter(action, START), action)
    assert not safety.counts


def test_per_step_limits_clip_each_axis() -> None:
    safety = layer()
    out = safety.filter(act(0.1, -0.04, 0.01, 0.5, -0.3, 0.1, 1.0), START)
    np.testing.assert_allclose(out, [0.03, -0.03, 0.01, 0.2, -0.2, 0.1, 1.0], atol=1e-7)
    assert safety.counts == Counter(translation_limit=1, rotation_limit=1)


def test_workspace_clamp_follows_the_tracked_target() -> None:
    """Deltas apply to the previous target: three +z steps of 0.02 from z=0.15 must stop at 0.18."""
    safety = layer()
    sent = []
    for _ in range(3):
        action = safety.filter(act(0, 0, 0.02, 0, 0, 0, 1), START)  # the measured pose lags (still START)
        sent.append(action[2])
        safety.commit(action)
    np.testing.assert_allclose(sent, [0.02, 0.01, 0.0], atol=1e-6)
    np.testing.assert_allclose(safety.target, [0.3, 0.0, 0.18], atol=1e-6)
    assert safety.counts["workspace_clamp"] == 2


def test_outside_the_box_only_moves_back_in_by_at_most_the_step_limit() -> None:
    safety = SafetyLayer(LIMITS)
    safety.start(np.array([0.6, 0.0, 0.15, 0, 0, 0, 1]))  # started outside (x > 0.45)
    out = safety.filter(act(0.01, 0, 0, 0, 0, 0, 1), START)
    assert out[0] == pytest.approx(-0.03)  # clamped into the box, then limited per step
    assert safety.counts == Counter(workspace_clamp=1, translation_limit=1)


def test_yaw_stays_in_range() -> None:
    safety = layer()
    near_limit = START.copy()
    near_limit[5] = 1.5
    assert safety.filter(act(0, 0, 0, 0, 0, 0.15, 1), near_limit)[5] == pytest.approx(0.07, abs=1e-6)
    outside = START.copy()
    outside[5] = -2.0
    assert safety.filter(act(0, 0, 0, 0, 0, -0.1, 1), outside)[5] == 0.0  # no further away
    assert safety.filter(act(0, 0, 0, 0, 0, 0.1, 1), outside)[5] == pytest.approx(0.1)  # back towards the range
    assert safety.counts["yaw_clamp"] == 2


def test_gripper_sanity(caplog: pytest.LogCaptureFixture) -> None:
    safety = layer()
    assert safety.filter(act(0, 0, 0, 0, 0, 0, 1.03), START)[6] == 1.0
    assert safety.filter(act(0, 0, 0, 0, 0, 0, -0.02), START)[6] == 0.0
    with caplog.at_level(logging.ERROR), pytest.raises(UnsafeActionError, match="convention"):
        safety.filter(act(0, 0, 0, 0, 0, 0, -1.0), START)
    assert safety.counts == Counter(gripper_clip=2, gripper_out_of_range=1)
    assert "gripper_out_of_range" in caplog.text


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_actions_are_refused(bad: float) -> None:
    safety = layer()
    with pytest.raises(UnsafeActionError, match="NaN or infinite"):
        safety.filter(act(0, bad, 0, 0, 0, 0, 1), START)
    with pytest.raises(UnsafeActionError, match="shape"):
        safety.filter(np.zeros(6), START)
    assert safety.counts == Counter(nonfinite_action=1, bad_shape=1)


def test_watchdog_timing() -> None:
    counts: Counter[str] = Counter()
    watchdog = Watchdog(LIMITS, counts)
    assert watchdog.timing_problem(obs_stamp=10.0, policy_s=0.05, now=10.1) is None
    assert "max_policy_s" in watchdog.timing_problem(obs_stamp=10.0, policy_s=0.3, now=10.31)
    assert "max_obs_age_s" in watchdog.timing_problem(obs_stamp=10.0, policy_s=0.01, now=10.5)
    assert counts == Counter(late_policy=1, stale_observation=1)


def test_watchdog_detects_frozen_observations() -> None:
    counts: Counter[str] = Counter()
    watchdog = Watchdog(replace(LIMITS, max_identical_obs=2), counts)
    image = np.zeros((1, 4, 4, 3), np.uint8)
    assert watchdog.observation_problem(image, START) is None
    assert watchdog.observation_problem(image, START) is None  # 1 repeat
    assert watchdog.observation_problem(image, START) is None  # 2 repeats: still allowed
    assert "bit-identical" in watchdog.observation_problem(image, START)
    moved = START.copy()
    moved[0] += 0.001
    assert watchdog.observation_problem(image, moved) is None  # any change resets the count
    assert counts == Counter(frozen_observation=1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds + 0.001  # sleep overshoots; the pacer spins to the exact deadline


def test_pacer_keeps_the_period_and_counts_overruns() -> None:
    clock = FakeClock()
    pacer = Pacer(5.0, clock=clock, sleep=clock.sleep)
    ticks = []
    for work in (0.05, 0.10, 0.19, 0.35, 0.05):  # the 4th step overruns its period
        ticks.append(pacer.wait())
        clock.now += work
    ticks.append(pacer.wait())
    np.testing.assert_allclose(np.diff(ticks), [0.2, 0.2, 0.2, 0.35, 0.2], atol=2e-3)
    assert pacer.counts == Counter(overrun=1)
    assert len(pacer.periods()) == 5
