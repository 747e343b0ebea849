"""Synthetic episodes in the exact raw formats robosteer reads (Bridge; robosteer sim).

Bridge cannot be downloaded here, so tests, the demo and the loader benchmark write small datasets
with the `bridge_dataset` 1.0.0 spec (data/features.py) filled with plausible content: a smooth
end-effector trajectory, commanded actions close to the achieved deltas, a gripper that closes and
opens through intermediate values, the builder's null action on the last step, four JPEG cameras
(a missing camera is zeros with has_image_k = False), and optionally episodes without language.
Images are drawn from the state so consecutive frames differ the way real ones do.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from data import images as imagelib
from data.features import bridge_dataset_spec

INSTRUCTIONS = (
    "put the spoon on the towel",
    "put carrot on plate",
    "stack the green block on the yellow block",
    "put eggplant into yellow basket",
    "open the drawer",
)


def render_state(state: np.ndarray, size: int, camera: int = 0) -> np.ndarray:
    """A (size, size, 3) uint8 picture of the gripper at `state` over a textured table."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([0.5 + 0.3 * xx, 0.45 + 0.2 * yy, 0.35 + 0.1 * np.sin(8 * xx + camera)], -1)
    cx, cy = 0.5 + 3 * state[1], 0.5 + 3 * (state[0] - 0.3)
    radius = 0.05 + 0.2 * max(state[2], 0.0)
    blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius**2))[..., None]
    color = np.array([0.9 * state[6], 0.2, 0.9 * (1 - state[6])])
    return ((base * (1 - blob) + color * blob) * 255).clip(0, 255).astype(np.uint8)


def bridge_episode(
    rng: np.random.Generator,
    episode_id: int,
    length: int | None = None,
    language: bool = True,
    missing_cameras: tuple[int, ...] = (),
    image_size: int = 256,
) -> dict[str, Any]:
    """One raw episode with the `bridge_dataset` 1.0.0 features, as a flat dict for the writer."""
    T = int(length or rng.integers(20, 41))
    delta = rng.normal(0, 0.01, (T, 6)) + np.array([0.002, 0.001, -0.001, 0, 0, 0.01])
    delta[:, 3:] *= 5
    state = np.zeros((T, 7), np.float32)
    state[0, :6] = [0.3, 0.0, 0.15, 0.0, 0.0, 0.0]
    state[:, :6] = state[0, :6] + np.concatenate([np.zeros((1, 6)), np.cumsum(delta[:-1], 0)])
    close_at, open_at = sorted(rng.choice(np.arange(3, T - 3), 2, replace=False))
    gripper = np.ones(T, np.float32)
    gripper[close_at:open_at] = 0.0
    k = min(2, open_at - close_at)
    gripper[close_at : close_at + k] = [0.7, 0.3][:k]  # intermediate values while it closes
    gripper[open_at] = 0.5  # ... and while it opens
    state[:, 6] = gripper
    action = np.zeros((T, 7), np.float32)
    action[:-1, :6] = state[1:, :6] - state[:-1, :6] + rng.normal(0, 1e-3, (T - 1, 6))
    action[:-1, 6] = gripper[:-1]  # the builder's last action stays the null action (zeros)
    instruction = INSTRUCTIONS[episode_id % len(INSTRUCTIONS)] if language else ""
    embedding = np.random.default_rng(zlib.crc32(instruction.encode())).normal(size=512).astype(np.float32)
    episode: dict[str, Any] = {
        "steps/action": action,
        "steps/observation/state": state,
        "steps/reward": (np.arange(T) == T - 1).astype(np.float32),
        "steps/discount": np.ones(T, np.float32),
        "steps/is_first": np.arange(T) == 0,
        "steps/is_last": np.arange(T) == T - 1,
        "steps/is_terminal": np.arange(T) == T - 1,
        "steps/language_instruction": [instruction] * T,
        "steps/language_embedding": np.repeat(embedding[None] * language, T, 0),
        "episode_metadata/episode_id": np.int32(episode_id),
        "episode_metadata/file_path": f"/synthetic/bridge/traj{episode_id:06d}",
        "episode_metadata/has_language": bool(language),
    }
    zeros = imagelib.encode_jpeg(np.zeros((image_size, image_size, 3), np.uint8))
    for cam in range(4):
        present = cam not in missing_cameras
        episode[f"episode_metadata/has_image_{cam}"] = present
        episode[f"steps/observation/image_{cam}"] = [
            imagelib.encode_jpeg(render_state(s, image_size, cam)) if present else zeros for s in state
        ]
    return episode


def bridge_spec() -> dict[str, Any]:
    return bridge_dataset_spec()


def sim_episode(
    images: list[bytes], state: np.ndarray, action: np.ndarray, instruction: str, success: bool,
    task: str, seed: int, episode_id: int, wrist_images: list[bytes] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A canonical episode (T frames, T - 1 actions) as a raw robosteer-sim RLDS episode.

    RLDS convention of the Bridge builder: every step holds an observation; the last step carries
    the null action; reward 1 and is_terminal on the last step of a successful episode.
    """
    T = len(images)
    if state.shape != (T, 7) or action.shape != (T - 1, 7):
        raise ValueError(f"need T={T} states (T, 7) and T - 1 actions, got {state.shape}, {action.shape}")
    last = np.arange(T) == T - 1
    episode = {
        "steps/observation/image_primary": list(images),
        "steps/observation/state": state.astype(np.float32),
        "steps/action": np.concatenate([action, np.zeros((1, 7))]).astype(np.float32),
        "steps/reward": (last & success).astype(np.float32),
        "steps/discount": np.ones(T, np.float32),
        "steps/is_first": np.arange(T) == 0,
        "steps/is_last": last,
        "steps/is_terminal": last & success,
        "steps/language_instruction": [instruction] * T,
        "episode_metadata/episode_id": np.int32(episode_id),
        "episode_metadata/file_path": f"sim/{task}/seed{seed}",
        "episode_metadata/task": task,
        "episode_metadata/seed": np.int64(seed),
        "episode_metadata/success": bool(success),
    }
    if wrist_images is not None:
        episode["steps/observation/image_wrist"] = list(wrist_images)
    return episode


def reaching_episode(
    rng: np.random.Generator, episode_id: int, success: bool, image_size: int = 64, length: int = 20
) -> dict[str, Any]:
    """A robosteer-sim episode of a toy reaching task with learnable structure.

    The gripper starts near the table centre; a successful episode moves it to a goal region in
    front (+x) and closes the gripper there; a failed one wanders in the other direction. Images
    show the gripper, so a value function can tell the two apart from pixels and actions.
    """
    T = length
    direction = np.array([1.0, 0.0, -0.3]) if success else np.array([-0.6, rng.choice([-1.0, 1.0]), 0.2])
    steps = direction * 0.006 + rng.normal(0, 0.001, (T - 1, 3))
    positions = np.concatenate([[[0.3, 0.0, 0.15]], np.array([0.3, 0.0, 0.15]) + np.cumsum(steps, 0)])
    gripper = np.ones(T, np.float32)
    if success:
        gripper[-4:] = 0.0
    state = np.zeros((T, 7), np.float32)
    state[:, :3], state[:, 6] = positions, gripper
    action = np.zeros((T - 1, 7), np.float32)
    action[:, :3] = steps
    action[:, 6] = gripper[1:]
    images = [imagelib.encode_jpeg(render_state(s, image_size)) for s in state]
    instruction = ("reach forward", "move the gripper forward")[episode_id % 2]
    return sim_episode(images, state, action, instruction, success, "reach", 1000 + episode_id, episode_id)
