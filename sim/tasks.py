"""The language-conditioned sim tasks: one registry entry per task.

A `Task` names the robosuite environment, the instruction phrasings, the horizon (in seconds, so it
does not depend on the control frequency), the camera, and how to read the true object poses that
scripted experts use (`privileged`). Adding a task = one `TASKS` entry here + one yaml under
`configs/sim/` (+ its expert script in sim/experts.py, if it should be collectable).

`privileged(env)` returns world-frame quantities of the raw robosuite environment: keys ending in
`_pos` are (3,) positions, keys ending in `_quat` are (4,) xyzw quaternions, `(N, 3)` arrays ending
in `_positions` are several positions; `sim.env.SimEnv` converts them to the robot base frame.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from configs.errors import UserError
from configs.registry import Registry

SUITE = "suite"


@dataclass(frozen=True)
class Task:
    """One language-conditioned robosuite task on the Panda arm."""

    name: str
    env_name: str  # robosuite environment (suite.make)
    instructions: tuple[str, ...]  # phrasings; each episode draws one from its seed
    horizon_s: float  # episode time limit in seconds (steps = horizon_s * control_freq)
    privileged: Callable[[Any], dict[str, np.ndarray]]  # raw env -> world-frame object poses
    camera: str = "agentview"  # primary camera
    env_kwargs: dict[str, Any] = field(default_factory=dict)  # extra suite.make arguments

    def horizon(self, control_freq: float) -> int:
        return round(self.horizon_s * control_freq)


TASKS: Registry[Task] = Registry("sim task")


def register_task(task: Task) -> Task:
    return TASKS.register(task.name)(task)


def task_names(selection: str) -> list[str]:
    """The tasks of `selection`: one task name, several joined by "+" (`lift+stack`, in that order), or
    "suite" for every registered task (sorted)."""
    if selection == SUITE:
        return TASKS.names()
    names = list(dict.fromkeys(n.strip() for n in str(selection).split("+")))
    for name in names:
        if name not in TASKS:
            raise UserError(f"{TASKS.unknown_message(name)} Or {SUITE!r} for all of them, or several joined by + "
                            "(lift+stack).")  # fmt: skip
    return names


def _body_pose(env: Any, body: str) -> tuple[np.ndarray, np.ndarray]:
    """(world position (3,), xyzw quaternion (4,)) of a MuJoCo body."""
    bid = env.sim.model.body_name2id(body)
    wxyz = env.sim.data.body_xquat[bid]
    return np.array(env.sim.data.body_xpos[bid]), np.array([*wxyz[1:], wxyz[0]])


def _lift_privileged(env: Any) -> dict[str, np.ndarray]:
    pos, quat = _body_pose(env, env.cube.root_body)
    return {"object_pos": pos, "object_quat": quat, "object_size": np.asarray(env.cube.size)}


def _stack_privileged(env: Any) -> dict[str, np.ndarray]:
    a_pos, a_quat = _body_pose(env, env.cubeA.root_body)
    b_pos, b_quat = _body_pose(env, env.cubeB.root_body)
    return {
        "object_pos": a_pos,  # the red cube to move
        "object_quat": a_quat,
        "object_size": np.asarray(env.cubeA.size),
        "target_pos": b_pos,  # the green cube to put it on
        "target_quat": b_quat,
        "target_size": np.asarray(env.cubeB.size),
    }


def _pick_place_privileged(env: Any) -> dict[str, np.ndarray]:
    obj = env.objects[env.object_id]
    pos, quat = _body_pose(env, obj.root_body)
    return {
        "object_pos": pos,
        "object_quat": quat,
        "object_bottom": np.asarray(obj.bottom_offset[2:3]),  # (1,) z of the bottom below the centre (< 0)
        "target_pos": np.array(env.target_bin_placements[env.object_id]),  # centre of its bin, floor height
        "bin_positions": np.array(env.target_bin_placements),  # (4, 3) every bin centre
        "source_bin_pos": np.array(env.bin1_pos),  # centre of the bin the object starts in
        "source_bin_half": np.asarray(env.bin_size[:2]) / 2,  # (2,) its half extents in x, y
    }


register_task(
    Task(
        name="lift",
        env_name="Lift",
        instructions=("pick up the cube", "lift the red cube", "pick the red block up off the table"),
        horizon_s=12.0,
        privileged=_lift_privileged,
    )
)
register_task(
    Task(
        name="stack",
        env_name="Stack",
        instructions=(
            "put the red cube on the green cube",
            "stack the red block on the green block",
            "place the red cube on top of the green one",
        ),
        horizon_s=18.0,
        privileged=_stack_privileged,
    )
)
register_task(
    Task(
        name="pick_place_can",
        env_name="PickPlaceCan",
        instructions=("put the can in its bin", "place the soda can into the bin", "move the can to the bin"),
        horizon_s=24.0,
        privileged=_pick_place_privileged,
    )
)
register_task(
    Task(
        name="pick_place_bread",
        env_name="PickPlaceBread",
        instructions=("put the bread in its bin", "place the loaf of bread into the bin", "move the bread to the bin"),
        horizon_s=24.0,
        privileged=_pick_place_privileged,
    )
)
