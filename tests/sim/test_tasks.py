"""Every registered task on real robosuite: the sim-edge contract (shapes, action and image conventions)
and the scripted experts (clean, and at the default corruption), on fixed seeds.

Small and deterministic: 64 px cameras where images matter, no rendering where they do not.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import mujoco
import numpy as np
import pytest

from sim.config import CorruptionConfig, SimConfig
from sim.env import SimEnv, make_sim_env
from sim.experts import ScriptedPolicy, draw_corruption
from sim.runner import EpisodeResult, EpisodeSpec, Runner, episode_specs
from sim.tasks import TASKS

pytestmark = pytest.mark.sim
SIZE = 64
TASK_NAMES = TASKS.names()


@pytest.fixture(scope="module")
def env() -> Iterator[Callable[[str], SimEnv]]:
    """SimEnv of a task with 64 px images, built once per module."""
    made: dict[str, SimEnv] = {}
    yield lambda task: made.get(task) or made.setdefault(task, SimEnv(task, SimConfig(task=task, image_size=SIZE)))
    for e in made.values():
        e.close()


def step(env: SimEnv, action: list[float], n: int) -> dict:
    for _ in range(n):
        obs, _, _, _ = env.step(np.array(action, np.float32))
    return obs


@pytest.mark.parametrize("task", TASK_NAMES)
def test_reset_and_step_contract(env: Callable[[str], SimEnv], task: str) -> None:
    e = env(task)
    obs = e.reset(11)
    assert obs["image_primary"].shape == (SIZE, SIZE, 3) and obs["image_primary"].dtype == np.uint8
    assert obs["state"].shape == (7,) and obs["state"].dtype == np.float32 and np.isfinite(obs["state"]).all()
    assert 0.4 < obs["state"][6] <= 1  # robosuite's Panda starts with the fingers half open
    assert np.abs(obs["state"][3:6]).max() < 0.2  # pointing down: a near-zero canonical orientation
    assert obs["instruction"] in TASKS.get(task).instructions
    priv = obs["privileged"]
    assert (priv["task"], priv["seed"]) == (task, 11) and priv["object_pos"].shape == (3,)
    assert e.horizon == TASKS.get(task).horizon(SimConfig.control_freq)

    again = e.reset(11)  # a seed fixes the initial state and the instruction
    np.testing.assert_allclose(again["privileged"]["object_pos"], priv["object_pos"], atol=1e-6)
    assert again["instruction"] == obs["instruction"]
    assert np.linalg.norm(e.reset(12)["privileged"]["object_pos"] - priv["object_pos"]) > 1e-3

    obs, reward, done, info = e.step(np.array([0, 0, 0, 0, 0, 0, 1], np.float32))
    assert isinstance(reward, float) and done is False and info == {"success": False, "step": 1}
    assert obs["image_primary"].shape == (SIZE, SIZE, 3)
    for bad in (np.zeros(6), np.array([0, 0, np.nan, 0, 0, 0, 1])):
        with pytest.raises(ValueError, match="finite canonical action of shape"):
            e.step(bad)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_canonical_actions_move_the_end_effector_in_the_base_frame(env: Callable[[str], SimEnv], task: str) -> None:
    e = env(task)
    for axis in range(3):  # +2 cm per step along x, y or z
        before = e.reset(3)["state"]
        action = [0.0] * 6 + [1.0]
        action[axis] = 0.02
        moved = step(e, action, 3)["state"][:3] - before[:3]
        others = np.delete(moved, axis)
        assert moved[axis] > 0.035 and np.abs(others).max() < 0.3 * moved[axis], (axis, moved)
    before = e.reset(3)["state"]  # +0.15 rad of yaw per step
    turned = step(e, [0, 0, 0, 0, 0, 0.15, 1], 3)["state"]
    delta = turned - before
    assert delta[5] > 0.25 and np.abs(delta[3:5]).max() < 0.3 * delta[5] and np.abs(delta[:3]).max() < 0.02
    assert turned[6] > before[6] + 0.2  # gripper 1 opens the fingers...
    assert step(e, [0, 0, 0, 0, 0, 0, 0], 4)["state"][6] < turned[6] - 0.3  # ... and 0 closes them


def project(e: SimEnv, point: np.ndarray) -> np.ndarray:
    """(row, col) of a world point in a top-left-origin image of the primary camera (pinhole model).

    MuJoCo cameras look along -z of their frame with +y up, so points above the optical axis have
    small rows.
    """
    m, d = e._env.sim.model._model, e._env.sim.data._data
    cam = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_CAMERA, e.camera)
    local = d.cam_xmat[cam].reshape(3, 3).T @ (point - d.cam_xpos[cam])
    focal = SIZE / 2 / np.tan(np.deg2rad(m.cam_fovy[cam]) / 2)
    return np.array([SIZE / 2 - focal * local[1] / -local[2], SIZE / 2 + focal * local[0] / -local[2]])


@pytest.mark.parametrize("task", TASK_NAMES)
def test_images_have_a_top_left_origin(env: Callable[[str], SimEnv], task: str) -> None:
    """The object, put nearer to / farther from the camera on the table, shows where a pinhole camera sees it."""
    e = env(task)
    obs = e.reset(3)
    m, d = e._env.sim.model._model, e._env.sim.data._data
    world = e._base_rot.apply(obs["privileged"]["object_pos"]) + e._base_pos
    free = [j for j in range(m.njnt) if m.jnt_type[j] == mujoco.mjtJoint.mjJNT_FREE]
    joint = min(free, key=lambda j: np.linalg.norm(d.xpos[m.jnt_bodyid[j]] - world))  # the object's free joint
    qpos = slice(m.jnt_qposadr[joint], m.jnt_qposadr[joint] + 3)
    rows = []
    for shift in (0.12, -0.12):  # the primary camera looks from the front (+x) at the robot
        where = world + np.array([shift, 0, 0])
        d.qpos[qpos] = where
        mujoco.mj_forward(m, d)
        with_object = e.render(e.camera).astype(int)
        d.qpos[qpos] = [50, 50, 50]  # far out of view
        mujoco.mj_forward(m, d)
        changed = np.abs(with_object - e.render(e.camera)).max(-1) > 40
        assert changed.sum() >= 5
        centroid = np.argwhere(changed).mean(0)
        expected = project(e, where)
        np.testing.assert_allclose(centroid, expected, atol=3.0)
        rows.append(centroid[0])
    assert rows[0] > SIZE / 2 > rows[1]  # nearer: the lower half; a bottom-up image would swap them


def test_a_snapshot_restores_to_the_same_continuation_in_any_environment_of_the_task(
    env: Callable[[str], SimEnv],
) -> None:
    """Branching rollouts (benchmarks/steer_oracle.py): every restore of a snapshot continues alike,
    images included, in this environment after other steps and in a second one; the gripper's ramped
    command is part of the state (without it the fingers differed by 0.3 after a restore)."""
    rng = np.random.default_rng(0)

    def actions(n: int) -> np.ndarray:
        a = rng.uniform(-1, 1, (n, 7)) * [0.02, 0.02, 0.02, 0.05, 0.05, 0.05, 0.5] + [0, 0, 0, 0, 0, 0, 0.5]
        return a.astype(np.float32)

    def run(e: SimEnv, todo: np.ndarray) -> list[dict]:
        return [e.step(a)[0] for a in todo]

    first, second = env("lift"), SimEnv("lift", SimConfig(task="lift", image_size=SIZE))
    first.reset(3)
    run(first, actions(8))  # the gripper closes and opens: its ramp is mid-way
    snap = first.snapshot()
    branch = actions(20)
    start = first.restore(snap)
    assert start["privileged"]["seed"] == 3 and first.t == 8
    reference = run(first, branch)
    run(first, actions(5))
    for e in (first, second):
        restart = e.restore(snap)
        np.testing.assert_array_equal(restart["image_primary"], start["image_primary"])
        assert (e.t, e.seed, restart["instruction"]) == (8, 3, start["instruction"])
        for ref, obs in zip(reference, run(e, branch), strict=True):
            np.testing.assert_array_equal(obs["state"], ref["state"])
            np.testing.assert_array_equal(obs["image_primary"], ref["image_primary"])
            np.testing.assert_array_equal(obs["privileged"]["object_pos"], ref["privileged"]["object_pos"])
    second.close()


def test_environments_of_several_tasks_render_in_one_process(env: Callable[[str], SimEnv]) -> None:
    """A worker keeps one environment per task: each renders its own scene, whichever was built last."""
    first = {task: env(task).reset(5)["image_primary"] for task in TASK_NAMES}
    for task in reversed(TASK_NAMES):
        image = env(task).reset(5)["image_primary"]
        assert image.mean() > 40  # not the black frame of another environment's GL context
        np.testing.assert_array_equal(image, first[task])


def test_an_episode_is_the_same_in_every_worker_process() -> None:
    """Same seed, same episode, whichever process runs it: robosuite builds the same model everywhere
    (Lift draws its cube size when it builds the model), so policies are compared on equal terms."""
    seed = episode_specs(["lift"], 1, 0)[0].seed
    make_env = functools.partial(make_sim_env, SimConfig(task="lift", render=False))
    with Runner(make_env, workers=2) as runner:  # one episode per worker process
        a, b = runner.run(
            [EpisodeSpec("lift", seed, 0), EpisodeSpec("lift", seed, 1)], ScriptedPolicy(CorruptionConfig())
        )
    assert a.error is None and (a.steps, a.ret, a.success) == (b.steps, b.ret, b.success)


def run_experts(scale: float, episodes: int) -> dict[str, list[EpisodeResult]]:
    """The experts on every task (collect_sim's first seeds), through the real runner, without rendering."""
    make_env = functools.partial(make_sim_env, SimConfig(task="suite", render=False))
    results: dict[str, list[EpisodeResult]] = {t: [] for t in TASK_NAMES}
    with Runner(make_env, workers=2) as runner:
        for r in runner.run(episode_specs(TASK_NAMES, episodes, 0), ScriptedPolicy(CorruptionConfig(scale=scale))):
            assert r.error is None, r.error
            results[r.task].append(r)
    return results


def check_success_ends_episodes(results: dict[str, list[EpisodeResult]]) -> None:
    """Success is detected: a successful episode ends at once; a failed one runs to the horizon."""
    for task, rs in results.items():
        horizon = TASKS.get(task).horizon(SimConfig.control_freq)
        assert all((r.steps < horizon) == r.success for r in rs), [(r.success, r.steps) for r in rs]


def test_clean_experts_succeed() -> None:
    results = run_experts(scale=0.0, episodes=10)
    check_success_ends_episodes(results)
    for task, rs in results.items():
        assert sum(r.success for r in rs) >= 0.9 * len(rs), (task, [r.steps for r in rs])


def test_default_corruption_gives_mixed_quality_from_the_failure_modes() -> None:
    """Fixed seeds, so deterministic here; the checks leave room for another CPU's floating point.

    The band is loose for 10 episodes per task (the 40-episode rates are in docs/sim.md).
    """
    results = run_experts(scale=1.0, episodes=10)
    check_success_ends_episodes(results)
    cfg = CorruptionConfig()
    for task, rs in results.items():
        assert 2 <= sum(r.success for r in rs) <= 8, (task, [r.success for r in rs])
        # wrong targets and early releases fail episodes; the other episodes (hesitation, noise) succeed
        lethal = [draw_corruption(cfg, r.seed)[0] for r in rs]
        surprises = [r.seed for r, d in zip(rs, lethal, strict=True) if r.success == (d.wrong_target or d.release)]
        assert len(surprises) <= 1, (task, surprises)
    total = sum(r.success for rs in results.values() for r in rs) / sum(map(len, results.values()))
    assert 0.3 <= total <= 0.6


def test_rendering_beside_tensorflow_is_a_clear_error_not_a_segfault(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    from configs.errors import UserError

    monkeypatch.setitem(sys.modules, "tensorflow", types.ModuleType("tensorflow"))
    with pytest.raises(UserError, match="TensorFlow is imported in this process"):
        SimEnv("lift", SimConfig(task="lift", image_size=SIZE))
