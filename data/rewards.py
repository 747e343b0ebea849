"""Sparse success rewards and Monte-Carlo returns per transition (reference/data.md, vgps.md).

Transitions of an episode are contiguous and in time order, so transition i + 1 is the successor of
transition i unless i is the episode's last. `steps_to_end[i]` counts the transitions after i in
its episode (0 for the last one).

Labelling (V-GPS `num_final_repeat` = H): in a successful episode the last H transitions get
`success_reward` and are terminal; every other transition gets `step_reward`. A failed episode has
no terminal transition: its end is a time-out, not a terminal state.

Monte-Carlo return: G_i = r_i + discount * (1 - terminal_i) * G_{i+1}, with G of the episode's
last transition = its reward (V-GPS's reverse scan). A failed episode (`episode_returns`,
`RewardConfig.failure_return`): by default that same scan, the discounted sum up to the time-out
(`truncated`), which is what V-GPS's code computes for every episode. `constant` gives
step_reward / (1 - discount) at every transition instead, as Cal-QL's code does for a trajectory of
failure rewards only (`calc_return_to_go`): an episode's end is a time-out, so the truncated sum is a
return the behaviour never earns, and as Cal-QL's lower bound of Q it holds the Qs of failing states
near their end at -1 to -5 rather than near -50. Measured on simulated Lift (docs/values.md,
docs/steering.md), the truncated form nevertheless separates successes from failures better (held-out
AUC 0.82 against 0.77) and only its critic steers a policy, hence the default.
"""

from __future__ import annotations

import numpy as np

from configs.errors import UserError
from data.config import RewardConfig

FAILURE_RETURNS = ("constant", "truncated")


def steps_to_end(episode_lengths: np.ndarray) -> np.ndarray:
    """(N,) transitions remaining after each transition, for episodes of the given lengths."""
    lengths = np.asarray(episode_lengths, dtype=np.int64)
    ends = np.repeat(np.cumsum(lengths), lengths)  # index one past each transition's episode
    return (ends - 1 - np.arange(lengths.sum())).astype(np.int32)


def label_rewards(to_end: np.ndarray, success: np.ndarray, cfg: RewardConfig) -> tuple[np.ndarray, np.ndarray]:
    """Reward and terminal flag of each transition.

    Args:
        to_end: (N,) from `steps_to_end`.
        success: (N,) bool, the success of each transition's episode.
    Returns:
        reward (N,) float32 and terminal (N,) bool.
    """
    rewarded = np.asarray(success, dtype=bool) & (to_end < cfg.success_steps)
    reward = np.where(rewarded, cfg.success_reward, cfg.step_reward).astype(np.float32)
    terminal = rewarded & cfg.terminal_on_success
    return reward, terminal


def mc_returns(reward: np.ndarray, terminal: np.ndarray, to_end: np.ndarray, discount: float) -> np.ndarray:
    """(N,) discounted Monte-Carlo returns (module docstring), float32.

    Vectorised over episodes: all transitions k steps before their episode's end are done at once,
    from k = 0 upwards, so the loop runs max-episode-length times, not N times.
    """
    returns = np.zeros(len(reward), dtype=np.float64)
    order = np.argsort(to_end, kind="stable")
    counts = np.bincount(to_end, minlength=1)
    start = 0
    for k, count in enumerate(counts):
        idx = order[start : start + count]
        start += count
        if k == 0:
            returns[idx] = reward[idx]
        else:
            returns[idx] = reward[idx] + discount * (~terminal[idx]) * returns[idx + 1]
    return returns.astype(np.float32)


def episode_returns(
    reward: np.ndarray, terminal: np.ndarray, to_end: np.ndarray, success: np.ndarray, cfg: RewardConfig
) -> np.ndarray:
    """(N,) Monte-Carlo returns of labelled transitions (`label_rewards`), failed episodes per
    `cfg.failure_return` (module docstring), float32."""
    if cfg.failure_return not in FAILURE_RETURNS:
        raise UserError(f"data.reward.failure_return={cfg.failure_return!r}; use one of {', '.join(FAILURE_RETURNS)}.")
    returns = mc_returns(reward, terminal, to_end, cfg.discount)
    if cfg.failure_return == "constant":
        if not 0 <= cfg.discount < 1:
            raise UserError(f"data.reward.failure_return=constant needs data.reward.discount in [0, 1) (it is "
                            f"{cfg.discount}): step_reward / (1 - discount). Or set "
                            "data.reward.failure_return=truncated.")  # fmt: skip
        returns[~np.asarray(success, dtype=bool)] = cfg.step_reward / (1 - cfg.discount)
    return returns
