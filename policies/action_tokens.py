"""OpenVLA's action tokenizer: normalised actions <-> the last 256 token ids of a vocabulary.

One tokenizer serves the project's VLA, the OpenVLA adapter and Q-SFT (reference/policies.md,
`prismatic/vla/action_tokenizer.py`; the arithmetic is reproduced, the code is not copied):

    bins        = linspace(-1, 1, 256)                  256 edges -> 255 bins
    bin_centers = (bins[:-1] + bins[1:]) / 2            255 centres
    encode(a)   = vocab_size - digitize(clip(a, -1, 1), bins)        digitize in 1..256
    decode(id)  = bin_centers[clip(vocab_size - id - 1, 0, 254)]

so the action ids are vocab_size - 256 .. vocab_size - 1 (Llama-2: 31744..31999). The largest id
belongs to a = -1, the smallest to a = +1; ids vocab_size - 256 and vocab_size - 255 both decode to
the last centre (+0.996). Any id below vocab_size - 256 also decodes to +0.996 in OpenVLA, which is
why sampling must be restricted to action ids (`mask_logits`, `action_logits`).

Normalised actions are what networks see (DESIGN.md): the arm dimensions lie in [-1, 1] and the
gripper in [0, 1], so all seven fit the bins; encode/decode round trips lose at most half a bin
(1/255).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

NUM_ACTION_TOKENS = 256


class ActionTokenizer:
    """Maps normalised actions (..., D) to token ids (..., D) and back, in NumPy or torch."""

    def __init__(self, vocab_size: int, bins: int = NUM_ACTION_TOKENS) -> None:
        if bins != NUM_ACTION_TOKENS:
            raise ValueError(f"OpenVLA's action tokens use 256 bins, not {bins}")
        if vocab_size <= bins:
            raise ValueError(f"vocab_size={vocab_size} must exceed the {bins} action tokens it ends with")
        self.vocab_size, self.n_bins = int(vocab_size), bins
        self.bins = np.linspace(-1.0, 1.0, bins)  # float64 edges, as np.linspace gives OpenVLA
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0
        self._torch_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def first_id(self) -> int:
        """The smallest action id (vocab_size - 256)."""
        return self.vocab_size - self.n_bins

    @property
    def columns(self) -> slice:
        """The action ids as a slice of the vocabulary axis (what `action_logits` keeps)."""
        return slice(self.first_id, self.vocab_size)

    @property
    def action_ids(self) -> range:
        """All 256 action ids, ascending."""
        return range(self.first_id, self.vocab_size)

    def encode(self, actions: Any) -> Any:
        """Normalised actions (..., D) float -> ids (..., D) int64 (np.ndarray or torch.Tensor, as given)."""
        if isinstance(actions, torch.Tensor):
            edges, _ = self._tensors(actions.device)
            clipped = actions.detach().to(torch.float64).clamp(-1.0, 1.0)
            # bucketize(right=True) gives i with edges[i-1] <= x < edges[i]: np.digitize's convention
            return self.vocab_size - torch.bucketize(clipped, edges, right=True)
        clipped = np.clip(np.asarray(actions), -1.0, 1.0)
        return (self.vocab_size - np.digitize(clipped, self.bins)).astype(np.int64)

    def decode(self, ids: Any) -> Any:
        """Ids (..., D) -> normalised actions (..., D) float32 at the bin centres (np or torch, as given)."""
        if isinstance(ids, torch.Tensor):
            _, centers = self._tensors(ids.device)
            index = (self.vocab_size - ids.long() - 1).clamp(0, self.n_bins - 2)
            return centers[index].to(torch.float32)
        index = np.clip(self.vocab_size - np.asarray(ids, dtype=np.int64) - 1, 0, self.n_bins - 2)
        return self.bin_centers[index].astype(np.float32)

    def is_action(self, ids: Any) -> Any:
        """Boolean (...,): which ids are action ids."""
        return (ids >= self.first_id) & (ids < self.vocab_size)

    def action_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (..., V >= vocab_size) -> (..., 256) over the action ids, ascending id order.

        Index j of the result is id `first_id + j`. V may exceed vocab_size (OpenVLA pads its
        embedding to 32064 for a 32000-token vocabulary); the padding ids are not action ids.
        """
        if logits.shape[-1] < self.vocab_size:
            raise ValueError(f"logits over {logits.shape[-1]} ids, but the vocabulary has {self.vocab_size}")
        return logits[..., self.columns]

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (..., V) with every non-action id set to -inf (a new tensor)."""
        ids = torch.arange(logits.shape[-1], device=logits.device)
        return logits.masked_fill(~self.is_action(ids), float("-inf"))

    def index_to_id(self, index: Any) -> Any:
        """Position in `action_logits` (0..255) -> token id."""
        return index + self.first_id

    def id_to_index(self, ids: Any) -> Any:
        """Token id -> position in `action_logits` (0..255)."""
        return ids - self.first_id

    def identity(self) -> dict[str, Any]:
        """What a checkpoint records to rebuild this tokenizer."""
        return {"vocab_size": self.vocab_size, "bins": self.n_bins, "first_id": self.first_id}

    def _tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._torch_cache:
            self._torch_cache[device] = (
                torch.as_tensor(self.bins, dtype=torch.float64, device=device),
                torch.as_tensor(self.bin_centers, dtype=torch.float64, device=device),
            )
        return self._torch_cache[device]
