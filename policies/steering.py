"""V-GPS: value-guided steering of a frozen policy (Nakamoto et al., CoRL 2024; reference/vgps.md).

At every control step, for each slot: sample K candidate chunks from the base policy (one batched
call over the slots), score the *first* action of each chunk with the critic Q(s, a, l) (each image
and instruction encoded once, the N * K actions in one batch of the heads), and choose

    beta = 0:  argmax_k Q(s, a_k, l)
    beta > 0:  k ~ softmax(Q(s, a_k, l) / beta)       (released code: jax.random.categorical)

The chosen chunk is what `act` returns. Nothing of the base policy is trained or changed.

Deliberate deviations from the released code (SimplerEnv fork, `get_vgps_action`):
- The critic normalises queried actions with *its own* training statistics (values/critic.py), not
  with hard-coded PTR / min-max bounds, which differ from the percentile normalisation it was
  trained with.
- The chosen chunk is executed through `policies.chunking.ActionChunker`: by default the policy
  re-steers every step and executes the scored action; `ensemble=true` reproduces V-GPS's temporal
  ensembling (then the executed action is an average, not the scored one).
- The base policy's own `act` (its chunk queue or ensembler) is bypassed: steering samples with
  `sample_actions_batch` and executes with its own chunker.

`steering.critic=random` scores candidates i.i.d. uniformly, i.e. picks a random candidate (V-GPS's
"random-selecting" ablation): a steered policy must beat it for the gain to come from the values.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from configs.errors import UserError
from policies.base import Observation, Policy, check_actions, make_policy
from policies.chunking import ActionChunker

log = logging.getLogger(__name__)


class Scorer(Protocol):
    """What steering needs of a critic (values.critic.CriticScorer, RandomScorer).

    A scorer that also has `embed_batch(observations) -> emb` and `score_embedded(emb, actions)`
    (CriticScorer) gets its observations encoded *before* the policy samples, so that on a GPU the
    critic's encoder overlaps with the policy's sampling. A scorer with `fix_batch_rows(rows)` gets the
    steered policy's setting (policies/base.py). A scorer that draws random numbers sets
    `episode_rngs = True` and takes `score_batch(observations, actions, rngs)`: one NumPy generator per
    row, that row's episode stream (Policy.episode_stream), so a row's scores do not depend on its batch.
    """

    def score_batch(self, observations: Sequence[Observation], actions: np.ndarray) -> Any:
        """N observations, canonical actions (N, K, 7) -> (N, K) scores (array or tensor)."""


class RandomScorer:
    """I.i.d. uniform scores: steering with it picks a uniformly random candidate (the sanity check).

    ValueSteeredPolicy passes each row's episode generator (`rngs`), so that a row's scores do not
    depend on the other rows of the batch; without them the scorer draws from its own.
    """

    episode_rngs = True

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng([seed, 0x5C0FE])

    def score_batch(
        self, observations: Sequence[Observation], actions: np.ndarray, rngs: Sequence[Any] | None = None
    ) -> np.ndarray:
        n, k = np.shape(actions)[:2]
        return np.stack([r.random(k) for r in rngs]) if rngs is not None else self.rng.random((n, k))


@dataclass
class StepStats:
    """What the critic saw at one steering step of one slot."""

    q_max: float
    q_min: float
    q_mean: float
    q_std: float
    chosen: int  # index of the executed candidate
    chosen_q: float

    @property
    def spread(self) -> float:
        return self.q_max - self.q_min


@dataclass
class SpreadTotals:
    """Running sums over every steering step, for the summary of a run."""

    steps: int = 0
    spread: float = 0.0
    std: float = 0.0
    advantage: float = 0.0  # chosen Q - mean Q

    def add(self, s: StepStats) -> None:
        self.steps += 1
        self.spread += s.spread
        self.std += s.q_std
        self.advantage += s.chosen_q - s.q_mean

    def summary(self) -> dict[str, float | int]:
        n = max(self.steps, 1)
        return {"steps": self.steps, "mean_q_spread": self.spread / n, "mean_q_std": self.std / n,
                "mean_chosen_advantage": self.advantage / n}  # fmt: skip


def choose(q: np.ndarray, beta: float, rng: np.random.Generator) -> int:
    """Index of the candidate to execute among scores q (K,): argmax (beta = 0) or a softmax(q / beta) draw."""
    if beta == 0:
        return int(np.argmax(q))
    logits = (q - q.max()) / beta  # shifted: exp never overflows, the best candidate has weight 1
    p = np.exp(logits)
    return int(rng.choice(len(q), p=p / p.sum()))


class ValueSteeredPolicy(Policy):
    """A Policy that executes the best of K base-policy candidates under a critic (see the module doc)."""

    def __init__(
        self, base: Policy, critic: Scorer, k: int = 10, beta: float = 1.0, seed: int = 0, exec_horizon: int = 1,
        ensemble: bool = False, ensemble_temp: float = 0.0, critic_name: str = "",
    ) -> None:  # fmt: skip
        super().__init__()
        if k < 1:
            raise UserError(f"steering.k={k}: steering needs at least one candidate (V-GPS: 10 or 50).")
        if beta < 0:
            raise UserError(f"steering.beta={beta}: the softmax temperature is >= 0 (0 = argmax).")
        self.base, self.critic, self.k, self.beta, self.seed = base, critic, k, float(beta), seed
        self.critic_name = critic_name
        self.chunk = base.chunk
        self.chunker = ActionChunker(self.chunk, exec_horizon, ensemble, ensemble_temp)
        self.last_stats: dict[int, StepStats] = {}
        self.totals = SpreadTotals()
        self._warned_identical = False

    def reset(self, instruction: str, slot: int = 0, seed: int | None = None) -> None:
        super().reset(instruction, slot, seed)
        self.base.reset(instruction, slot, seed)
        self.chunker.reset(slot)
        self.last_stats.pop(slot, None)

    def fix_batch_rows(self, rows: int | None) -> None:
        """The base policy samples, and the critic encodes and scores, `rows` observations per call."""
        super().fix_batch_rows(rows)
        self.base.fix_batch_rows(rows)
        fix = getattr(self.critic, "fix_batch_rows", None)
        if fix is not None:
            fix(rows)

    def rank_batch(
        self, observations: Sequence[Observation], k: int, slots: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """K candidates per observation and their scores: (N, K, chunk, 7), (N, K) float64."""
        observations = [self._with_instruction(o, s) for o, s in zip(observations, slots, strict=True)]
        embed = getattr(self.critic, "embed_batch", None)
        emb = embed(observations) if embed is not None else None  # launched first: overlaps sampling on a GPU
        candidates = np.asarray(self.base.sample_actions_batch(observations, k, slots), np.float32)
        if candidates.shape != (len(slots), k, self.chunk, 7):
            raise ValueError(f"base policy returned {candidates.shape}, expected {(len(slots), k, self.chunk, 7)}")
        first = candidates[:, :, 0]  # V-GPS scores the first action of each chunk
        if getattr(self.critic, "episode_rngs", False):
            q = self.critic.score_batch(observations, first, [self.episode_stream(s, "random critic") for s in slots])
        elif emb is None:
            q = _to_numpy(self.critic.score_batch(observations, first))
        else:
            q = _to_numpy(self.critic.score_embedded(emb, first))
        if q.shape != (len(slots), k) or not np.isfinite(q).all():
            raise ValueError(f"the critic returned scores of shape {q.shape} (expected {(len(slots), k)}) or NaN")
        return candidates, q

    def steer_batch(self, observations: Sequence[Observation], slots: Sequence[int]) -> np.ndarray:
        """(N, chunk, 7): the chosen candidate chunk of each slot; records its StepStats."""
        candidates, q = self.rank_batch(observations, self.k, slots)
        chosen = np.array([choose(q[i], self.beta, self.episode_stream(s, "steering")) for i, s in enumerate(slots)])
        for i, slot in enumerate(slots):
            stats = StepStats(float(q[i].max()), float(q[i].min()), float(q[i].mean()), float(q[i].std()),
                              int(chosen[i]), float(q[i, chosen[i]]))  # fmt: skip
            self.last_stats[slot] = stats
            self.totals.add(stats)
            log.debug("steer slot %d: Q max %.4f min %.4f std %.4f, chose %d (Q %.4f)", slot, stats.q_max,
                      stats.q_min, stats.q_std, stats.chosen, stats.chosen_q)  # fmt: skip
        self._check_diversity(candidates)
        return candidates[np.arange(len(slots)), chosen]

    def act_batch(self, observations: Sequence[Observation], slots: Sequence[int] | None = None) -> np.ndarray:
        """(N, chunk, 7): steers the slots whose chunker asks for a new chunk, in one batch."""
        slots = list(range(len(observations))) if slots is None else list(slots)
        todo = [i for i, s in enumerate(slots) if self.chunker.needs_prediction(s)]
        if todo:
            chunks = self.steer_batch([observations[i] for i in todo], [slots[i] for i in todo])
            for i, chunk in zip(todo, chunks, strict=True):
                self.chunker.push(slots[i], chunk)
        return np.stack([self.chunker.next(s) for s in slots])

    def act(self, obs: Observation, slot: int = 0) -> np.ndarray:
        return self.act_batch([obs], [slot])[0]

    def sample_actions(self, obs: Observation, k: int, slot: int = 0) -> np.ndarray:
        return self.sample_actions_batch([obs], k, [slot])[0]

    def sample_actions_batch(
        self, observations: Sequence[Observation], k: int, slots: Sequence[int] | None = None
    ) -> np.ndarray:
        """(N, k, chunk, 7): the k best by Q of max(k, K) base candidates, best first (greedy, no beta)."""
        if k < 1:
            raise UserError(f"k={k}: a policy samples at least one action.")
        slots = list(range(len(observations))) if slots is None else list(slots)
        candidates, q = self.rank_batch(observations, max(k, self.k), slots)
        order = np.argsort(-q, axis=1, kind="stable")[:, :k]  # (N, k) indices of the best
        best = np.take_along_axis(candidates, order[:, :, None, None], axis=1)
        return np.stack([check_actions(b, k, self.chunk, "ValueSteeredPolicy") for b in best])

    def summary(self) -> dict[str, Any]:
        """K, beta, critic and the mean Q spread over every steering step so far (for run summaries)."""
        return {"k": self.k, "beta": self.beta, "critic": self.critic_name, **self.totals.summary()}

    def close(self) -> None:
        self.base.close()

    def _with_instruction(self, obs: Observation, slot: int) -> Observation:
        if obs.get("instruction"):
            return obs
        if slot not in self.instructions:
            raise UserError(f"No instruction for slot {slot}: call reset(instruction, slot) or set obs['instruction'].")
        return {**obs, "instruction": self.instructions[slot]}

    def _check_diversity(self, candidates: np.ndarray) -> None:
        """Warn once if the base policy gave K identical candidates: then steering cannot change anything."""
        if self._warned_identical or self.k == 1 or not (candidates[:, :1, 0] == candidates[:, :, 0]).all():
            return
        self._warned_identical = True
        log.warning("the base policy returned %d identical candidates: steering has nothing to choose from "
                    "(a VLA with temperature=0? a flow policy with noise_scale=0?)", self.k)  # fmt: skip


def _to_numpy(scores: Any) -> np.ndarray:
    if hasattr(scores, "detach"):  # a torch tensor, possibly on the GPU
        scores = scores.detach().float().cpu().numpy()
    return np.asarray(scores, dtype=np.float64)


def build_steered_policy(policy_cfg: Any, options: Any) -> ValueSteeredPolicy:
    """The policy of `policy_cfg` (make_policy) steered with `options`; the options are checked first."""
    options = check_steering(options)  # a missing critic fails before a large policy loads
    base = make_policy(policy_cfg)
    try:
        return make_steered_policy(base, options)
    except BaseException:
        base.close()
        raise


def make_steered_policy(base: Policy, options: Any) -> ValueSteeredPolicy:
    """Wrap `base` in V-GPS steering with `options` (a SteerConfig, its node, or a dict of its fields)."""
    cfg = check_steering(options)
    if cfg.critic == "random":
        critic: Scorer = RandomScorer(cfg.seed)
    elif _is_qsft(Path(cfg.critic)):
        from policies.qsft.policy import load_qsft_critic

        critic = load_qsft_critic(cfg.critic, cfg.qsft_mode, cfg.device, cfg.dataset)
    else:
        from policies.learned import resolve_device
        from values.critic import load_critic

        critic = load_critic(cfg.critic, resolve_device(cfg.device), cfg.params, cfg.dataset, cfg.bf16, cfg.cuda_graphs,
                             cfg.overlap)  # fmt: skip
    log.info("steering with critic %s: K=%d, beta=%g", cfg.critic, cfg.k, cfg.beta)
    return ValueSteeredPolicy(base, critic, cfg.k, cfg.beta, cfg.seed, cfg.exec_horizon, cfg.ensemble,
                              cfg.ensemble_temp, critic_name=cfg.critic)  # fmt: skip


def check_steering(options: Any) -> Any:
    """Validated steering options (a SteerConfig node), checked before any model loads.

    `critic` becomes the resolved checkpoint directory (or "random"); an unknown option, a missing
    critic or a bad k / beta / params is a UserError naming the fix.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, ValidationError

    from configs.checkpoint import resolve_checkpoint
    from policies.config import SteerConfig

    try:
        cfg = OmegaConf.merge(OmegaConf.structured(SteerConfig), options or {})
    except ConfigKeyError as err:
        known = ", ".join(SteerConfig.__dataclass_fields__)
        raise UserError(f"Unknown steering option steering.{err.full_key}; known: {known}.") from None
    except ValidationError as err:
        raise UserError(f"Bad steering option steering.{err.full_key}: {err.msg.splitlines()[0]}") from None
    if not cfg.critic:
        raise UserError(
            "steer=true needs a critic: steering.critic=<run dir of train_value.py> (or a checkpoint directory; "
            "steering.critic=random for the random-critic sanity check)."
        )
    if cfg.k < 1:
        raise UserError(f"steering.k={cfg.k}: steering needs at least one candidate (V-GPS: k=10).")
    if cfg.beta < 0:
        raise UserError(f"steering.beta={cfg.beta}: use beta >= 0 (0 = argmax, > 0 = softmax(Q / beta)).")
    if cfg.params not in ("target", "online"):
        raise UserError(f"steering.params={cfg.params!r}: choose target (V-GPS) or online.")
    if cfg.critic != "random":
        try:
            path = resolve_checkpoint(cfg.critic)
        except UserError as err:
            raise UserError(f"steering.critic={cfg.critic}: {err}") from None
        if not (path / "language.json").is_file() and not _is_qsft(path):
            raise UserError(f"steering.critic={cfg.critic}: {path} is neither a critic checkpoint of train_value.py "
                            "(language.json beside the weights) nor a Q-SFT checkpoint of train_qsft.py.")  # fmt: skip
        cfg.critic = str(path)
    if cfg.qsft_mode not in ("p_theta", "ratio"):
        raise UserError(f"steering.qsft_mode={cfg.qsft_mode!r}: choose p_theta or ratio.")
    return cfg


def _is_qsft(path: Path) -> bool:
    """A train_qsft.py checkpoint directory (its meta.json names the qsft policy)."""
    import json

    meta = path / "meta.json"
    return meta.is_file() and json.loads(meta.read_text()).get("policy") == "qsft"
