"""One robosuite task behind robosteer's canonical interface: the sim edge.

Everything robosuite-specific is converted here, once:

* actions: the canonical (7,) `[dx, dy, dz, droll, dpitch, dyaw, gripper]` (metres and radians per
  step in the robot base frame, gripper 1 = open) -> Panda OSC_POSE input in [-1, 1]: translation /
  0.05 m, rotation (extrinsic xyz Euler delta -> axis-angle) / 0.5 rad, gripper 1 - 2 * g (robosuite
  -1 = open, +1 = close). The limits are read from the installed controller config.
* images: robosuite renders with OpenGL's bottom-left origin; we flip them to top-left.
* state: (7,) `[x, y, z, roll, pitch, yaw, gripper]`: the end-effector position in the robot base
  frame, its orientation relative to "gripper pointing down" (so a neutral pose is ~0 and never
  wraps at +-pi) as extrinsic xyz Euler angles, and the finger opening in [0, 1] (1 = open).
* privileged object poses (for scripted experts) in the same base frame.

Importing this module does not import robosuite; `SimEnv` does, in the worker processes.
"""

from __future__ import annotations

import copy
import logging
import sys
from typing import Any, Protocol

import numpy as np
from scipy.spatial.transform import Rotation

from configs.errors import UserError
from sim.config import SimConfig
from sim.tasks import TASKS, Task

log = logging.getLogger(__name__)

Observation = dict[str, Any]
#: The render context SimEnv.render last made current in this process (None: unknown).
_current_gl: list[Any] = [None]
#: The end-effector orientation whose state rotation is zero: the Panda gripper pointing down.
NEUTRAL = Rotation.from_euler("x", np.pi)
#: Panda finger opening (m) that maps to a state gripper of 1.
GRIPPER_OPEN_WIDTH = 0.08
WRIST_CAMERA = "robot0_eye_in_hand"


class Env(Protocol):
    """What a rollout worker needs from an environment (SimEnv, or a fake in tests)."""

    def reset(self, seed: int) -> Observation: ...

    def step(self, action: np.ndarray) -> tuple[Observation, float, bool, dict[str, Any]]: ...

    def close(self) -> None: ...


def canonical_to_osc(action: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """Canonical action (7,) -> robosuite OSC_POSE + gripper input (7,) in [-1, 1].

    `limits` (6,) are the controller's output_max: metres / radians per step at input 1.
    """
    action = np.asarray(action, dtype=np.float64)
    rotvec = Rotation.from_euler("xyz", action[3:6]).as_rotvec()  # OSC takes axis-angle deltas
    arm = np.concatenate([action[:3], rotvec]) / limits
    gripper = 1.0 - 2.0 * action[6]
    return np.clip(np.append(arm, gripper), -1.0, 1.0)


def eef_state(
    pos: np.ndarray, quat: np.ndarray, finger_qpos: np.ndarray, base_pos: np.ndarray, base_rot: Rotation
) -> np.ndarray:
    """Canonical (7,) float32 state from world-frame end-effector pose (xyzw quat) and finger joints."""
    local = base_rot.inv().apply(pos - base_pos)
    rot = base_rot.inv() * Rotation.from_quat(quat) * NEUTRAL.inv()
    width = float(finger_qpos[0] - finger_qpos[1])  # Panda fingers move symmetrically, right one < 0
    gripper = np.clip(width / GRIPPER_OPEN_WIDTH, 0.0, 1.0)
    return np.concatenate([local, rot.as_euler("xyz"), [gripper]]).astype(np.float32)


def yaw_of(quat: np.ndarray, base_rot: Rotation) -> float:
    """Yaw (rad) of an xyzw orientation in the base frame: the heading of its x axis (no gimbal lock)."""
    x_axis = (base_rot.inv() * Rotation.from_quat(quat)).as_matrix()[:, 0]
    return float(np.arctan2(x_axis[1], x_axis[0]))


class SimEnv:
    """A robosuite task with canonical actions and observations.

    `reset(seed)` -> observation; `step(action (7,))` -> (observation, reward, done, info) with
    info {"success": bool, "step": int}. Observation: `image_primary` uint8 (S, S, 3) top-left
    origin (if rendering), `image_wrist` (if `cfg.wrist`), `state` (7,) float32, `instruction` str,
    `privileged` {"task", "seed", object poses in the base frame}. Reward is robosuite's shaped
    task reward (<= 1 per step); done is success (if terminate_on_success) or the horizon.
    """

    def __init__(self, task: Task | str, cfg: SimConfig) -> None:
        self.task = TASKS.get(task) if isinstance(task, str) else task
        self.cfg = cfg
        self.camera = cfg.camera or self.task.camera
        self.horizon = cfg.horizon or self.task.horizon(cfg.control_freq)
        self._env = _make_robosuite(self.task, cfg)
        _current_gl[0] = None  # building an environment makes its own GL context current
        self.limits = _osc_limits(self._env)
        base = self._env.sim.model.body_name2id(self._env.robots[0].robot_model.root_body)
        self._base_pos = np.array(self._env.sim.data.body_xpos[base])
        wxyz = self._env.sim.data.body_xquat[base]
        self._base_rot = Rotation.from_quat([*wxyz[1:], wxyz[0]])
        if cfg.render and cfg.fast_render:
            _fast_rendering(self._env, cfg.image_size)
        self.instruction, self.seed, self.t = "", -1, 0

    def reset(self, seed: int) -> Observation:
        # robosuite samples placements and joint noise from env.rng; its samplers hold a reference
        # to that Generator, so we reseed it in place.
        self._env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        self._raw = self._env.reset()
        rng = np.random.default_rng([seed, 1])
        self.instruction = str(rng.choice(self.task.instructions))
        self.seed, self.t = seed, 0
        return self._observation()

    def step(self, action: np.ndarray) -> tuple[Observation, float, bool, dict[str, Any]]:
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (7,) or not np.isfinite(action).all():
            raise ValueError(f"expected a finite canonical action of shape (7,), got {action.shape}: {action}")
        self._raw, reward, _, _ = self._env.step(canonical_to_osc(action, self.limits))
        self.t += 1
        success = bool(self._env._check_success())
        done = (success and self.cfg.terminate_on_success) or self.t >= self.horizon
        return self._observation(), float(reward), done, {"success": success, "step": self.t}

    def snapshot(self) -> dict[str, Any]:
        """The episode's state now, for `restore`: branching rollouts from one state (benchmarks/steer_oracle.py).

        Besides MuJoCo's integration state (positions, velocities, controls, warm start, time) it
        holds what robosuite keeps outside it: the gripper's ramped command, the controllers' goals
        and gains, the observables' sampling clocks.
        """
        import mujoco

        env = self._env
        model, data = env.sim.model._model, env.sim.data._data
        physics = np.empty(mujoco.mj_stateSize(model, mujoco.mjtState.mjSTATE_INTEGRATION))
        mujoco.mj_getState(model, data, physics, mujoco.mjtState.mjSTATE_INTEGRATION)
        return {
            "physics": physics,
            "episode": (self.instruction, self.seed, self.t, env.timestep, env.cur_time),
            "grippers": [{arm: g.current_action.copy() for arm, g in r.gripper.items()} for r in env.robots],
            "controllers": [{n: _plain_attributes(c) for n, c in r.part_controllers.items()} for r in env.robots],
            "observables": {n: _plain_attributes(o, _OBSERVABLE_CLOCK) for n, o in env._observables.items()},
        }

    def restore(self, snapshot: dict[str, Any]) -> Observation:
        """Continue from a `snapshot` of this task (from this or another SimEnv of it); the observation.

        Every restore of one snapshot continues identically, in any environment of the task. The
        observation is recomputed from the restored state: it can differ from the one the snapshot's
        step returned in the 4th decimal, because robosuite's lite physics leaves derived quantities
        one substep behind the state.
        """
        import mujoco

        if self.seed < 0:  # robosuite's first reset also sets what is drawn (sites off): do it once
            self.reset(int(snapshot["episode"][1]))
        env = self._env
        model, data = env.sim.model._model, env.sim.data._data
        mujoco.mj_setState(model, data, snapshot["physics"], mujoco.mjtState.mjSTATE_INTEGRATION)
        mujoco.mj_forward(model, data)
        self.instruction, self.seed, self.t, env.timestep, env.cur_time = snapshot["episode"]
        for robot, grippers, controllers in zip(env.robots, snapshot["grippers"], snapshot["controllers"], strict=True):
            for arm, action in grippers.items():
                robot.gripper[arm].current_action = action.copy()
            for name, attributes in controllers.items():
                _set_attributes(robot.part_controllers[name], attributes)
        self._raw = env._get_observations(force_update=True)
        for name, clock in snapshot["observables"].items():  # after the forced sample, which resets them
            _set_attributes(env._observables[name], clock)
        return self._observation()

    def render(self, camera: str) -> np.ndarray:
        """(S, S, 3) uint8 image of `camera`, top-left origin."""
        size = self.cfg.image_size
        # robosuite renders into whichever GL context is current: the last one created. A worker
        # holds one environment per task, so make ours current (else other tasks' images are black),
        # but only when another one is: making a context current is a driver call that may flush
        # or synchronise (NVIDIA's EGL), and most workers render one environment all the time.
        context = self._env.sim._render_context_offscreen
        if _current_gl[0] is not context:
            context.gl_ctx.make_current()
            _current_gl[0] = context
        image = self._env.sim.render(camera_name=camera, width=size, height=size)
        return np.ascontiguousarray(image[::-1])  # OpenGL rows start at the bottom

    def close(self) -> None:
        _current_gl[0] = None
        self._env.close()

    def _observation(self) -> Observation:
        raw = self._raw
        state = eef_state(
            raw["robot0_eef_pos"], raw["robot0_eef_quat"], raw["robot0_gripper_qpos"], self._base_pos, self._base_rot
        )
        obs: Observation = {
            "state": state,
            "instruction": self.instruction,
            "privileged": {"task": self.task.name, "seed": self.seed, **self._privileged()},
        }
        if self.cfg.render:
            obs["image_primary"] = self.render(self.camera)
            if self.cfg.wrist:
                obs["image_wrist"] = self.render(WRIST_CAMERA)
        return obs

    def _privileged(self) -> dict[str, np.ndarray]:
        """The task's object poses in the base frame: positions (3,) or (N, 3), quaternions -> yaw."""
        out: dict[str, np.ndarray] = {}
        for key, value in self.task.privileged(self._env).items():
            if key.endswith("_pos") or key.endswith("_positions"):
                out[key] = self._base_rot.inv().apply(value - self._base_pos).astype(np.float32)
            elif key.endswith("_quat"):
                out[key.removesuffix("_quat") + "_yaw"] = np.float32(yaw_of(value, self._base_rot))
            else:
                out[key] = np.asarray(value, dtype=np.float32)
        return out


#: An observable's sampling clock: when it samples next (robosuite samples inside the substeps).
_OBSERVABLE_CLOCK = ("_time_since_last_sample", "_current_delay", "_sampled")
_PLAIN = (np.ndarray, np.generic, float, int, bool, type(None))


def _plain_attributes(obj: Any, names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Copies of an object's array and number attributes (all, or `names`)."""
    return {
        k: copy.deepcopy(v) for k, v in vars(obj).items() if isinstance(v, _PLAIN) and (names is None or k in names)
    }


def _set_attributes(obj: Any, attributes: dict[str, Any]) -> None:
    for name, value in attributes.items():
        setattr(obj, name, copy.deepcopy(value))


def make_sim_env(cfg: SimConfig, task: str) -> SimEnv:
    """The runner's environment factory: `functools.partial(make_sim_env, cfg)` is picklable."""
    return SimEnv(task, cfg)


def quiet_robosuite() -> None:
    """Drop robosuite's INFO/WARNING console lines (missing private macros, optional robots, ...)."""
    logger = logging.getLogger("robosuite_logs")  # robosuite configures this logger on import
    if not any(isinstance(f, _BelowError) for f in logger.filters):
        logger.addFilter(_BelowError())


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def _make_robosuite(task: Task, cfg: SimConfig) -> Any:
    if cfg.render and "tensorflow" in sys.modules:
        # MuJoCo's OpenGL context creation segfaults in a process that has imported TensorFlow
        raise UserError(
            "TensorFlow is imported in this process, and MuJoCo rendering crashes beside it. Keep "
            "TensorFlow out of rendering processes (robosteer writes RLDS in a separate process), or "
            "build the environment with sim.render=false."
        )
    quiet_robosuite()
    import robosuite
    from robosuite.controllers import load_composite_controller_config

    controller = load_composite_controller_config(controller=None, robot="Panda")
    try:
        return robosuite.make(
            task.env_name,
            robots="Panda",
            controller_configs=controller,
            has_renderer=False,
            has_offscreen_renderer=cfg.render,
            use_camera_obs=False,  # we render ourselves, flipped, only the cameras we need
            control_freq=cfg.control_freq,
            horizon=10**6,  # episodes end here (SimEnv.step), never inside robosuite
            ignore_done=True,
            hard_reset=False,  # keep the model and renderer across episodes (resets in ms)
            reward_shaping=True,
            # robosuite draws some model parameters once, when it builds the model (Lift's cube size),
            # from env.rng: a fixed seed builds the same model in every process. Episodes are seeded
            # in reset.
            seed=0,
            **task.env_kwargs,
        )
    except Exception as err:
        if "EGL" in str(err) or "OpenGL" in str(err) or "display" in str(err).lower():
            raise UserError(
                f"robosuite could not start offscreen rendering ({err}). Set MUJOCO_GL=egl (Mesa's "
                "libegl-mesa0 without a GPU) or MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa."
            ) from err
        raise


def _osc_limits(env: Any) -> np.ndarray:
    """(6,) metres / radians per step at OSC input 1, checked against what `canonical_to_osc` assumes."""
    arm = env.robots[0].part_controllers["right"]
    if arm.input_type != "delta" or arm.input_ref_frame != "base":
        raise RuntimeError(
            f"robosuite's Panda arm controller takes {arm.input_type!r} input in the {arm.input_ref_frame!r} "
            "frame; sim/env.py converts canonical actions for 'delta' input in the 'base' frame"
        )
    if not np.allclose(np.asarray(arm.input_max), 1.0) or not np.allclose(np.asarray(arm.input_min), -1.0):
        raise RuntimeError(f"unexpected OSC input range [{arm.input_min}, {arm.input_max}]; expected [-1, 1]")
    return np.asarray(arm.output_max, dtype=np.float64)


def _fast_rendering(env: Any, size: int) -> None:
    """No multisampling, no reflections, an offscreen buffer of the image size (Mesa CPU: ~3x faster)."""
    import mujoco

    context = env.sim._render_context_offscreen
    env.sim.model._model.vis.quality.offsamples = 0
    context.update_offscreen_size(size, size)  # rebuilds the MjrContext with the new settings
    context.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
