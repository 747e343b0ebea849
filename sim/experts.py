"""Scripted experts with configurable failure modes, as the Policy `scripted`.

Each task has a plan: a list of phases, each a target end-effector position (recomputed from the
true object poses in `obs["privileged"]` while the object has not been grasped), a gripper
command and a completion test. A proportional controller turns the target into canonical actions:

    translation = clip(target - position, +-MAX_STEP)      rotation = -K_ROT * (roll, pitch, yaw - yaw*)

Corruption (CorruptionConfig) is drawn once per episode from the episode's seed, so a dataset is
reproducible: action noise on every step; hesitation (pauses in which the arm drifts); a wrong
target (the other cube, another bin, or a grasp point centimetres off the object); an early release
(the gripper opens while carrying, away from the goal). Each failure mode is a plausible mistake, so
failed episodes look like near-misses, as in the COG data that Q-SFT learns from. A wrong target and
an early release make an episode fail (nearly always); hesitation and noise make successes slower and
less smooth, and fail an episode only now and then. The measured rates are in docs/sim.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from configs.errors import UserError
from configs.registry import Registry
from policies.base import POLICIES, Observation, Policy
from sim.config import CorruptionConfig

MAX_STEP = 0.03  # metres commanded per step (OSC achieves ~70% of it within a 5 Hz step)
K_ROT = 0.8  # proportional gain on the orientation error (per step)
MAX_ROT = 0.3  # radians commanded per step (rotation angle)
ABOVE = 0.10  # approach height above a grasp or place point (m)
OPEN, CLOSED = 1.0, 0.0


@dataclass
class Phase:
    """Move to `target(priv, start)` with the gripper at `gripper`; done `hold` steps after reaching it.

    `start` is the end-effector position (3,) when the phase began.
    """

    name: str
    target: Callable[[dict[str, Any], np.ndarray], np.ndarray]  # -> (3,) base-frame position
    gripper: float
    tol: float = 0.015
    hold: int = 0  # steps to stay once the target is reached (e.g. while the fingers close)
    timeout: int = 30  # give up and go on after this many steps
    carrying: bool = False  # the object is in hand or being grasped (an early release may happen here)
    track: bool = True  # recompute the target every step; False freezes it on the phase's first step
    settle: bool = False  # also wait until the fingers stop moving (grasp, release)


@dataclass
class Plan:
    """The phases of one episode, the gripper yaw to hold, and typical durations.

    `release_window`: an early release happens after 0..release_window-1 carrying steps. It is the
    part of a clean episode's carrying steps in which a release loses the object away from its goal
    (measured, docs/sim.md): a release later on, when the object is nearly over its goal, would still
    succeed, because the fingers open slowly and the object falls onto the goal.
    """

    phases: list[Phase]
    yaw: float  # gripper yaw (rad, base frame) for the grasp
    steps: int  # typical length of a clean episode (hesitations fall in it)
    release_window: int  # carrying steps in which an early release happens (see above)


@dataclass
class Corruption:
    """One episode's draws from CorruptionConfig."""

    noise: float = 0.0
    pauses: dict[int, int] = field(default_factory=dict)  # step -> pause length
    hesitate: bool = False
    wrong_target: bool = False
    release: bool = False
    release_after: int = 0  # carrying steps before an early release

    @classmethod
    def draw(cls, cfg: CorruptionConfig, rng: np.random.Generator) -> Corruption:
        """The episode's failure modes; pause times and the release step are fixed by `schedule`."""
        p = {name: min(1.0, getattr(cfg, name) * cfg.scale) for name in ("hesitation", "wrong_target", "early_release")}
        draws = rng.random(3)
        return cls(
            noise=cfg.action_noise * cfg.scale,
            hesitate=bool(draws[0] < p["hesitation"]),
            wrong_target=bool(draws[1] < p["wrong_target"]),
            release=bool(draws[2] < p["early_release"]),
        )

    def schedule(self, plan: Plan, rng: np.random.Generator) -> None:
        """Place the pauses in the plan's typical duration and the release in its release window."""
        if self.hesitate:
            for _ in range(rng.integers(1, 4)):
                self.pauses[int(rng.integers(1, plan.steps))] = int(rng.integers(3, 13))
        self.release_after = int(rng.integers(0, max(plan.release_window, 1)))


# A plan builder: (privileged obs of the first step, episode rng, wrong_target) -> Plan.
PlanBuilder = Callable[[dict[str, Any], np.random.Generator, bool], Plan]
PLANS: Registry[PlanBuilder] = Registry("expert plan")


def grasp_yaw(object_yaw: float, avoid: np.ndarray | None = None) -> float:
    """Gripper yaw (rad) for a box-like object at `object_yaw`.

    Both grasps (fingers across the object's x or y faces) work; without `avoid` the one nearest to
    the neutral yaw is taken (yaw folded into [-pi/4, pi/4)). With `avoid` (2,), a horizontal
    direction in which something is close (a bin wall, the other cube), the grasp whose finger axis
    (-sin yaw, cos yaw), the long side of the hand, points most across it is taken.
    """
    first = float((object_yaw + np.pi / 4) % (np.pi / 2) - np.pi / 4)
    if avoid is None:
        return first
    second = first + np.pi / 2 if first < 0 else first - np.pi / 2
    return min((first, second), key=lambda yaw: abs(avoid[1] * np.cos(yaw) - avoid[0] * np.sin(yaw)))


def _offset(rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """A random horizontal offset (3,) of length in [low, high)."""
    angle, radius = rng.uniform(0, 2 * np.pi), rng.uniform(low, high)
    return np.array([radius * np.cos(angle), radius * np.sin(angle), 0.0])


def _pick(key: str, grasp_offset: np.ndarray) -> list[Phase]:
    """Approach, descend to and grasp the object at priv[key] (+ grasp_offset), tracking it."""

    def at(priv: dict[str, Any], start: np.ndarray) -> np.ndarray:
        return priv[key] + grasp_offset

    return [
        Phase("approach", lambda p, s: at(p, s) + np.array([0, 0, ABOVE]), OPEN, tol=0.02, timeout=25),
        Phase("descend", at, OPEN, tol=0.01, timeout=15),
        Phase("grasp", at, CLOSED, tol=1.0, hold=1, timeout=12, carrying=True, track=False, settle=True),
    ]


def _place(goal: Callable[[dict[str, Any]], np.ndarray], carry_height: float, release_height: float) -> list[Phase]:
    """Lift the grasped object to `carry_height`, carry it over `goal(priv)` (3,), lower, let go, retreat.

    The goal is tracked while carrying and lowering (the other cube may have been nudged), then frozen.
    """

    def over(z: float) -> Callable[[dict[str, Any], np.ndarray], np.ndarray]:
        return lambda priv, start: np.array([*goal(priv)[:2], z])

    return [
        Phase("lift", lambda p, s: np.array([s[0], s[1], carry_height]), CLOSED, 0.02, 0, 20, True, False),
        Phase("carry", over(carry_height), CLOSED, 0.02, 0, 40, True),
        Phase("lower", over(release_height), CLOSED, 0.015, 0, 15, True),
        Phase("release", over(release_height), OPEN, 1.0, 1, 10, False, False, settle=True),
        Phase("retreat", over(release_height + 0.12), OPEN, 0.02, 0, 1000, False, False),
    ]


@PLANS.register("lift")
def _lift_plan(priv: dict[str, Any], rng: np.random.Generator, wrong: bool) -> Plan:
    offset = _offset(rng, 0.035, 0.06) if wrong else np.zeros(3)
    top = float(priv["object_pos"][2]) + 0.15
    raise_up = Phase("raise", lambda p, s: np.array([s[0], s[1], top]), CLOSED, 0.01, 0, 1000, True, False)
    # Lift succeeds once the cube is 2 cm up, within the first raise step: a release must come while
    # the fingers close (~7 steps).
    return Plan([*_pick("object_pos", offset), raise_up], grasp_yaw(priv["object_yaw"]), steps=20, release_window=6)


@PLANS.register("stack")
def _stack_plan(priv: dict[str, Any], rng: np.random.Generator, wrong: bool) -> Plan:
    obj, target, miss = "object", "target", np.zeros(3)
    if wrong and rng.random() < 0.5:
        obj, target = target, obj  # picks the green cube to put it on the red one
    elif wrong:
        miss = _offset(rng, 0.06, 0.10)  # puts the red cube down next to the green one
    top = float(priv[f"{target}_pos"][2] + priv[f"{target}_size"][2] + priv[f"{obj}_size"][2])
    phases = [
        *_pick(f"{obj}_pos", np.zeros(3)),
        *_place(lambda p: p[f"{target}_pos"] + miss, carry_height=top + 0.08, release_height=top + 0.012),
    ]
    other = (priv[f"{target}_pos"] - priv[f"{obj}_pos"])[:2]  # keep the fingers off the other cube
    # Grasp ~8 steps, then lift 6, carry 4, lower 3; the fingers open slowly, so a cube released
    # after the first lift steps is still carried over the target and falls onto it.
    return Plan(phases, grasp_yaw(priv[f"{obj}_yaw"], other), steps=35, release_window=10)


@PLANS.register("pick_place_can")
@PLANS.register("pick_place_bread")
def _pick_place_plan(priv: dict[str, Any], rng: np.random.Generator, wrong: bool) -> Plan:
    goal = priv["target_pos"]
    if wrong:  # another bin
        others = [b for b in priv["bin_positions"] if np.linalg.norm(b[:2] - goal[:2]) > 1e-3]
        goal = others[rng.integers(len(others))]
    # The far bins are at the edge of the Panda's reach: aim 6 cm from the bin centre towards the robot.
    goal = goal - np.array([*goal[:2], 0]) / np.linalg.norm(goal[:2]) * 0.06
    floor, centre_height = float(goal[2]), -float(priv["object_bottom"][0])
    phases = [
        *_pick("object_pos", np.zeros(3)),
        *_place(lambda p: goal, carry_height=floor + 0.2, release_height=floor + centre_height + 0.06),
    ]
    # keep the hand's long side off the nearest wall of the bin the object starts in
    offset = (priv["object_pos"][:2] - priv["source_bin_pos"][:2]) / priv["source_bin_half"]
    wall = np.array([0.0, 1.0]) if abs(offset[1]) > abs(offset[0]) else np.array([1.0, 0.0])
    # Grasp 6-8 steps, then lift 6 and carry 13-34; a release late in the carry still lands in the bin.
    return Plan(phases, grasp_yaw(priv["object_yaw"], wall), steps=45, release_window=20)


class Script:
    """One episode of one task: its plan, corruption and the proportional controller."""

    def __init__(self, plan: Plan, corruption: Corruption, rng: np.random.Generator) -> None:
        self.plan, self.corruption, self.rng = plan, corruption, rng
        self.phase, self.steps_in_phase, self.held, self.t = 0, 0, 0, 0
        self.carried, self.released, self.pause_left = 0, False, 0
        self.start, self.frozen = np.zeros(3), None
        self.last_gripper, self.fingers = OPEN, None

    def act(self, state: np.ndarray, priv: dict[str, Any]) -> np.ndarray:
        """(7,) canonical action for this step."""
        self.t += 1
        if self.pause_left == 0 and self.t in self.corruption.pauses:
            self.pause_left = self.corruption.pauses[self.t]
        if self.pause_left > 0:  # hesitation: drift a little, keep the gripper as it is
            self.pause_left -= 1
            drift = self.rng.normal(0, 0.006, 3)
            return np.array([*drift, 0, 0, 0, self.last_gripper], dtype=np.float32)
        phase, target = self._advance(state, priv)
        self.fingers = float(state[6])
        move = np.clip(target - state[:3], -MAX_STEP, MAX_STEP)
        rot = rotation_step(state[3:6], self.plan.yaw)
        if phase.carrying:
            self.carried += 1
            self.released |= self.corruption.release and self.carried > self.corruption.release_after
        gripper = OPEN if self.released else phase.gripper
        self.last_gripper = gripper
        noise = self.rng.normal(0, self.corruption.noise, 6) * [1, 1, 1, 5, 5, 5]
        return np.concatenate([move + noise[:3], rot + noise[3:], [gripper]]).astype(np.float32)

    def _advance(self, state: np.ndarray, priv: dict[str, Any]) -> tuple[Phase, np.ndarray]:
        """The current phase and its target, after moving on from finished phases."""
        while True:
            phase = self.plan.phases[self.phase]
            if self.steps_in_phase == 0 and self.held == 0:
                self.start = state[:3].copy()
                self.frozen = None if phase.track else np.asarray(phase.target(priv, self.start), np.float64)
            target = self.frozen if self.frozen is not None else phase.target(priv, self.start)
            reached = np.linalg.norm(target - state[:3]) < phase.tol
            if phase.settle:  # the fingers moved less than 2 mm since the last step
                reached &= self.fingers is not None and abs(state[6] - self.fingers) < 0.025
            self.held = self.held + 1 if reached else 0
            last = self.phase == len(self.plan.phases) - 1
            if last or not (self.held > phase.hold or self.steps_in_phase >= phase.timeout):
                self.steps_in_phase += 1
                return phase, target
            self.phase, self.steps_in_phase, self.held = self.phase + 1, 0, 0


def rotation_step(rpy: np.ndarray, yaw: float) -> np.ndarray:
    """Canonical rotation delta (3,) that turns the state orientation `rpy` towards "down, at `yaw`".

    Canonical rotation deltas act in the base frame (new = R(delta) * current, see sim/env.py), so the
    error is the base-frame rotation from the current to the desired orientation, scaled by K_ROT.
    """
    error = (Rotation.from_euler("z", yaw) * Rotation.from_euler("xyz", rpy).inv()).as_rotvec()
    angle = np.linalg.norm(error)
    step = error * min(K_ROT, MAX_ROT / angle) if angle > 0 else error
    return Rotation.from_rotvec(step).as_euler("xyz")


def draw_corruption(
    cfg: CorruptionConfig, episode_seed: int, policy_seed: int = 0
) -> tuple[Corruption, np.random.Generator]:
    """An episode's failure modes (before `schedule`) and the episode rng that drew them.

    Deterministic in (episode seed, policy seed): benchmarks/expert_rates.py uses it to tell which
    failure modes an evaluated episode had.
    """
    rng = np.random.default_rng([episode_seed, policy_seed, 7])
    return Corruption.draw(cfg, rng), rng


class ScriptedPolicy(Policy):
    """The per-task scripted experts as a batched Policy (needs `obs["privileged"]`).

    `act` advances the slot's script by one step. `sample_actions(obs, k)` advances it once too:
    candidate 0 is the expert's action, candidates 1..k-1 add `candidate_noise` to its arm part.
    """

    def __init__(self, corruption: CorruptionConfig, seed: int = 0, candidate_noise: float = 0.01) -> None:
        super().__init__()
        self.corruption, self.seed, self.candidate_noise = corruption, seed, candidate_noise
        self.scripts: dict[int, Script] = {}

    def reset(self, instruction: str, slot: int = 0, seed: int | None = None) -> None:
        super().reset(instruction, slot, seed)
        self.scripts.pop(slot, None)

    def sample_actions(self, obs: Observation, k: int, slot: int = 0) -> np.ndarray:
        priv = obs.get("privileged")
        if priv is None:
            raise UserError("policy=scripted needs `privileged` simulator state in its observations (sim only).")
        script = self.scripts.get(slot) or self._start(priv, slot)
        action = script.act(obs["state"], priv)
        candidates = np.repeat(action[None, None], k, axis=0)  # (k, 1, 7)
        if k > 1:
            rng = script.rng
            candidates[1:, 0, :6] += rng.normal(0, self.candidate_noise, (k - 1, 6)) * [1, 1, 1, 5, 5, 5]
        return candidates.astype(np.float32)

    def _start(self, priv: dict[str, Any], slot: int) -> Script:
        corruption, rng = draw_corruption(self.corruption, int(priv["seed"]), self.seed)
        plan = PLANS.get(str(priv["task"]))(dict(priv), rng, corruption.wrong_target)
        corruption.schedule(plan, rng)
        script = self.scripts[slot] = Script(plan, corruption, rng)
        return script


@POLICIES.register("scripted")
def _scripted(cfg: Any) -> Policy:
    return ScriptedPolicy(cfg.corruption, cfg.seed, cfg.candidate_noise)
