"""Octo (octo-models/octo) as a robosteer Policy, run in Octo's own JAX environment behind `serve_policy.py`.

    python serve_policy.py policy=octo warmup_k=[1,10]        # in Octo's environment (docs/serving.md)
    python eval_sim.py policy=remote policy.host=<server> steer=true steering.critic=<run dir>   # in ours

Octo pins jax 0.4.20, flax 0.7.5, TensorFlow 2.15 and numpy 1.24, which cannot share an environment
with current torch: this module imports NumPy only, and JAX and Octo inside functions.

Per slot, as Octo's own evaluation does (examples/04_eval_finetuned_on_robot.py; SimplerEnv's
OctoInference; reference/policies.md):
- history: the last `window` (2) primary images; at the start of an episode the first image fills
  the window and `timestep_pad_mask` is False on the copies (Octo's HistoryWrapper);
- the primary image resized to 256 x 256 with TensorFlow's lanczos3 and antialiasing (Octo's data
  pipeline and ResizeImageWrapper, without its average-crop: SimplerEnv's Octo wrapper does not crop);
- the task from `model.create_tasks(texts=[instruction])`, computed once per instruction;
- K candidates in one call: `sample_actions(obs, task, sample_shape=(K,), rng=key)` runs the
  transformer once and the diffusion head K times -> normalised actions (K, 1, 4, 7);
- un-normalised here, with Octo's NORMAL rule, from `model.dataset_statistics[dataset]["action"]`:
  `a * std + mean` where `mask` (Bridge: the gripper is not normalised);
- the gripper: Octo's Bridge data is binarised to 1 = open, 0 = closed (`binarize_gripper_actions`),
  our canonical convention, so it is only clipped to [0, 1].

Each call of `sample_actions` or `act` is one control step: it appends the observation to the
slot's history. (Steering with exec_horizon > 1 calls the policy every exec_horizon steps, so the
history then skips the steps in between.) `act` executes through `policies.chunking.ActionChunker`;
the default is temporal ensembling with uniform weights, SimplerEnv's Octo setting.
"""

from __future__ import annotations

import functools
import logging
from collections import deque
from typing import Any

import numpy as np

from configs.errors import UserError
from policies.base import ACTION_DIM, POLICIES, Observation, Policy, check_actions
from policies.chunking import ActionChunker

log = logging.getLogger(__name__)

SETUP_HINT = (
    "policy=octo runs in Octo's own environment (jax 0.4.20, flax 0.7.5, TensorFlow 2.15, numpy 1.24), "
    "not in robosteer's: there run `python serve_policy.py policy=octo`, and here "
    "`python eval_sim.py policy=remote policy.host=<server>`. Install Octo from its GitHub repository "
    "(octo-models/octo); PyPI's `octo` is an unrelated package. Set-up: docs/serving.md."
)


class OctoOps:
    """The JAX / TensorFlow calls of the policy, imported on first use (tests, without JAX, pass stand-ins)."""

    def key(self, seed: int) -> Any:
        import jax

        return jax.random.PRNGKey(seed)

    def resize(self, image: np.ndarray, size: int) -> np.ndarray:
        """uint8 (H, W, 3) -> (size, size, 3) exactly as Octo's ResizeImageWrapper and data pipeline (dlimp):
        TensorFlow's lanczos3 with antialiasing, rounded. (Octo's environment always has TensorFlow: Octo
        imports it. `jax.image.resize` agrees except on values within float error of .5, which round the
        other way: one pixel level there moved the tiny parity model's actions by 1e-4.)"""
        import tensorflow as tf

        out = tf.image.resize(image, (size, size), method="lanczos3", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8).numpy()


@functools.lru_cache(maxsize=2)
def load_octo_model(checkpoint: str, step: int | None = None) -> Any:
    """`OctoModel.load_pretrained(checkpoint, step)`, once per process: every connection shares it."""
    try:
        from octo.model.octo_model import OctoModel
    except ModuleNotFoundError as err:
        if err.name in ("octo", "octo.model", "octo.model.octo_model"):
            raise UserError(f"Octo is not importable here ({err}). {SETUP_HINT}") from None
        raise UserError(f"Octo's dependency {err.name!r} is missing ({err}). {SETUP_HINT}") from None
    log.info("loading Octo from %s", checkpoint)
    return OctoModel.load_pretrained(checkpoint, step)


def action_statistics(model: Any, dataset: str) -> dict[str, np.ndarray]:
    """`model.dataset_statistics[dataset]["action"]` as float32 mean/std and a bool mask (default all True)."""
    all_stats = getattr(model, "dataset_statistics", None) or {}
    if "action" in all_stats and "mean" in all_stats["action"]:  # a fine-tuned model: one dataset
        stats = all_stats["action"]
    elif dataset in all_stats:
        stats = all_stats[dataset].get("action", {})
    else:
        known = ", ".join(sorted(all_stats)) or "(none)"
        raise UserError(f"policy.dataset={dataset!r} is not among the checkpoint's dataset statistics: {known}.")
    if "mean" not in stats or "std" not in stats:
        raise UserError(f"The action statistics of {dataset!r} have no mean/std (keys: {sorted(stats)}).")
    mean, std = np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)
    mask = np.asarray(stats.get("mask", np.ones(mean.shape, bool)), bool)
    if not mean.shape == std.shape == mask.shape == (ACTION_DIM,):
        raise UserError(f"The action statistics of {dataset!r} are not 7-dimensional (mean {mean.shape}).")
    return {"mean": mean, "std": std, "mask": mask}


def unnormalize(actions: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
    """Octo's NORMAL un-normalisation of (..., D >= 7) actions: `a * std + mean` where `mask`, on the first 7."""
    actions = np.asarray(actions, np.float32)[..., :ACTION_DIM]
    return np.where(stats["mask"], actions * stats["std"] + stats["mean"], actions).astype(np.float32)


def clip_gripper(actions: np.ndarray) -> np.ndarray:
    """Octo's Bridge gripper is 1 = open, 0 = closed like the canonical action: only clipped to [0, 1]."""
    actions = actions.copy()
    actions[..., 6] = np.clip(actions[..., 6], 0.0, 1.0)
    return actions


class OctoPolicy(Policy):
    """An `OctoModel` behind the Policy contract; see the module docstring."""

    def __init__(
        self, model: Any, dataset: str = "bridge_dataset", window: int = 2, chunk: int = 4, image_size: int = 256,
        seed: int = 0, exec_horizon: int = 1, ensemble: bool = True, ensemble_temp: float = 0.0,
        ops: Any = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.model, self.ops = model, ops or OctoOps()
        self.window, self.chunk, self.image_size, self.seed = int(window), int(chunk), int(image_size), int(seed)
        self.stats = action_statistics(model, dataset)
        self._check_model()
        self.chunker = ActionChunker(self.chunk, exec_horizon, ensemble, ensemble_temp)
        self._history: dict[int, deque[np.ndarray]] = {}
        self._steps: dict[int, int] = {}
        self._tasks: dict[int, tuple[str, Any]] = {}

    def _check_model(self) -> None:
        """The window and chunk must fit what the checkpoint was trained with (when it says)."""
        try:
            trained_window = int(self.model.example_batch["observation"]["image_primary"].shape[1])
        except (AttributeError, KeyError, TypeError, IndexError):
            trained_window = None
        if trained_window is not None and not 1 <= self.window <= trained_window:
            raise UserError(f"policy.window={self.window}: this Octo checkpoint takes 1 to {trained_window} steps.")
        try:
            horizon = int(self.model.config["model"]["heads"]["action"]["kwargs"]["action_horizon"])
        except (AttributeError, KeyError, TypeError):
            horizon = None
        if horizon is not None and not 1 <= self.chunk <= horizon:
            raise UserError(f"policy.chunk={self.chunk}: this Octo checkpoint predicts {horizon} actions per chunk.")

    def reset(self, instruction: str, slot: int = 0, seed: int | None = None) -> None:
        super().reset(instruction, slot, seed)
        self._history.pop(slot, None)
        self._steps.pop(slot, None)
        self.chunker.reset(slot)

    def sample_actions(self, obs: Observation, k: int, slot: int = 0) -> np.ndarray:
        if k < 1:
            raise UserError(f"k={k}: sample at least one action chunk.")
        self._observe(obs, slot)
        return clip_gripper(self._sample(k, slot))

    def act(self, obs: Observation, slot: int = 0) -> np.ndarray:
        """The next action of the slot's plan; chunks are ensembled before the gripper is clipped, as Octo does."""
        self._observe(obs, slot)
        if self.chunker.needs_prediction(slot):
            self.chunker.push(slot, self._sample(1, slot)[0])
        return clip_gripper(self.chunker.next(slot))

    def _observe(self, obs: Observation, slot: int) -> None:
        """Append the (resized) primary image to the slot's history; the first one fills the window."""
        image = obs.get("image_primary")
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise UserError(f"Octo needs obs['image_primary'] as uint8 (H, W, 3) RGB, got {got}.")
        if image.shape[:2] != (self.image_size, self.image_size):
            image = self.ops.resize(image, self.image_size)
        self._task(obs, slot)  # fail before the history changes
        history = self._history.get(slot)
        if history is None:
            self._history[slot] = deque([image] * self.window, maxlen=self.window)
            self._steps[slot] = 1
        else:
            history.append(image)
            self._steps[slot] += 1

    def _task(self, obs: Observation, slot: int) -> Any:
        """Octo's task for the observation's instruction (else the slot's), cached per slot."""
        instruction = obs.get("instruction") or self.instructions.get(slot)
        if not instruction:
            raise UserError(f"No instruction for slot {slot}: call reset(instruction) or set obs['instruction'].")
        cached = self._tasks.get(slot)
        if cached is None or cached[0] != instruction:
            cached = (instruction, self.model.create_tasks(texts=[instruction]))
            self._tasks[slot] = cached
        return cached[1]

    def _sample(self, k: int, slot: int) -> np.ndarray:
        """(k, chunk, 7) un-normalised actions for the slot's current history (gripper not yet clipped)."""
        steps = self._steps[slot]
        # (1, window): False on the copies that pad the start of an episode, True on real steps
        pad_mask = (np.arange(self.window) >= self.window - min(steps, self.window))[None]
        observations = {"image_primary": np.stack(self._history[slot])[None], "timestep_pad_mask": pad_mask}
        rng = self.episode_stream(slot, "octo")
        key = self.ops.key(int(rng.integers(2**31)))
        normalised = self.model.sample_actions(
            observations, self._tasks[slot][1], timestep_pad_mask=pad_mask, sample_shape=(k,), rng=key
        )
        normalised = np.asarray(normalised)  # (k, batch 1, horizon, action_dim)
        if normalised.ndim != 4 or normalised.shape[:2] != (k, 1) or normalised.shape[2] < self.chunk:
            raise ValueError(f"Octo returned actions of shape {normalised.shape}, expected ({k}, 1, >={self.chunk}, 7)")
        return check_actions(unnormalize(normalised[:, 0, : self.chunk], self.stats), k, self.chunk, "octo")


@POLICIES.register("octo")
def _octo(cfg: Any) -> Policy:
    model = load_octo_model(cfg.checkpoint, cfg.step)
    return OctoPolicy(
        model, cfg.dataset, cfg.window, cfg.chunk, cfg.image_size, cfg.seed, cfg.exec_horizon, cfg.ensemble,
        cfg.ensemble_temp,
    )  # fmt: skip
