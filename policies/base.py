"""The Policy contract (DESIGN.md) and the policy registry.

    policy.reset(instruction)                       start an episode
    policy.sample_actions(obs, k) -> (k, chunk, 7)   k candidate action chunks, canonical actions
    policy.act(obs) -> (chunk, 7)                    the chunk to execute now

Whoever runs a policy executes `act(obs)[0]` at each control step and calls `act` again at the
next one; a policy that wants to execute a whole chunk keeps a queue inside and returns what is
left of it (history windows, chunk queues and temporal ensembling all live inside the policy).
`obs` is DESIGN.md's observation dict: `image_primary` uint8 (H, W, 3), optional `image_wrist`,
optional `state` (7,) float32, `instruction` str; simulators may add `privileged` (their true
state, for scripted experts).

Batched evaluation runs N episodes at once in *slots* 0..N-1: `reset(instruction, slot=i, seed=s)`,
`act_batch(observations, slots) -> (N, chunk, 7)` and
`sample_actions_batch(observations, k, slots) -> (N, k, chunk, 7)`. The base class implements
them with loops over the single-episode methods; GPU policies override them with one forward pass.

Randomness is per episode: a policy draws every random number of a slot's episode from that slot's
own generators (`episode_stream`), seeded from the policy's `seed` and the episode `seed` given to
`reset` (the simulator's episode seed in evaluations). So an episode's draws do not depend on which
slot runs it or on which other slots share its batches. Without an episode seed, each reset of a
slot starts the next of that slot's own streams.

Rounding is per batch shape: a batched model's kernels round differently at different batch sizes,
and a simulator amplifies a difference of 1e-7 into another episode within tens of steps.
`fix_batch_rows(rows)` makes a policy run every batched forward on exactly `rows` rows (padding with
copies of the first observation, whose results and draws are thrown away), so that a row's result
depends on nothing but its own observation and episode. The runner fixes it to its worker count
(how close async runs then come to bit-identical replays: docs/sim.md).

This module imports NumPy only: remote clients and servers are Policies too.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from configs.errors import UserError
from configs.registry import Registry

Observation = dict[str, Any]
ACTION_DIM = 7


class Policy(ABC):
    """Base class of every policy; subclasses implement `sample_actions` (and usually `reset`)."""

    #: Actions per chunk returned by `act` / `sample_actions`.
    chunk: int = 1
    #: Mixed into every episode's random streams (`policy.seed` in the configs).
    seed: int = 0
    #: Every batched forward runs on exactly this many rows (None: on the rows given); `fix_batch_rows`.
    batch_rows: int | None = None

    def __init__(self) -> None:
        self.instructions: dict[int, str] = {}
        self._episodes: dict[int, tuple[int, tuple[int, ...]]] = {}  # slot -> (resets so far, entropy)
        self._streams: dict[tuple[int, str], tuple[int, Any]] = {}  # (slot, stream) -> (episode, generator)

    def reset(self, instruction: str, slot: int = 0, seed: int | None = None) -> None:
        """Start a new episode in `slot`; clears that slot's history. `seed` (the episode's: the
        simulator seed in evaluations) fixes the random numbers the policy draws in the episode."""
        if seed is not None and not 0 <= int(seed) < 2**63:
            raise ValueError(f"episode seed {seed} is outside [0, 2**63)")
        self.instructions[slot] = instruction
        count = self._episodes.get(slot, (0, ()))[0] + 1
        self._episodes[slot] = (count, (1, int(seed)) if seed is not None else (0, slot, count))

    def episode_stream(self, slot: int, stream: str, make: Callable[[int], Any] = np.random.default_rng) -> Any:
        """The generator of random stream `stream` (a name) in the slot's current episode.

        Built by `make(seed)` (NumPy's by default; a torch.Generator for GPU policies) at the episode's
        first draw, from a 64-bit seed that depends only on the policy's `seed`, the stream's name and
        the episode seed given to `reset`; later calls in the episode return the same generator.
        """
        count, entropy = self._episodes.get(slot, (0, (0, slot, 0)))
        cached = self._streams.get((slot, stream))
        if cached is None or cached[0] != count:
            words = np.random.SeedSequence([int(self.seed) % 2**63, zlib.crc32(stream.encode()), *entropy])
            cached = self._streams[(slot, stream)] = (count, make(int(words.generate_state(1, np.uint64)[0])))
        return cached[1]

    def fix_batch_rows(self, rows: int | None) -> None:
        """Run every batched forward on exactly `rows` rows from now on (None: on the rows given).

        A batched model pads smaller batches with copies of their first observation and splits larger
        ones, so that a row's floating-point result does not depend on how many observations share its
        call. Policies without a batched model (their rows never interact) keep the setting and ignore it.
        """
        if rows is not None and int(rows) < 1:
            raise ValueError(f"batch rows must be >= 1 or None, got {rows}")
        self.batch_rows = None if rows is None else int(rows)

    @abstractmethod
    def sample_actions(self, obs: Observation, k: int, slot: int = 0) -> np.ndarray:
        """(k, chunk, 7) float32 candidate action chunks for `obs`, canonical actions."""

    def act(self, obs: Observation, slot: int = 0) -> np.ndarray:
        """(chunk, 7) float32: the chunk to execute; the caller executes its first action."""
        return self.sample_actions(obs, 1, slot)[0]

    def sample_actions_batch(
        self, observations: Sequence[Observation], k: int, slots: Sequence[int] | None = None
    ) -> np.ndarray:
        """(N, k, chunk, 7) for N observations of N slots."""
        slots = range(len(observations)) if slots is None else slots
        return np.stack([self.sample_actions(o, k, s) for o, s in zip(observations, slots, strict=True)])

    def act_batch(self, observations: Sequence[Observation], slots: Sequence[int] | None = None) -> np.ndarray:
        """(N, chunk, 7) for N observations of N slots."""
        slots = range(len(observations)) if slots is None else slots
        return np.stack([self.act(o, s) for o, s in zip(observations, slots, strict=True)])

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release resources (servers, connections, worker processes)."""


def fixed_batches(n: int, rows: int | None) -> list[tuple[list[int], int]]:
    """How to run n rows in batches of exactly `rows` (None: one batch of all n): per batch, the input
    row of each batch row and how many of them are real. The real rows come first; filler rows repeat
    the batch's first row. Index a list, array or tensor with the indices; keep the first `real` results."""
    if rows is None:
        return [(list(range(n)), n)]
    return [([*range(i, min(i + rows, n)), *[i] * max(0, i + rows - n)], min(rows, n - i)) for i in range(0, n, rows)]


def check_actions(actions: np.ndarray, k: int, chunk: int, who: str = "policy") -> np.ndarray:
    """Validate a (k, chunk, 7) result: shape, finiteness; returns it as float32."""
    actions = np.asarray(actions, dtype=np.float32)
    if actions.shape != (k, chunk, ACTION_DIM):
        raise ValueError(f"{who} returned actions of shape {actions.shape}, expected {(k, chunk, ACTION_DIM)}")
    if not np.isfinite(actions).all():
        raise ValueError(f"{who} returned NaN or infinite actions")
    return actions


# A factory builds a policy from its config node (a dict-like with at least `name`).
PolicyFactory = Callable[[Any], Policy]
POLICIES: Registry[PolicyFactory] = Registry("policy")


def make_policy(cfg: Any) -> Policy:
    """Build the policy named by `cfg.name` from its config."""
    if cfg is None or "name" not in cfg:
        raise UserError("The policy config has no `name`; choose one with policy=<name>.")
    skipped = _import_policy_modules(until=cfg.name)
    if cfg.name not in POLICIES and skipped:
        missing = ", ".join(f"{m} (needs {p})" for m, p in skipped.items())
        raise UserError(f"{POLICIES.unknown_message(cfg.name)} Not importable in this environment: {missing}.")
    return POLICIES.get(cfg.name)(cfg)


# Modules that register policies; imported on demand so that light processes stay light.
POLICY_MODULES: list[str] = [
    "policies.vla",
    "policies.flow",
    "policies.qsft.policy",
    "sim.experts",
    "policies.openvla.policy",
]
# The numpy-only ones are imported first, so that `make_policy` finds them in Octo's environment
# without touching the torch ones.
LIGHT_POLICY_MODULES: list[str] = ["policies.remote", "policies.octo"]
_FIRST_PARTY = ("configs", "data", "values", "policies", "sim", "real_robot")


def _import_policy_modules(until: str | None = None) -> dict[str, str]:
    """Import the registering modules: all of them, or (`make_policy`) only until `until` is registered.

    In the second mode a module whose third-party dependency is missing (torch, in Octo's
    environment) is skipped; the result maps each skipped module to the missing package.
    """
    import importlib

    skipped: dict[str, str] = {}
    for module in [*LIGHT_POLICY_MODULES, *POLICY_MODULES]:
        if until is not None and until in POLICIES:
            break
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if until is None or (err.name or "").split(".")[0] in _FIRST_PARTY:
                raise
            skipped[module] = err.name or "?"
    return skipped


class RandomPolicy(Policy):
    """Uniform random canonical actions: arm deltas in +-limits, gripper open or closed."""

    def __init__(self, translation: float = 0.02, rotation: float = 0.1, chunk: int = 1, seed: int = 0) -> None:
        super().__init__()
        self.chunk, self.seed = chunk, seed
        self.limits = np.array([translation] * 3 + [rotation] * 3, dtype=np.float32)

    def sample_actions(self, obs: Observation, k: int, slot: int = 0) -> np.ndarray:
        rng = self.episode_stream(slot, "random")
        arm = rng.uniform(-1, 1, (k, self.chunk, 6)).astype(np.float32) * self.limits
        gripper = rng.integers(0, 2, (k, self.chunk, 1)).astype(np.float32)
        return np.concatenate([arm, gripper], axis=-1)


@POLICIES.register("random")
def _random(cfg: Any) -> Policy:
    return RandomPolicy(cfg.translation, cfg.rotation, cfg.chunk, cfg.seed)
