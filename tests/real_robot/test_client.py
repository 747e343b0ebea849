"""The client against the simulated service: timeouts, socket resets, long init/reset, status codes."""

from __future__ import annotations

import logging
import signal

import numpy as np
import pytest

from real_robot.client import RobotCommandError, RobotConnectionError
from real_robot.protocol import DEFAULT_ENV_PARAMS, WidowXStatus
from real_robot.sim_service import Fault
from tests.real_robot.conftest import IMAGE_SIZE


def test_observation_matches_the_service_state(sim_service, connect) -> None:
    service = sim_service()
    client = connect(service)
    obs = client.get_observation()
    assert obs.images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and obs.images.dtype == np.uint8
    np.testing.assert_allclose(obs.state, service.arm.state(), atol=1e-4)  # the arm is at rest
    assert obs.full_image[:2] == b"\xff\xd8"  # JPEG


def test_a_late_reply_is_never_read_as_the_next_answer(sim_service, connect) -> None:
    """obs #1 is answered after 0.8 s; the client gave up at 0.3 s, so the next reply it reads is its own."""
    service = sim_service(Fault("late_reply", on="obs", at=1, duration_s=0.8))
    client = connect(service)
    assert client.get_observation() is not None
    resets = client.socket_resets
    assert client.get_observation() is None and "no reply to obs" in client.last_error
    assert client.socket_resets == resets + 1
    # The service still sleeps on obs #1; this request queues behind it on a fresh socket.
    status = client.act("gripper", {"open": 0.0}, timeout_ms=3000)
    assert status is WidowXStatus.SUCCESS  # an obs dict read here would not be a status
    assert client.get_observation() is not None


def test_garbage_and_malicious_replies_reset_the_socket(sim_service, connect) -> None:
    for kind in ("garbage_reply", "malicious_reply"):
        service = sim_service(Fault(kind, on="obs", at=0))
        client = connect(service)
        assert client.get_observation() is None
        assert "garbage reply to obs" in client.last_error
        assert client.get_observation() is not None  # the next exchange works


def test_slow_init_is_polled_until_the_service_answers(sim_service, connect, caplog) -> None:
    service = sim_service(init_delay_s=1.0)
    client = connect(service, init=False)
    with caplog.at_level(logging.INFO):
        assert client.init(DEFAULT_ENV_PARAMS, IMAGE_SIZE, timeout_s=10) is WidowXStatus.SUCCESS
    assert "polling for an observation" in caplog.text
    assert [kind for _, kind, _ in service.events].count("act:init") == 1  # never resent
    assert client.get_observation().images.shape[1] == IMAGE_SIZE


def test_slow_reset_is_polled_and_a_stuck_one_times_out(sim_service, connect) -> None:
    service = sim_service(reset_delay_s=0.8)
    client = connect(service, init=True)  # same params as before -> no re-init
    assert client.reset(timeout_s=10) is WidowXStatus.SUCCESS
    service.reset_delay_s = 3.0
    with pytest.raises(RobotConnectionError, match=r"did not answer within 1 s after reset"):
        client.reset(timeout_s=1.0)


def test_test_mode_service_refuses_init(sim_service, connect) -> None:
    client = connect(sim_service(testing=True), init=False)
    with pytest.raises(RobotCommandError, match="--test"):
        client.init(DEFAULT_ENV_PARAMS, IMAGE_SIZE)
    assert client.get_observation() is None and "not initialised" in client.last_error


def test_commands_and_their_status(sim_service, connect) -> None:
    service = sim_service()
    client = connect(service, init=False)
    assert client.step_action(np.zeros(7)) is WidowXStatus.NOT_INITIALIZED
    client.init(DEFAULT_ENV_PARAMS, IMAGE_SIZE)
    assert client.move_to([0.25, 0.05, 0.1, 0, 0, 0.3], duration=0.5) is WidowXStatus.SUCCESS
    np.testing.assert_allclose(service.moves[-1], [0.25, 0.05, 0.1, 0, 0, 0.3])
    assert client.move_to(np.eye(4)) is WidowXStatus.SUCCESS
    assert client.move_gripper(0.0) is WidowXStatus.SUCCESS and service.arm.target_gripper == 0.0
    assert client.reboot_motor("wrist_angle") is WidowXStatus.SUCCESS
    assert client.step_action(np.array([0.01, 0, 0, 0, 0, 0, 1.0])) is WidowXStatus.SUCCESS
    np.testing.assert_allclose(service.executed[-1], [0.01, 0, 0, 0, 0, 0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        client.step_action(np.array([np.nan] * 7))
    with pytest.raises(ValueError, match="unknown joint"):
        client.reboot_motor("elbowz")


def test_delta_actions_apply_to_the_previous_target(sim_service, connect) -> None:
    """Two quick steps add up even though the measured pose lags (the service's semantics)."""
    service = sim_service()
    client = connect(service)
    client.reset()
    start = service.arm.target_xyz.copy()
    for _ in range(2):
        client.step_action(np.array([0.02, 0, 0, 0, 0, 0, 1.0]))
    np.testing.assert_allclose(service.arm.target_xyz, start + np.array([0.04, 0, 0]), atol=1e-9)
    client.step_action(np.array([0.0, 0, 0.05, 0, 0, 0, 1.0]))  # z 0.15 + 0.05 > 0.18: clipped
    assert service.arm.target_xyz[2] == pytest.approx(0.18) and service.arm.clipped_steps == 1


def test_ctrl_c_during_a_request_leaves_a_usable_client(sim_service, connect) -> None:
    """Interrupted while waiting for a reply, the REQ socket is replaced, so the safe-stop move still goes out."""
    service = sim_service(Fault("late_reply", on="obs", at=1, duration_s=0.5))
    client = connect(service, timeout_ms=2000)
    assert client.get_observation() is not None

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.1)
    try:
        with pytest.raises(KeyboardInterrupt):
            client.get_observation()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert client.move_to([0.3, 0, 0.15, 0, 0, 0]) is WidowXStatus.SUCCESS
    assert len(service.moves) == 1
