"""The control loop: observation -> canonical obs -> policy.act -> safety -> step_action, at 5 Hz.

    loop = ControlLoop(client, policy, limits)           # limits: a resolved SafetyConfig
    episode = loop.run_episode("put the spoon on the towel", max_steps=60)
    episode.stop_reason, episode.counts                  # why it ended; interventions by kind

One step: wait for the next 5 Hz tick; get an observation (none, or a frozen one, stops the
episode); run `policy.act(obs)[0]` (the Policy contract); pass it through the safety layer; stop
if the policy was late or the observation is now stale; send it with `step_action`; any status but
SUCCESS stops the episode, and the action is never resent (a request that timed out may have
executed). Ctrl-C, an unsafe action and any error also stop it. After a stop for a fault, the
watchdog or Ctrl-C, the loop sends nothing more but a move to the safe pose (if configured); at
the normal end the arm holds its last target so that the operator can judge the outcome.

The episode keeps T observations and the T - 1 actions between them (RLDS: the recorder writes
them with the canonical robosteer-sim spec). If the outcome of the last action could not be
observed, that action is left out (and logged).

In a dry run (`dry_run=True`) the loop only reads observations: it never sends init, reset,
step_action or move, and prints the action it would send at each step.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from configs.errors import UserError
from real_robot.client import WidowXClient
from real_robot.protocol import RobotObservation, WidowXStatus
from real_robot.safety import Pacer, SafetyConfig, SafetyLayer, UnsafeActionError, Watchdog

log = logging.getLogger(__name__)


@dataclass
class StepTrace:
    """Timing and outcome of one control step (monotonic seconds)."""

    step: int
    tick: float  # when the step started
    obs_stamp: float  # when its observation arrived
    policy_s: float  # duration of policy.act
    sent_at: float | None  # when the action was sent; None if it was not
    status: str  # WidowXStatus name, "dry_run" or "not_sent"
    action: np.ndarray | None = None  # (7,) the action sent (or printed in a dry run)
    answered_at: float | None = None  # when the service's answer to step_action arrived (or the request gave up)


@dataclass
class Episode:
    """What one episode observed and did; `images[t]`, `states[t]` precede `actions[t]`."""

    instruction: str
    dry_run: bool = False
    images: list[np.ndarray] = field(default_factory=list)  # T x (S, S, 3) uint8, camera 0
    wrist_images: list[np.ndarray] = field(default_factory=list)  # T x (S, S, 3) uint8 if a wrist camera is set
    states: list[np.ndarray] = field(default_factory=list)  # T x (7,) float32
    actions: list[np.ndarray] = field(default_factory=list)  # T - 1 x (7,) float32, as sent (after safety)
    policy_actions: list[np.ndarray] = field(default_factory=list)  # T - 1 x (7,) float32, as the policy gave
    trace: list[StepTrace] = field(default_factory=list)
    periods: np.ndarray = field(default_factory=lambda: np.zeros(0))  # seconds between step starts
    counts: Counter[str] = field(default_factory=Counter)  # interventions and stops by kind
    stop_reason: str = ""
    error: BaseException | None = None

    @property
    def interrupted(self) -> bool:
        return self.counts["interrupted"] > 0

    def summary(self) -> dict[str, Any]:
        periods = self.periods
        timing = {k: float(f(periods)) for k, f in (("mean", np.mean), ("std", np.std), ("min", np.min),
                                                     ("max", np.max))} if len(periods) else {}  # fmt: skip
        return {
            "instruction": self.instruction,
            "dry_run": self.dry_run,
            "frames": len(self.images),
            "actions": len(self.actions),
            "stop_reason": self.stop_reason,
            "interventions": dict(sorted(self.counts.items())),
            "period_s": timing,
        }


def canonical_observation(obs: RobotObservation, instruction: str, wrist_camera: int | None = None) -> dict[str, Any]:
    """DESIGN.md's observation dict from a service observation."""
    out: dict[str, Any] = {"image_primary": obs.images[0], "state": obs.state, "instruction": instruction}
    if wrist_camera is not None:
        if not 0 <= wrist_camera < len(obs.images):
            raise UserError(f"robot.wrist_camera={wrist_camera} but the service sends {len(obs.images)} camera(s)")
        out["image_wrist"] = obs.images[wrist_camera]
    return out


class ControlLoop:
    """Runs episodes of a Policy on the WidowX through the safety layer (see the module docstring)."""

    def __init__(
        self, client: WidowXClient, policy: Any, limits: SafetyConfig, dry_run: bool = False,
        wrist_camera: int | None = None, reset_timeout_s: float = 30.0, echo: Callable[[str], None] = print,
    ) -> None:  # fmt: skip
        self.client, self.policy, self.limits = client, policy, limits
        self.dry_run, self.wrist_camera, self.reset_timeout_s, self.echo = dry_run, wrist_camera, reset_timeout_s, echo

    def run_episode(self, instruction: str, max_steps: int, reset: bool = True) -> Episode:
        """Reset the robot (unless `reset` is False or in a dry run) and run up to `max_steps` steps."""
        episode = Episode(instruction, self.dry_run)
        safety = SafetyLayer(self.limits, episode.counts)
        watchdog = Watchdog(self.limits, episode.counts)
        pacer = Pacer(self.limits.control_hz, episode.counts)
        fault = True
        try:
            if reset and not self.dry_run:
                self.client.reset(self.reset_timeout_s)
            self.policy.reset(instruction)
            for step in range(max_steps):
                reason = self._step(step, episode, safety, watchdog, pacer)
                if reason is not None:
                    episode.stop_reason = reason
                    break
            else:
                episode.stop_reason, fault = f"completed {max_steps} steps", False
        except KeyboardInterrupt:
            episode.counts["interrupted"] += 1
            episode.stop_reason = "interrupted by the operator (Ctrl-C)"
        except UnsafeActionError as err:
            episode.stop_reason = f"unsafe action: {err}"
        except Exception as err:  # a policy or robot error: stop safely, keep the data, re-raise later
            episode.error, episode.stop_reason = err, f"error: {type(err).__name__}: {err}"
        episode.periods = pacer.periods()
        self._finish(episode, pacer, fault)
        return episode

    def _step(self, step: int, episode: Episode, safety: SafetyLayer, watchdog: Watchdog, pacer: Pacer) -> str | None:
        """One control step; returns a reason to stop, or None."""
        tick = pacer.wait()
        obs = self.client.get_observation()
        if obs is None:
            episode.counts["no_observation"] += 1
            return f"no observation: {self.client.last_error}"
        frozen = watchdog.observation_problem(obs.images, obs.state)
        if frozen is not None:
            return frozen
        self._add_frame(episode, obs)
        if safety.target is None or self.dry_run:  # the service's target starts at the measured pose
            safety.start(obs.state)
        started = time.monotonic()
        chunk = self.policy.act(canonical_observation(obs, episode.instruction, self.wrist_camera))
        policy_s = time.monotonic() - started
        raw = _first_action(chunk)
        action = safety.filter(raw, obs.state)
        late = watchdog.timing_problem(obs.stamp, policy_s, time.monotonic())
        trace = StepTrace(step, tick, obs.stamp, policy_s, None, "not_sent")
        if late is not None:
            episode.trace.append(trace)
            return late
        return self._send(episode, raw, action, trace, safety)

    def _send(self, episode: Episode, raw: np.ndarray, action: np.ndarray, trace: StepTrace,
              safety: SafetyLayer) -> str | None:  # fmt: skip
        """Send (or, in a dry run, print) one checked action; returns a reason to stop, or None."""
        trace.action = action
        if self.dry_run:
            trace.status = "dry_run"
            self.echo(f"step {trace.step:3d}: would send {np.array2string(action, precision=4, suppress_small=True)}")
            self._add_action(episode, raw, action, trace)
            return None
        trace.sent_at = time.monotonic()
        status = self.client.step_action(action)
        trace.status, trace.answered_at = status.name, time.monotonic()
        self._add_action(episode, raw, action, trace)
        if status != WidowXStatus.SUCCESS:
            episode.counts["command_failed"] += 1
            return f"step_action answered {status.name} ({self.client.last_error or 'no detail'}); not resent"
        safety.commit(action)
        return None

    def _add_frame(self, episode: Episode, obs: RobotObservation) -> None:
        episode.images.append(obs.images[0])
        if self.wrist_camera is not None and self.wrist_camera < len(obs.images):
            episode.wrist_images.append(obs.images[self.wrist_camera])
        episode.states.append(obs.state)

    @staticmethod
    def _add_action(episode: Episode, raw: np.ndarray, action: np.ndarray, trace: StepTrace) -> None:
        episode.policy_actions.append(raw)
        episode.actions.append(action)
        episode.trace.append(trace)

    def _finish(self, episode: Episode, pacer: Pacer, fault: bool) -> None:
        """Log the stop, observe the last action's outcome, then (after a fault) go to the safe pose."""
        level = logging.WARNING if fault else logging.INFO
        log.log(level, "episode stopped: %s", episode.stop_reason)
        try:
            if episode.actions and len(episode.images) == len(episode.actions):
                self._observe_outcome(episode, pacer)
            if fault and not self.dry_run and self.limits.return_to_safe_pose:
                self.safe_stop(episode)
        except KeyboardInterrupt:
            episode.counts["interrupted"] += 1
            log.error("Ctrl-C during the safe stop: abandoned; the arm holds its last target")

    def _observe_outcome(self, episode: Episode, pacer: Pacer) -> None:
        if not self.dry_run:
            pacer.wait()  # give the last action its period before observing it
        obs = self.client.get_observation()
        if obs is None:
            dropped = episode.actions.pop()
            episode.policy_actions.pop()
            log.warning("the outcome of the last action %s could not be observed (%s); it is not recorded",
                        np.round(dropped, 4), self.client.last_error)  # fmt: skip
        else:
            self._add_frame(episode, obs)

    def safe_stop(self, episode: Episode) -> None:
        """Send nothing but a move to the safe pose; log whether the service took it."""
        pose, duration = self.limits.safe_pose, self.limits.safe_move_duration_s
        status = self.client.move_to(pose, duration=duration, blocking=False)
        episode.counts["safe_stop"] += 1
        if status == WidowXStatus.SUCCESS:
            log.warning("safe stop: moving to the safe pose %s over %.1f s", pose, duration)
            return
        episode.counts["safe_stop_failed"] += 1
        log.error("safe stop: the service did not take the move to the safe pose (%s: %s). Nothing more is sent; "
                  "the arm holds its last target. Check the robot; use its e-stop if it is moving.",
                  status.name, self.client.last_error)  # fmt: skip


def _first_action(chunk: Any) -> np.ndarray:
    """The action to execute now: `act(obs)` returns (chunk, 7); the caller executes its first row."""
    chunk = np.asarray(chunk)
    if chunk.ndim != 2 or chunk.shape[1] != 7 or len(chunk) == 0:
        raise UnsafeActionError(f"policy.act returned shape {chunk.shape}, expected (chunk, 7)")
    return chunk[0].astype(np.float32)
