"""The control loop on loopback: a full episode, every injected fault, dry run, Ctrl-C, unsafe policies.

Every test checks what the *service* executed against what the loop sent: the same actions in the
same order, none twice, none after a fault, and each computed from its own fresh observation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import pytest

from policies.base import Policy
from real_robot.loop import ControlLoop, Episode
from real_robot.safety import SafetyConfig
from real_robot.sim_service import Fault, SimWidowXService
from tests.real_robot.conftest import IMAGE_SIZE, limits, random_policy

FAULT_S = 0.7  # delay of late replies (client timeout: 0.3 s)
OUTAGE_S = 5.0  # silence / downtime of no_reply and disconnect: longer than the whole stop sequence


def sent_actions(episode: Episode) -> np.ndarray:
    """(n, 7) the actions the loop handed to the client, in order."""
    sent = [t.action for t in episode.trace if t.sent_at is not None]
    return np.array(sent, np.float64).reshape(-1, 7)


def assert_fresh_and_unique(episode: Episode, cfg: SafetyConfig) -> None:
    """No action twice, each from its own observation, none computed from a stale one."""
    sends = [t for t in episode.trace if t.sent_at is not None]
    actions = sent_actions(episode)
    assert len({a.tobytes() for a in actions}) == len(actions), "an action was sent twice"
    assert len({t.obs_stamp for t in sends}) == len(sends), "two actions from one observation"
    assert all(t.sent_at - t.obs_stamp <= cfg.max_obs_age_s for t in sends), "an action from a stale observation"


def wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def run(
    service: SimWidowXService, connect, policy: Policy, steps: int = 12, **overrides
) -> tuple[Episode, SafetyConfig]:
    cfg = limits(**overrides)
    loop = ControlLoop(connect(service), policy, cfg, reset_timeout_s=5.0)
    return loop.run_episode("put the spoon on the towel", steps), cfg


def steered_policy() -> Policy:
    """The random policy steered (K = 8, argmax) by an untrained FiLM-ResNet critic at the loop's image size."""
    from policies.steering import ValueSteeredPolicy
    from tests.policies.conftest import fake_stats
    from values.config import EncoderConfig, ValueConfig
    from values.critic import random_critic

    cfg = ValueConfig(algo="calql", encoder=EncoderConfig(arch="resnet10t"), hidden=[16, 16])
    return ValueSteeredPolicy(random_policy(), random_critic(cfg, fake_stats()["sim"], IMAGE_SIZE), k=8, beta=0.0)


def deploy_config(*overrides: str):
    from hydra import compose, initialize_config_dir

    from configs import CONFIG_DIR
    from configs.schema import register

    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose("deploy_robot", overrides=["instruction=put the spoon on the towel", *overrides])


def random_steered_policy() -> Policy:
    """The random policy steered by the random critic, built by deploy_robot's own build_policy."""
    from real_robot.deploy import build_policy

    return build_policy(deploy_config("steer=true", "steering.critic=random", "steering.k=4"))


@pytest.fixture
def one_torch_thread():
    """The critic's convolutions on one thread (two spin-wait on a shared 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("make_policy", [random_policy, steered_policy, random_steered_policy],
                         ids=["random", "steered", "steered_random_critic"])  # fmt: skip
def test_full_episode(sim_service, connect, one_torch_thread, make_policy) -> None:
    """A whole episode through make_policy: a steered policy drops in wherever a policy runs."""
    service = sim_service()
    policy = make_policy()
    episode, cfg = run(service, connect, policy, steps=20)
    assert episode.stop_reason == "completed 20 steps" and episode.error is None
    assert len(episode.images) == 21 and len(episode.actions) == 20 and len(episode.states) == 21
    assert episode.images[0].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_allclose(np.array(service.executed), sent_actions(episode), atol=1e-6)
    assert_fresh_and_unique(episode, cfg)
    # The service's target moved by the sum of the actions (rotation about a lagging pose adds < 1 cm).
    start = np.array(episode.states[0][:3], np.float64)
    np.testing.assert_allclose(service.arm.target_xyz, start + sent_actions(episode)[:, :3].sum(0), atol=0.01)
    assert service.moves == []  # a completed episode does not move to the safe pose
    if hasattr(policy, "summary"):  # steered: every control step chose among K scored candidates
        assert policy.summary()["steps"] == 20 and set(policy.last_stats) == {0}


def test_deploy_steering_needs_a_critic() -> None:
    from configs.errors import UserError
    from real_robot.deploy import build_policy

    with pytest.raises(UserError, match=r"steering\.critic=<run dir of train_value.py>"):
        build_policy(deploy_config("steer=true"))
    assert type(build_policy(deploy_config())).__name__ == "RandomPolicy"  # steer=false: the policy itself


@pytest.mark.parametrize(
    ("kind", "on", "executed_faulted", "reachable_after", "log_line"),
    [
        ("no_reply", "step_action", False, False, "no reply to act step_action"),
        ("late_reply", "step_action", True, True, "no reply to act step_action"),
        ("garbage_reply", "step_action", True, True, "garbage reply to act step_action"),
        ("malicious_reply", "step_action", True, True, "forbidden global"),
        ("disconnect", "step_action", False, False, "no reply to act step_action"),
        ("no_reply", "obs", None, False, "no reply to obs"),
        ("late_reply", "obs", None, True, "no reply to obs"),
        ("garbage_reply", "obs", None, True, "garbage reply to obs"),
        ("disconnect", "obs", None, False, "no reply to obs"),
    ],
)
def test_faults_end_in_a_safe_stop(sim_service, connect, caplog, kind, on, executed_faulted, reachable_after,
                                   log_line) -> None:  # fmt: skip
    service = sim_service(Fault(kind, on=on, at=3, duration_s=FAULT_S if reachable_after else OUTAGE_S))
    with caplog.at_level(logging.INFO):
        episode, cfg = run(service, connect, random_policy())
    assert service.fault_fired.is_set()
    assert log_line in caplog.text and "episode stopped" in caplog.text
    sent = sent_actions(episode)
    if on == "step_action":  # the 4th action faulted; nothing was sent after it
        assert len(sent) == 4 and "NO_CONNECTION" in episode.stop_reason and "not resent" in episode.stop_reason
        expected = sent if executed_faulted else sent[:3]
    else:  # the 4th observation faulted: no action for it, none after it
        assert len(sent) == 3 and episode.stop_reason.startswith("no observation")
        expected = sent
    assert_fresh_and_unique(episode, cfg)
    assert episode.counts["safe_stop"] == 1
    if reachable_after:  # the service answers again: the safe-pose move reaches it
        assert wait_for(lambda: len(service.moves) == 1), "the safe-pose move never reached the service"
        np.testing.assert_allclose(service.moves[0], cfg.safe_pose)
    else:  # the service is gone (and drops what was queued when it comes back): the loop says so
        assert "did not take the move to the safe pose" in caplog.text and service.moves == []
    time.sleep(0.3)  # anything still in flight reaches the service
    np.testing.assert_allclose(np.array(service.executed).reshape(-1, 7), expected, atol=1e-6)
    assert len(episode.actions) == len(episode.images) - 1  # the recorded part stays consistent


class Scripted(Policy):
    """The random policy, except at step `at`: raise, return NaN, a bad gripper, or be slow."""

    def __init__(self, at: int, what: str) -> None:
        super().__init__()
        self.base, self.at, self.what, self.calls = random_policy(), at, what, 0

    def sample_actions(self, obs: dict, k: int, slot: int = 0) -> np.ndarray:
        actions = self.base.sample_actions(obs, k, slot)
        self.calls += 1
        if self.calls - 1 != self.at:
            return actions
        if self.what == "ctrl_c":
            raise KeyboardInterrupt
        if self.what == "nan":
            actions[..., 1] = np.nan
        elif self.what == "gripper":
            actions[..., 6] = -1.0
        elif self.what == "slow":
            time.sleep(0.3)
        elif self.what == "error":
            raise RuntimeError("checkpoint exploded")
        return actions


@pytest.mark.parametrize(
    ("what", "reason"),
    [
        ("ctrl_c", "interrupted by the operator"),
        ("nan", "unsafe action"),
        ("gripper", "unsafe action"),
        ("slow", "the policy took"),
        ("error", "error: RuntimeError: checkpoint exploded"),
    ],
)
def test_policy_problems_stop_safely(sim_service, connect, what, reason) -> None:
    service = sim_service()
    episode, cfg = run(service, connect, Scripted(at=3, what=what))
    assert reason in episode.stop_reason
    sent = sent_actions(episode)
    assert len(sent) == 3  # nothing for the faulty step, nothing after it
    np.testing.assert_allclose(np.array(service.executed), sent, atol=1e-6)
    assert wait_for(lambda: len(service.moves) == 1)
    np.testing.assert_allclose(service.moves[0], cfg.safe_pose)
    assert (episode.error is not None) == (what == "error")
    assert episode.interrupted == (what == "ctrl_c")
    assert len(episode.images) == 4 and len(episode.actions) == 3  # the outcome of action 3 was observed


def test_frozen_observations_stop_the_episode(sim_service, connect) -> None:
    service = sim_service()
    client = connect(service)
    frozen = service.observe()  # from now on the service replays one frame
    service.observe = lambda: frozen
    episode = ControlLoop(client, random_policy(), limits(max_identical_obs=2)).run_episode("wave", 12)
    assert "bit-identical" in episode.stop_reason and episode.counts["frozen_observation"] == 1
    assert len(sent_actions(episode)) == 3


def test_dry_run_only_reads_observations(sim_service, connect) -> None:
    service = sim_service()
    client = connect(service)
    printed: list[str] = []
    loop = ControlLoop(client, random_policy(), limits(), dry_run=True, echo=printed.append)
    requests_before = len(service.events)
    episode = loop.run_episode("wave", 5)
    kinds = {kind for _, kind, _ in service.events[requests_before:]}
    assert kinds == {"obs"} and service.executed == [] and service.moves == []
    assert len(printed) == 5 and all("would send [" in line for line in printed)
    assert episode.stop_reason == "completed 5 steps"
