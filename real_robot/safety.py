"""The safety layer between a policy and the WidowX: action limits, a watchdog and 5 Hz pacing.

    safety = SafetyLayer(resolve_limits(SafetyConfig(), env_params))
    safety.start(obs.state)               # at the start of an episode: track the target from here
    action = safety.filter(policy_action, obs.state)   # clamps, or raises UnsafeActionError
    ... client.step_action(action) == SUCCESS ...
    safety.commit(action)                 # the service moved its target by this action

What `filter` does to a canonical action (7,) [dx, dy, dz, droll, dpitch, dyaw, gripper], in order:
1. refuses (UnsafeActionError) a wrong shape, NaN/inf, or a gripper value far outside [0, 1] (a policy
   that speaks another gripper convention, e.g. robosuite's -1/+1);
2. clips a gripper value slightly outside [0, 1];
3. shrinks the translation so that the end-effector target stays inside the workspace box. Like the
   service (robot_base_env.py `_next_qpos`), deltas apply to the previous *target*, not the measured
   pose, so the layer tracks the target: reset to the measured pose at `start`, advanced by every
   committed action and clipped to the box, as the service clips it;
4. clips each translation delta to +-max_translation and each rotation delta to +-max_rotation
   (tighter than the service's own +-0.05 m / +-0.25 rad);
5. clips the yaw delta so that the measured yaw plus the delta stays inside yaw_range.
Every change is an *intervention*: logged and counted in `counts` (the episode summary prints them).

The `Watchdog` tells the loop to stop sending when an observation is stale (older than
max_obs_age_s when the action would be sent), the policy is late (slower than max_policy_s), or the
observation is frozen (bit-identical images and state for more than max_identical_obs steps: a stuck
camera or a service that replays its last frame). `Pacer` keeps the loop at control_hz.

Imports only numpy and the standard library (runs on a robot computer).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from configs.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class SafetyConfig:
    """Limits of the safety layer; every field is used by `SafetyLayer`, `Watchdog` or the loop."""

    # Box of the end-effector target, metres [x, y, z] in the robot base frame. null = the service's
    # env_params.override_workspace_boundaries (DefaultEnvParams: [0.1, -0.15, -0.1] .. [0.45, 0.25, 0.18]).
    workspace_low: list[float] | None = None
    workspace_high: list[float] | None = None
    # [min, max] yaw of the end-effector, radians; null = override_workspace_boundaries' zangle (+-1.57).
    yaw_range: list[float] | None = None
    # Largest translation per step and axis, metres (the service clips at 0.05).
    max_translation: float = 0.03
    # Largest rotation per step and axis, radians (the service clips at 0.25).
    max_rotation: float = 0.2
    # Gripper values in [-tol, 1 + tol] are clipped to [0, 1]; values further out stop the episode.
    gripper_tolerance: float = 0.05
    # Control rate (Bridge data was collected at 5 Hz).
    control_hz: float = 5.0
    # Stop if the observation an action is computed from is older than this when the action would be sent.
    max_obs_age_s: float = 0.4
    # Stop if one policy call takes longer than this.
    max_policy_s: float = 0.25
    # Stop after this many consecutive bit-identical observations (0 disables the check).
    max_identical_obs: int = 5
    # After a stop (fault, watchdog, Ctrl-C, end of episode) move to `safe_pose`.
    return_to_safe_pose: bool = True
    # Absolute pose [x, y, z, roll, pitch, yaw] (DefaultEnvParams start_state); the gripper is left as it is.
    safe_pose: list[float] = field(default_factory=lambda: [0.3, 0.0, 0.15, 0.0, 0.0, 0.0])
    # Duration the service is given for the move to the safe pose, seconds.
    safe_move_duration_s: float = 2.0


class UnsafeActionError(UserError):
    """The policy produced an action that must not be sent (NaN, wrong shape, nonsense gripper)."""


def resolve_limits(cfg: SafetyConfig, env_params: dict[str, Any] | None) -> SafetyConfig:
    """`cfg` with the null workspace fields taken from env_params["override_workspace_boundaries"]."""
    bounds = (env_params or {}).get("override_workspace_boundaries")
    need = cfg.workspace_low is None or cfg.workspace_high is None or cfg.yaw_range is None
    if need and not bounds:
        raise UserError(
            "robot.safety.workspace_low/high/yaw_range are null and robot.env_params has no "
            "override_workspace_boundaries to take them from: set one of them."
        )
    out = cfg
    if cfg.workspace_low is None:
        out = replace(out, workspace_low=[float(v) for v in bounds[0][:3]])
    if cfg.workspace_high is None:
        out = replace(out, workspace_high=[float(v) for v in bounds[1][:3]])
    if cfg.yaw_range is None:
        out = replace(out, yaw_range=[float(bounds[0][3]), float(bounds[1][3])])
    check_limits(out)
    return out


def check_limits(cfg: SafetyConfig) -> None:
    """Raise `UserError` naming the field if the limits make no sense."""
    low, high = np.asarray(cfg.workspace_low, float), np.asarray(cfg.workspace_high, float)
    if low.shape != (3,) or high.shape != (3,) or not (low < high).all():
        raise UserError(f"robot.safety workspace must be 3 numbers with low < high, got {low} .. {high}")
    if len(cfg.yaw_range) != 2 or not cfg.yaw_range[0] < cfg.yaw_range[1]:
        raise UserError(f"robot.safety.yaw_range must be [min, max], got {cfg.yaw_range}")
    for name in ("max_translation", "max_rotation", "control_hz", "max_obs_age_s", "max_policy_s"):
        if not getattr(cfg, name) > 0:
            raise UserError(f"robot.safety.{name} must be > 0, got {getattr(cfg, name)}")
    if len(cfg.safe_pose) != 6:
        raise UserError(f"robot.safety.safe_pose must be [x, y, z, roll, pitch, yaw], got {cfg.safe_pose}")


class SafetyLayer:
    """Clamps and refuses actions; counts every intervention (see the module docstring)."""

    def __init__(self, cfg: SafetyConfig, counts: Counter[str] | None = None) -> None:
        check_limits(cfg)
        self.cfg = cfg
        self.low = np.asarray(cfg.workspace_low, np.float64)
        self.high = np.asarray(cfg.workspace_high, np.float64)
        self.counts: Counter[str] = Counter() if counts is None else counts
        self.target: np.ndarray | None = None  # (3,) tracked end-effector target, metres

    def intervene(self, kind: str, message: str, level: int = logging.INFO) -> None:
        """Count one intervention of `kind` and log it."""
        self.counts[kind] += 1
        log.log(level, "safety [%s]: %s", kind, message)

    def start(self, state: np.ndarray) -> None:
        """Track the target from the measured pose (the service does the same at reset)."""
        self.target = np.asarray(state, np.float64)[:3].copy()

    def commit(self, action: np.ndarray) -> None:
        """The service accepted `action`: advance the tracked target as the service does (xyz clipped)."""
        self.target = np.clip(self.target + np.asarray(action, np.float64)[:3], self.low, self.high)

    def filter(self, action: np.ndarray, state: np.ndarray) -> np.ndarray:
        """(7,) canonical action -> (7,) float32 action safe to send; raises `UnsafeActionError`."""
        if self.target is None:
            raise RuntimeError("SafetyLayer.start(state) must be called at the start of an episode")
        action = self._check_finite(action)
        out = action.astype(np.float64)
        out[6] = self._gripper(out[6])
        out[:3] = self._translation(out[:3])
        out[3:6] = self._rotation(out[3:6], float(np.asarray(state)[5]))
        return out.astype(np.float32)

    def _check_finite(self, action: Any) -> np.ndarray:
        action = np.asarray(action)
        if action.shape != (7,):
            self.intervene("bad_shape", f"refused an action of shape {action.shape}", logging.ERROR)
            raise UnsafeActionError(f"The policy returned an action of shape {action.shape}, expected (7,).")
        if not np.isfinite(action).all():
            self.intervene("nonfinite_action", f"refused {action}", logging.ERROR)
            raise UnsafeActionError(f"The policy returned a NaN or infinite action {action}; nothing was sent.")
        return action

    def _gripper(self, value: float) -> float:
        tol = self.cfg.gripper_tolerance
        if not -tol <= value <= 1 + tol:
            self.intervene("gripper_out_of_range", f"refused gripper {value:.3f}", logging.ERROR)
            raise UnsafeActionError(
                f"The policy's gripper value {value:.3f} is outside [0, 1] (canonical: 1 = open). Does it use "
                "another convention (e.g. -1/+1)? Convert at the policy's edge."
            )
        clipped = min(max(value, 0.0), 1.0)
        if clipped != value:
            self.intervene("gripper_clip", f"gripper {value:.3f} -> {clipped:.3f}")
        return clipped

    def _translation(self, delta: np.ndarray) -> np.ndarray:
        inside = np.clip(self.target + delta, self.low, self.high) - self.target
        if not np.array_equal(inside, delta):
            self.intervene("workspace_clamp", f"target {np.round(self.target + delta, 4)} outside the workspace; "
                           f"delta {np.round(delta, 4)} -> {np.round(inside, 4)}")  # fmt: skip
        limit = self.cfg.max_translation
        limited = np.clip(inside, -limit, limit)
        if not np.array_equal(limited, inside):
            self.intervene("translation_limit", f"delta {np.round(inside, 4)} m -> {np.round(limited, 4)}")
        return limited

    def _rotation(self, delta: np.ndarray, yaw: float) -> np.ndarray:
        limit = self.cfg.max_rotation
        limited = np.clip(delta, -limit, limit)
        if not np.array_equal(limited, delta):
            self.intervene("rotation_limit", f"delta {np.round(delta, 4)} rad -> {np.round(limited, 4)}")
        lo, hi = self.cfg.yaw_range
        if lo <= yaw <= hi:
            allowed = float(np.clip(yaw + limited[2], lo, hi) - yaw)
        else:  # outside the range (e.g. a start pose): only rotations back towards it
            allowed = max(limited[2], 0.0) if yaw < lo else min(limited[2], 0.0)
        if allowed != limited[2]:
            self.intervene("yaw_clamp", f"yaw {yaw:.3f} + {limited[2]:.3f} leaves {self.cfg.yaw_range}: {allowed:.3f}")
            limited[2] = allowed
        return limited


class Watchdog:
    """Decides when the loop must stop sending; each finding is counted in `counts`."""

    def __init__(self, cfg: SafetyConfig, counts: Counter[str]) -> None:
        self.cfg, self.counts = cfg, counts
        self._previous: tuple[bytes, bytes] | None = None
        self._identical = 0

    def reset(self) -> None:
        self._previous, self._identical = None, 0

    def observation_problem(self, images: np.ndarray, state: np.ndarray) -> str | None:
        """A reason to stop if the observation is frozen (identical to the previous ones), else None."""
        if self.cfg.max_identical_obs <= 0:
            return None
        current = (np.ascontiguousarray(images).tobytes(), np.ascontiguousarray(state).tobytes())
        self._identical = self._identical + 1 if current == self._previous else 0
        self._previous = current
        if self._identical > self.cfg.max_identical_obs:
            self.counts["frozen_observation"] += 1
            return (f"the last {self._identical + 1} observations are bit-identical (stuck camera or service "
                    "replaying a frame)")  # fmt: skip
        return None

    def timing_problem(self, obs_stamp: float, policy_s: float, now: float) -> str | None:
        """A reason to stop if the policy was late or the observation is stale at `now`, else None."""
        if policy_s > self.cfg.max_policy_s:
            self.counts["late_policy"] += 1
            return f"the policy took {policy_s * 1e3:.0f} ms (limit robot.safety.max_policy_s={self.cfg.max_policy_s})"
        age = now - obs_stamp
        if age > self.cfg.max_obs_age_s:
            self.counts["stale_observation"] += 1
            limit = self.cfg.max_obs_age_s
            return f"the observation is {age * 1e3:.0f} ms old (limit robot.safety.max_obs_age_s={limit})"
        return None


class Pacer:
    """Ticks at `hz`: `wait()` sleeps until the next tick and returns its time (monotonic seconds).

    A tick that is late by more than 5% of the period is counted as an overrun and the schedule
    restarts from now (the loop never sends faster than `hz` to catch up).
    """

    def __init__(
        self, hz: float, counts: Counter[str] | None = None,
        clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
    ) -> None:  # fmt: skip
        self.period = 1.0 / hz
        self.counts: Counter[str] = Counter() if counts is None else counts
        self._clock, self._sleep = clock, sleep
        self._next: float | None = None
        self.ticks: list[float] = []

    def wait(self) -> float:
        now = self._clock()
        if self._next is None:
            self._next = now
        elif now < self._next:
            if self._next - now > 0.002:
                self._sleep(self._next - now - 0.001)
            while (now := self._clock()) < self._next:  # spin the last millisecond for a steady period
                pass
        elif now - self._next > 0.05 * self.period:
            self.counts["overrun"] += 1
            log.info("pacing: step started %.0f ms late", (now - self._next) * 1e3)
            self._next = now
        self._next += self.period
        self.ticks.append(now)
        return now

    def periods(self) -> np.ndarray:
        """(n - 1,) seconds between consecutive ticks."""
        return np.diff(np.asarray(self.ticks, np.float64))
