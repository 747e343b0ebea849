"""Normalisation statistics and the action normaliser (DESIGN.md "Normalised action").

Statistics are computed once per prepared dataset and saved as `dataset_statistics.json` beside
it, in OpenVLA's layout (`{"action": {...}, "proprio": {...}, "num_transitions", ...}`, plus the
p0.1 / p99.9 quantiles V-GPS uses), so the same file serves our critics and OpenVLA's
un-normalisation. Every checkpoint stores the statistics it was trained with.

Modes map the six arm dimensions to [-1, 1] and leave the gripper (already in [0, 1]) unchanged:
  bounds_q99   clip(2 (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)   OpenVLA BOUNDS_Q99
  bounds_q999  same with q001 / q999                                V-GPS
  bounds       same with min / max
  normal       (x - mean) / (std + 1e-8)                            Octo NORMAL (not clipped)
As in OpenVLA, a dimension whose min equals its max maps to 0. A missing statistic is an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from configs.errors import UserError

_QUANTILES = {"q001": 0.001, "q01": 0.01, "q99": 0.99, "q999": 0.999}
_BOUNDS = {"bounds_q99": ("q01", "q99"), "bounds_q999": ("q001", "q999"), "bounds": ("min", "max")}
MODES = (*_BOUNDS, "normal")
# Which action dimensions are normalised: the six arm deltas, not the gripper.
ACTION_MASK = (True,) * 6 + (False,)


class MissingStatisticError(UserError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def compute_stats(values: np.ndarray) -> dict[str, Any]:
    """Per-dimension mean, std, min, max and quantiles of (N, D) values, as JSON-ready lists."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        raise UserError("Cannot compute normalisation statistics of an empty dataset.")
    stats: dict[str, Any] = {
        "mean": values.mean(0),
        "std": values.std(0),
        "min": values.min(0),
        "max": values.max(0),
    }
    quantiles = np.quantile(values, list(_QUANTILES.values()), axis=0)
    stats.update(zip(_QUANTILES, quantiles, strict=True))
    out = {k: np.asarray(v, dtype=np.float64).tolist() for k, v in stats.items()}
    out["count"] = len(values)
    return out


def dataset_statistics(actions: np.ndarray, states: np.ndarray, num_trajectories: int) -> dict[str, Any]:
    """The `dataset_statistics.json` content for one dataset."""
    action = compute_stats(actions)
    action["mask"] = list(ACTION_MASK)
    return {
        "action": action,
        "proprio": compute_stats(states),
        "num_transitions": len(actions),
        "num_trajectories": int(num_trajectories),
    }


def save_statistics(stats: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(stats, indent=1))


def load_statistics(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"Cannot read normalisation statistics {path}: {err}") from None


class ActionNormalizer:
    """Maps canonical actions to the normalised actions networks see, and back.

    Works on NumPy arrays and torch tensors of shape (..., 7). `key="proprio"` normalises the
    observation state with its own statistics instead, all seven dimensions (the state's gripper is a
    finger opening, not the action's 0 / 1 command), in the same mode.
    """

    def __init__(
        self, stats: dict[str, Any], mode: str = "bounds_q99", source: str = "statistics", key: str = "action"
    ) -> None:
        if mode not in MODES:
            raise UserError(f"Unknown normalisation mode {mode!r}; known: {', '.join(MODES)}.")
        self.mode = mode
        self.stats = stats
        action = _require(stats, key, source)
        mask = np.asarray(action.get("mask", ACTION_MASK if key == "action" else (True,) * 7), dtype=bool)
        if mode == "normal":
            low, high = _require(action, "mean", source), _require(action, "std", source)
            self._shift, self._scale = np.asarray(low), np.asarray(high) + 1e-8
        else:
            lo_key, hi_key = _BOUNDS[mode]
            low, high = np.asarray(_require(action, lo_key, source)), np.asarray(_require(action, hi_key, source))
            # x_norm = (x - shift) / scale - 1 with shift = low, scale = (high - low + 1e-8) / 2.
            self._shift, self._scale = low, (high - low + 1e-8) / 2
        # OpenVLA maps a dimension that never varies (min == max) to 0.
        constant = np.asarray(_require(action, "min", source)) == np.asarray(_require(action, "max", source))
        self._mask, self._zero = mask, mask & constant
        self._offset = 0.0 if mode == "normal" else 1.0

    def normalize(self, action: Any) -> Any:
        """Canonical (..., 7) -> normalised (..., 7)."""
        norm = (action - _like(self._shift, action)) / _like(self._scale, action) - self._offset
        if self.mode != "normal":
            norm = norm.clip(-1, 1)
        norm = _where(_like(self._zero, action), norm * 0, norm)
        return _where(_like(self._mask, action), norm, action)

    def unnormalize(self, norm: Any) -> Any:
        """Normalised (..., 7) -> canonical (..., 7)."""
        action = (norm + self._offset) * _like(self._scale, norm) + _like(self._shift, norm)
        return _where(_like(self._mask, norm), action, norm)


def _require(d: dict[str, Any], key: str, source: str) -> Any:
    if key not in d:
        raise MissingStatisticError(
            f"Normalisation statistics ({source}) have no {key!r} (they have: {', '.join(sorted(d))}). "
            "Recompute them with `python -m data.prepare data=<name> force=true`, or use statistics "
            "saved by a newer robosteer."
        )
    return d[key]


def _like(value: np.ndarray, ref: Any) -> Any:
    if isinstance(ref, np.ndarray):
        return value.astype(ref.dtype) if value.dtype != bool else value
    import torch

    dtype = torch.bool if value.dtype == bool else ref.dtype
    return torch.as_tensor(value, dtype=dtype, device=ref.device)


def _where(mask: Any, a: Any, b: Any) -> Any:
    if isinstance(a, np.ndarray):
        return np.where(mask, a, b).astype(a.dtype)
    import torch

    return torch.where(mask, a, b)
