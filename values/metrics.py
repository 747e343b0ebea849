"""Validation metrics of a value function on held-out episodes.

- `matched_auc`: how well Q separates transitions of successful from failed episodes, comparing only
  transitions at the same timestep (so "later in the episode" cannot fake the separation):
  P(Q_success > Q_failure | same t), ties counted 1/2, pooled over every timestep with both kinds.
- `spearman`: rank correlation of Q with the Monte-Carlo return.
"""

from __future__ import annotations

import numpy as np


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # boundaries of runs of equal values
    starts = np.concatenate([[0], np.nonzero(np.diff(sorted_x))[0] + 1])
    ends = np.concatenate([starts[1:], [len(x)]])
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2
    return ranks


def matched_auc(q: np.ndarray, success: np.ndarray, timestep: np.ndarray) -> float:
    """ROC-AUC of q for success (True) vs failure (False), pairs matched on timestep; NaN if no pairs."""
    q, success, timestep = np.asarray(q, float), np.asarray(success, bool), np.asarray(timestep)
    wins, pairs = 0.0, 0
    for t in np.unique(timestep):
        sel = timestep == t
        pos, neg = int(success[sel].sum()), int((~success[sel]).sum())
        if pos == 0 or neg == 0:
            continue
        ranks = average_ranks(q[sel])
        # Mann-Whitney U of the positives: sum of their ranks minus the minimum possible sum
        wins += ranks[success[sel]].sum() - pos * (pos + 1) / 2
        pairs += pos * neg
    return wins / pairs if pairs else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (NaN if either is constant)."""
    rx, ry = average_ranks(np.asarray(x, float)), average_ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])
