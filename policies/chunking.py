"""Executing predicted action chunks, per slot: receding horizon or temporal ensembling.

A chunked policy predicts `chunk` actions at once; the runner executes `act(obs)[0]` every step.
`ActionChunker` decides, per slot, when to predict again and what `act` returns:

- receding horizon (`exec_horizon = h`): predict every h steps and, in between, return what is
  left of the last chunk (rows past its end repeat its last action, so `act` keeps its
  (chunk, 7) shape). h = 1 re-plans every step.
- temporal ensembling (`ensemble = True`, h = 1; Octo's `ActionEnsembler`): predict every step and
  execute the weighted mean of the actions that the last `chunk` predictions made for this step,
  with weights exp(-temp * i), i = 0 for the oldest prediction (so with temp > 0 older predictions
  weigh more, as in Octo; temp = 0 is the uniform mean SimplerEnv uses).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from configs.errors import UserError


@dataclass
class _Slot:
    chunks: deque = field(default_factory=deque)  # recent predictions (chunk, 7), oldest first
    step: int = 0  # steps executed from the newest prediction


class ActionChunker:
    """Per-slot chunk queues; see the module docstring."""

    def __init__(self, chunk: int, exec_horizon: int = 1, ensemble: bool = False, ensemble_temp: float = 0.0) -> None:
        if not 1 <= exec_horizon <= chunk:
            raise UserError(f"exec_horizon={exec_horizon} must be between 1 and the chunk length {chunk}.")
        if ensemble and exec_horizon != 1:
            raise UserError("Temporal ensembling predicts every step: use exec_horizon=1 with ensemble=true.")
        self.chunk, self.exec_horizon = chunk, exec_horizon
        self.ensemble, self.ensemble_temp = ensemble, ensemble_temp
        self.slots: dict[int, _Slot] = {}

    def reset(self, slot: int = 0) -> None:
        """Forget the slot's predictions (a new episode)."""
        self.slots[slot] = _Slot()

    def needs_prediction(self, slot: int = 0) -> bool:
        state = self.slots.setdefault(slot, _Slot())
        return not state.chunks or state.step >= self.exec_horizon

    def push(self, slot: int, chunk: np.ndarray) -> None:
        """Record a new prediction (chunk, 7) for the slot; execution restarts at its first action."""
        if chunk.shape[0] != self.chunk:
            raise ValueError(f"expected a chunk of {self.chunk} actions, got shape {chunk.shape}")
        state = self.slots.setdefault(slot, _Slot())
        state.chunks.append(np.asarray(chunk, dtype=np.float32))
        while len(state.chunks) > (self.chunk if self.ensemble else 1):
            state.chunks.popleft()
        state.step = 0

    def next(self, slot: int = 0) -> np.ndarray:
        """(chunk, 7): the actions from this step on (row 0 is executed); advances the slot by one step."""
        state = self.slots[slot]
        newest = state.chunks[-1]
        # rows step.. of the newest chunk, then its last action repeated up to `chunk` rows
        rows = np.minimum(np.arange(state.step, state.step + self.chunk), self.chunk - 1)
        out = newest[rows].copy()
        if self.ensemble:
            out[0] = self._ensembled(state.chunks)
        state.step += 1
        return out

    def _ensembled(self, chunks: deque) -> np.ndarray:
        """Weighted mean of what each stored prediction planned for now (the newest planned row 0)."""
        n = len(chunks)
        planned = np.stack([c[n - 1 - i] for i, c in enumerate(chunks)])  # oldest made it n - 1 steps ago
        weights = np.exp(-self.ensemble_temp * np.arange(n))
        return (weights[:, None] * planned).sum(0) / weights.sum()
