"""Dataset standardisations: raw RLDS steps -> canonical steps (DESIGN.md), one function per dataset.

A standardisation sees the numeric and text features of one raw episode and returns a `Canonical`:
which raw steps become frames, the 7-D state per frame, the canonical action of each transition
(frame t -> t+1) and the instruction. Images are not touched here: the store copies the frames'
images listed in the registration. Adding a dataset = one registered function + one yaml under
`configs/data/`.

Canonical action: [dx, dy, dz, droll, dpitch, dyaw] deltas in the robot base frame, then the gripper
in [0, 1] with 1 = open. An episode of T frames has T - 1 transitions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from configs.registry import Registry


@dataclass
class Canonical:
    """One standardised episode, images aside."""

    frames: np.ndarray  # (T,) indices of the raw steps kept as frames, increasing
    state: np.ndarray  # (T, 7) float32 [x, y, z, roll, pitch, yaw, gripper]
    action: np.ndarray  # (T - 1, 7) float32 canonical action taking frame t to frame t + 1
    instruction: str  # "" if the episode has none (then it is skipped and counted)
    success: bool | None = None  # recorded success flag, None if the dataset has none


@dataclass(frozen=True)
class Standardization:
    """A registered standardisation and what it needs from the raw dataset."""

    name: str
    fn: Callable[..., Canonical]  # fn(raw: dict[str, Any], **options) -> Canonical
    keys: tuple[str, ...]  # raw features fn reads
    images: dict[str, str]  # canonical camera ("image_primary", "image_wrist") -> raw image key
    image_shape: tuple[int, int, int] | None  # (H, W, 3) every camera must have; None = any
    how_to_get: str  # shown when the dataset is missing; may use {data_dir} and {root}
    key_feature: str | None = None  # raw feature naming an episode (stable val hold-out)
    options: dict[str, Any] = field(default_factory=dict)  # defaults of fn's keyword options


DATASETS: Registry[Standardization] = Registry("dataset standardisation")


def register_dataset(
    name: str,
    *,
    keys: tuple[str, ...],
    images: dict[str, str],
    image_shape: tuple[int, int, int] | None = None,
    how_to_get: str = "",
    key_feature: str | None = None,
    **options: Any,
) -> Callable[[Callable[..., Canonical]], Callable[..., Canonical]]:
    """Register `fn` as the standardisation `name`; `options` are its keyword defaults."""

    def add(fn: Callable[..., Canonical]) -> Callable[..., Canonical]:
        DATASETS.register(name)(Standardization(name, fn, keys, images, image_shape, how_to_get, key_feature, options))
        return fn

    return add


# ---------------------------------------------------------------------------------------------
# Shared transforms (Octo / OpenVLA conventions, reference/data.md).


def binarize_gripper(gripper: np.ndarray, open_above: float = 0.95, closed_below: float = 0.05) -> np.ndarray:
    """Octo's `binarize_gripper_actions`: 1 = open, 0 = closed.

    Values above 0.95 are open, below 0.05 closed; an in-between value takes the state of the next
    step that is not in between (a reverse scan). As in Octo, a trailing run of in-between values
    keeps the raw last value (the scan starts from `gripper[-1]`).
    """
    gripper = np.asarray(gripper, dtype=np.float32)
    is_open = gripper > open_above
    decided = is_open | (gripper < closed_below)
    out = np.empty_like(gripper)
    carry = float(gripper[-1]) if len(gripper) else 0.0
    for t in range(len(gripper) - 1, -1, -1):
        if decided[t]:
            carry = float(is_open[t])
        out[t] = carry
    return out


def wrap_angle(angle: np.ndarray) -> np.ndarray:
    """Map angles to [-pi, pi)."""
    return (angle + np.pi) % (2 * np.pi) - np.pi


def relabel_actions(state: np.ndarray, gripper: np.ndarray, wrap_angles: bool = False) -> np.ndarray:
    """Octo's `relabel_actions`: the achieved end-effector delta state[t+1] - state[t] (T-1, 7).

    The gripper keeps the commanded value of step t. Octo and OpenVLA do not wrap the rotation
    deltas; `wrap_angles=True` maps them to [-pi, pi) (a deliberate option, off by default).
    """
    arm = state[1:, :6] - state[:-1, :6]
    if wrap_angles:
        arm[:, 3:6] = wrap_angle(arm[:, 3:6])
    return np.concatenate([arm, gripper[:-1, None]], axis=1).astype(np.float32)


def first_instruction(texts: list[str]) -> str:
    return texts[0].strip() if texts else ""


# ---------------------------------------------------------------------------------------------
# Registered datasets.

BRIDGE_HOW_TO_GET = (
    "BridgeData V2 (bridge_dataset 1.0.0, 124 GB) is downloaded with\n"
    "    wget -r -np -nH --cut-dirs=4 -R 'index.html*' "
    "https://rail.eecs.berkeley.edu/datasets/bridge_release/data/tfds/bridge_dataset/ -P {data_dir}\n"
    "  (OpenVLA's copy is the same data in a directory named bridge_orig: then set "
    "data.datasets.bridge.tfds_name=bridge_orig)."
)


@register_dataset(
    "bridge",
    keys=("steps/observation/state", "steps/action", "steps/language_instruction"),
    images={"image_primary": "steps/observation/image_0", "image_wrist": "steps/observation/image_3"},
    image_shape=(256, 256, 3),
    how_to_get=BRIDGE_HOW_TO_GET,
    key_feature="episode_metadata/file_path",
    relabel=True,
    drop_first_step=False,
    wrap_angles=False,
)
def bridge(
    raw: dict[str, Any], relabel: bool = True, drop_first_step: bool = False, wrap_angles: bool = False
) -> Canonical:
    """BridgeData V2 as Octo's `bridge_dataset_transform` (and OpenVLA's `bridge_orig`).

    The gripper (action[:, 6], ~1 open / ~0 closed) is binarised; with `relabel` the arm action is
    the achieved state delta (the builder's null action on the last step is never used). OpenVLA
    also drops step 0, whose action is zero (`drop_first_step=True`).
    """
    state = raw["steps/observation/state"].astype(np.float32)
    commanded = raw["steps/action"].astype(np.float32)
    gripper = binarize_gripper(commanded[:, 6])
    if relabel:
        action = relabel_actions(state, gripper, wrap_angles)
    else:
        action = np.concatenate([commanded[:-1, :6], gripper[:-1, None]], axis=1)
    frames = np.arange(len(state))
    if drop_first_step:
        frames, state, action = frames[1:], state[1:], action[1:]
    return Canonical(frames, state, action, first_instruction(raw["steps/language_instruction"]))


SIM_HOW_TO_GET = (
    "Simulated datasets are written by collect_sim.py, e.g.\n"
    "    python collect_sim.py sim=suite episodes=200      (or: make demo)"
)


@register_dataset(
    "robosteer_sim",
    keys=(
        "steps/observation/state",
        "steps/action",
        "steps/language_instruction",
        "episode_metadata/success",
    ),
    images={"image_primary": "steps/observation/image_primary", "image_wrist": "steps/observation/image_wrist"},
    how_to_get=SIM_HOW_TO_GET,
    key_feature="episode_metadata/file_path",
)
def robosteer_sim(raw: dict[str, Any]) -> Canonical:
    """robosteer's simulated data: already canonical; the last step carries a null action."""
    state = raw["steps/observation/state"].astype(np.float32)
    action = raw["steps/action"][:-1].astype(np.float32)
    return Canonical(
        np.arange(len(state)),
        state,
        action,
        first_instruction(raw["steps/language_instruction"]),
        success=bool(raw["episode_metadata/success"]),
    )
