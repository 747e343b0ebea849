"""V-GPS steering (policies/steering.py): choice rules, statistics, batching, chunks, options, contract."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from configs.errors import UserError
from data.normalize import dataset_statistics
from policies.base import Observation, Policy, make_policy
from policies.steering import RandomScorer, ValueSteeredPolicy, choose, make_steered_policy
from tests.policies.conftest import contract_config, fake_stats, observation, tiny_checkpoint
from values.config import EncoderConfig, ValueConfig
from values.critic import CriticScorer, random_critic

STEP = 0.001  # candidate j moves dx = STEP * j


class Candidates(Policy):
    """K deterministic candidate chunks: candidate j has dx = STEP * j on every row, row r has dz = 0.01 r.

    `same=True` returns K identical candidates (a greedy VLA, say).
    """

    def __init__(self, chunk: int = 2, same: bool = False) -> None:
        super().__init__()
        self.chunk, self.same, self.calls = chunk, same, 0

    def sample_actions(self, obs: Observation, k: int, slot: int = 0) -> np.ndarray:
        self.calls += 1
        a = np.zeros((k, self.chunk, 7), np.float32)
        a[:, :, 0] = 0.0 if self.same else STEP * np.arange(k)[:, None]
        a[:, :, 2] = 0.01 * np.arange(self.chunk)[None]
        a[:, :, 6] = 1.0
        return a


class FakeCritic:
    """Scores = fn(first actions (N, K, 7)) -> (N, K); records the shapes it was called with."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        self.fn, self.calls = fn, []

    def score_batch(self, observations: Sequence[Observation], actions: np.ndarray) -> torch.Tensor:
        self.calls.append(actions.shape)
        return torch.as_tensor(self.fn(actions))


def by_index(values: Sequence[float]) -> FakeCritic:
    """Candidate j (dx = STEP * j) scores values[j]."""
    table = np.asarray(values, np.float64)
    return FakeCritic(lambda a: table[np.rint(a[..., 0] / STEP).astype(int)])


def obs(seed: int = 0, instruction: str = "reach forward") -> Observation:
    return observation(seed, instruction, size=32)


def tiny_critic(stats: dict | None = None, seed: int = 0, proprio: bool = False) -> CriticScorer:
    """An untrained FiLM-ResNet critic at 32 px (resnet10t, heads [16, 16]); `proprio`: it reads the state."""
    cfg = ValueConfig(algo="calql", encoder=EncoderConfig(arch="resnet10t"), hidden=[16, 16], proprio=proprio)
    return random_critic(cfg, stats or fake_stats()["sim"], image_size=32, seed=seed)


def chosen_index(chunk: np.ndarray) -> int:
    return int(np.rint(chunk[0, 0] / STEP))


# --- choosing --------------------------------------------------------------------------------------


def test_argmax_executes_the_whole_chunk_of_the_highest_q_candidate() -> None:
    q = [0.3, -1.0, 2.5, 2.4, 0.0]
    critic = by_index(q)
    policy = ValueSteeredPolicy(Candidates(chunk=3), critic, k=5, beta=0.0)
    policy.reset("reach forward")
    chunk = policy.act(obs())
    assert chunk.shape == (3, 7) and chosen_index(chunk) == 2
    np.testing.assert_allclose(chunk[:, 2], [0.0, 0.01, 0.02])  # every row of the chosen chunk, in order
    assert critic.calls == [(1, 5, 7)]  # the first action of each chunk, scored in one call
    stats = policy.last_stats[0]
    assert (stats.chosen, stats.chosen_q, stats.spread) == (2, 2.5, pytest.approx(3.5))
    assert stats.q_std == pytest.approx(np.std(q))
    summary = policy.summary()
    assert summary["k"] == 5 and summary["beta"] == 0.0 and summary["steps"] == 1
    assert summary["mean_q_spread"] == pytest.approx(3.5) and summary["mean_chosen_advantage"] == pytest.approx(
        2.5 - np.mean(q)
    )


def test_softmax_sampling_frequencies_match_softmax_q_over_beta() -> None:
    q, beta, n = np.array([0.0, 0.5, 1.0, 2.0]), 0.7, 6000
    policy = ValueSteeredPolicy(Candidates(chunk=1), by_index(q), k=4, beta=beta, seed=3)
    policy.reset("reach forward")
    o = obs()
    picks = np.array([chosen_index(policy.act(o)) for _ in range(n)])
    freq = np.bincount(picks, minlength=4) / n
    expected = np.exp(q / beta) / np.exp(q / beta).sum()
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) < 4 * sigma), (freq, expected)
    # the same seed draws the same sequence
    again = ValueSteeredPolicy(Candidates(chunk=1), by_index(q), k=4, beta=beta, seed=3)
    again.reset("reach forward")
    assert [chosen_index(again.act(obs())) for _ in range(50)] == picks[:50].tolist()


def test_small_beta_is_argmax() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        q = rng.normal(size=8) * 1e-2
        assert choose(q, 1e-7, rng) == choose(q, 0.0, rng) == int(np.argmax(q))


def test_random_critic_picks_candidates_uniformly() -> None:
    policy = ValueSteeredPolicy(Candidates(chunk=1), RandomScorer(seed=1), k=5, beta=0.0)
    policy.reset("reach forward")
    o = obs()
    freq = np.bincount([chosen_index(policy.act(o)) for _ in range(2000)], minlength=5) / 2000
    np.testing.assert_allclose(freq, 0.2, atol=0.04)


@pytest.mark.parametrize("critic", ["random", "softmax"])
def test_a_steered_episode_draws_from_its_seed_whatever_its_batch(critic: str) -> None:
    """The candidates, a random critic's scores and the softmax draw all come from the episode's seed:
    episode 7 chooses the same chunks batched next to another episode as alone in another slot."""
    from policies.base import RandomPolicy

    def steered() -> ValueSteeredPolicy:
        scorer = RandomScorer(seed=3) if critic == "random" else FakeCritic(lambda a: 100 * a[..., 0])
        return ValueSteeredPolicy(RandomPolicy(seed=2), scorer, k=6, beta=0.0 if critic == "random" else 1.0)

    a, b = steered(), steered()
    a.reset("reach forward", 0, seed=7)
    a.reset("go", 1, seed=8)
    b.reset("reach forward", 5, seed=7)
    o, other = obs(), obs()
    batched = [a.act_batch([o, other], [0, 1])[0] for _ in range(5)]
    alone = [b.act_batch([o], [5])[0] for _ in range(5)]
    np.testing.assert_array_equal(np.stack(batched), np.stack(alone))
    assert len({c.tobytes() for c in batched}) == 5


def test_sample_actions_returns_the_top_k_by_q_best_first() -> None:
    policy = ValueSteeredPolicy(Candidates(chunk=2), by_index([0.1, 0.9, 0.5, 0.7, 0.3]), k=5, beta=1.0)
    policy.reset("reach forward")
    best = policy.sample_actions(obs(), 3)
    assert best.shape == (3, 2, 7) and [chosen_index(c) for c in best] == [1, 3, 2]
    # more than K asks the base for that many candidates
    policy = ValueSteeredPolicy(Candidates(chunk=2), by_index([0.1, 0.9, 0.5, 0.7, 0.3, 0.0, 0.2]), k=5)
    assert policy.sample_actions(obs(), 7).shape == (7, 2, 7)
    assert policy.summary()["steps"] == 0  # ranking is not a control step


def test_bad_scores_and_options_are_loud() -> None:
    nan = FakeCritic(lambda a: np.full(a.shape[:2], np.nan))
    policy = ValueSteeredPolicy(Candidates(), nan, k=3)
    policy.reset("go")
    with pytest.raises(ValueError, match="NaN"):
        policy.act(obs())
    with pytest.raises(UserError, match=r"steering\.k=0"):
        ValueSteeredPolicy(Candidates(), nan, k=0)
    with pytest.raises(UserError, match=r"steering\.beta=-1"):
        ValueSteeredPolicy(Candidates(), nan, beta=-1)
    with pytest.raises(UserError, match="No instruction for slot 2"):
        ValueSteeredPolicy(Candidates(), nan).act({"image_primary": np.zeros((8, 8, 3), np.uint8)}, slot=2)


def test_identical_candidates_are_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    policy = ValueSteeredPolicy(Candidates(same=True), by_index([1.0]), k=4)
    policy.reset("go")
    with caplog.at_level(logging.WARNING):
        policy.act(obs())
        policy.act(obs())
    assert caplog.text.count("4 identical candidates") == 1


# --- batching and slots ------------------------------------------------------------------------------


def test_slots_are_batched_and_independent() -> None:
    """One base call and one critic call for N slots; slot 0's draws do not depend on slot 1."""
    q = np.linspace(0, 1, 6)
    both = ValueSteeredPolicy(Candidates(chunk=1), by_index(q), k=6, beta=0.5, seed=7)
    alone = ValueSteeredPolicy(Candidates(chunk=1), by_index(q), k=6, beta=0.5, seed=7)
    both.reset("reach forward", 0)
    both.reset("go", 1)
    alone.reset("reach forward", 0)
    for step in range(30):
        pair = both.act_batch([obs(step), obs(step, "go")], [0, 1])
        single = alone.act_batch([obs(step)], [0])
        assert pair.shape == (2, 1, 7)
        np.testing.assert_array_equal(pair[0], single[0])
    assert both.base.calls == 30 * 2 and both.critic.calls == [(2, 6, 7)] * 30  # the base loops over slots
    assert set(both.last_stats) == {0, 1} and set(alone.last_stats) == {0}
    assert both.summary()["steps"] == 60


def test_image_and_instruction_are_encoded_once_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """One encoder pass per step over the N observations (before the policy samples), one heads pass over N * K."""
    critic = tiny_critic()
    base = make_policy(contract_config("random", Path(".")))
    events, texts = [], []
    embed, heads, encode = critic.critic.embed, critic.critic.heads.forward, critic.language.encoder.embed
    sample = base.sample_actions_batch
    monkeypatch.setattr(critic.critic, "embed", lambda im, *rest: events.append(("embed", len(im))) or embed(im, *rest))
    monkeypatch.setattr(critic.critic.heads, "forward", lambda x: events.append(("heads", len(x))) or heads(x))
    monkeypatch.setattr(critic.language.encoder, "embed", lambda t: texts.extend(t) or encode(t))
    monkeypatch.setattr(base, "sample_actions_batch", lambda o, k, s: events.append(("sample", k)) or sample(o, k, s))
    policy = ValueSteeredPolicy(base, critic, k=7)
    policy.reset("reach forward", 0)
    policy.reset("go", 1)
    for step in range(3):
        policy.act_batch([obs(step), obs(step, "go")], [0, 1])
    # the encoder is launched before the policy samples (on a GPU they overlap), never per candidate
    assert events == [("embed", 2), ("sample", 7), ("heads", 2 * 7)] * 3
    assert sorted(texts) == ["go", "reach forward"]  # each instruction embedded once, then cached


def test_batched_scores_equal_one_by_one_scores() -> None:
    critic = tiny_critic()
    actions = np.random.default_rng(0).normal(0, 0.01, (2, 5, 7)).astype(np.float32)
    batch = critic.score_batch([obs(0), obs(1, "go")], actions)
    singles = torch.stack([critic.score(o, a) for o, a in zip([obs(0), obs(1, "go")], actions, strict=True)])
    torch.testing.assert_close(batch, singles, rtol=1e-5, atol=1e-5)


def scores_in_batches(critic: Any, target: Observation, actions: np.ndarray) -> list[np.ndarray]:
    """The target's scores alone, second of two (next to a longer instruction) and fourth of five
    (batches of 3, the last one padded)."""
    out = []
    for position, n, text in ((0, 1, "go"), (1, 2, "put the red cube on the green cube"), (3, 5, "go")):
        batch = [obs(40 + n + j, text) for j in range(n)]
        batch[position] = target
        rows = np.random.default_rng(n).normal(0, 0.01, (n, len(actions), 7)).astype(np.float32)
        rows[position] = actions
        out.append(np.asarray(critic.score_batch(batch, rows))[position])
    return out


@pytest.mark.parametrize("kind", ["film_resnet", "film_resnet_proprio", "qsft"])
def test_with_fixed_batch_rows_scores_are_bit_identical_whatever_the_batch(kind: str, tmp_path: Path) -> None:
    if kind == "qsft":
        from policies.qsft.policy import load_qsft_critic
        from tests.qsft.helpers import tiny_qsft_checkpoint

        critic = load_qsft_critic(tiny_qsft_checkpoint(tmp_path / "qsft"), "ratio", device="cpu")
    else:
        critic = tiny_critic(proprio=kind.endswith("proprio"))  # proprio: the states are padded with the rest
    rows: list[int] = []  # the batch size of every network call
    if kind == "qsft":
        score = critic.model.score
        critic.model.score = lambda images, *a: rows.append(len(images)) or score(images, *a)
    else:
        run = critic._run
        critic._run = lambda fn, *inputs: rows.append(len(inputs[0])) or run(fn, *inputs)
    target = dict(obs(0), instruction="reach forward")
    actions = np.random.default_rng(0).normal(0, 0.01, (6, 7)).astype(np.float32)
    free = scores_in_batches(critic, target, actions)
    assert set(rows) == {1, 2, 5}
    rows.clear()
    critic.fix_batch_rows(3)
    fixed = scores_in_batches(critic, target, actions)
    assert set(rows) == {3}
    for scores in fixed[1:]:
        np.testing.assert_array_equal(scores, fixed[0])
    np.testing.assert_allclose(free[0], fixed[0], rtol=1e-5, atol=1e-5)


def test_steering_fixes_the_batch_rows_of_its_policy_and_critic() -> None:
    from policies.base import RandomPolicy

    base, critic = RandomPolicy(), tiny_critic()
    steered = ValueSteeredPolicy(base, critic, k=4, beta=0.0)
    steered.fix_batch_rows(4)
    assert steered.batch_rows == base.batch_rows == critic.batch_rows == 4
    steered.fix_batch_rows(None)
    assert steered.batch_rows is base.batch_rows is critic.batch_rows is None
    ValueSteeredPolicy(RandomPolicy(), by_index([0.0] * 4), k=4, beta=0.0).fix_batch_rows(2)  # a critic without it


# --- normalisation -----------------------------------------------------------------------------------


class PeakAtZero(torch.nn.Module):
    """Q heads that prefer the normalised dx closest to 0: Q = -dx_norm^2 (dx sits after the F embedding dims)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -(x[None, :, self.features : self.features + 1] ** 2)  # (E=1, rows, 1)


def centred_stats(centre: float) -> dict:
    """Statistics of actions whose dx is uniform in centre +- 0.01 (others: cm-scale noise)."""
    rng = np.random.default_rng(0)
    actions = rng.normal(0, 0.01, (2000, 7))
    actions[:, 0] = centre + rng.uniform(-0.01, 0.01, 2000)
    actions[:, 6] = rng.integers(0, 2, 2000)
    return dataset_statistics(actions, rng.normal(size=(2000, 7)), 10)


def test_scoring_normalises_with_the_critics_statistics_not_the_policys() -> None:
    """The same candidates and the same critic weights: the choice follows the critic's statistics.

    Candidates have dx = -0.01 ... 0.03; the critic prefers the action at the centre of *its* data.
    V-GPS's released code re-scales queries with other bounds than the critic trained with; with the
    base policy's statistics (centred at 0.01) the choice would be dx = 0.01, which neither critic picks.
    """

    class Spread(Candidates):
        def sample_actions(self, obs: Observation, k: int, slot: int = 0) -> np.ndarray:
            a = super().sample_actions(obs, k, slot)
            a[:, :, 0] = -0.01 + 0.01 * np.arange(k)[:, None]
            return a

    picks = {}
    for centre in (0.0, 0.02, "policy"):
        critic = tiny_critic(centred_stats(0.01 if centre == "policy" else centre))
        critic.critic.heads = PeakAtZero(critic.critic.encoder.out_dim)
        steered = ValueSteeredPolicy(Spread(), critic, k=5, beta=0.0)
        steered.reset("reach forward")
        picks[centre] = round(float(steered.act(obs())[0, 0]), 6)
    assert picks == {0.0: 0.0, 0.02: 0.02, "policy": 0.01}


# --- chunks --------------------------------------------------------------------------------------------


def test_receding_horizon_steers_every_exec_horizon_steps() -> None:
    critic = by_index([0.0, 1.0, 0.5])
    every = ValueSteeredPolicy(Candidates(chunk=4), critic, k=3, beta=0.0)
    every.reset("go")
    for _ in range(4):
        np.testing.assert_allclose(every.act(obs())[:, 2], [0.0, 0.01, 0.02, 0.03])  # a fresh chunk each step
    assert len(critic.calls) == 4
    critic = by_index([0.0, 1.0, 0.5])
    two = ValueSteeredPolicy(Candidates(chunk=4), critic, k=3, beta=0.0, exec_horizon=2)
    two.reset("go")
    rows = [two.act(obs())[:, 2] for _ in range(4)]
    np.testing.assert_allclose(rows[1], [0.01, 0.02, 0.03, 0.03])  # the rest of the chunk, last action repeated
    assert len(critic.calls) == 2 and chosen_index(two.act(obs())) == 1


def test_ensembling_averages_the_chosen_chunks() -> None:
    policy = ValueSteeredPolicy(Candidates(chunk=3), by_index([0.0, 1.0]), k=2, beta=0.0, ensemble=True)
    policy.reset("go")
    first, second = policy.act(obs()), policy.act(obs())
    assert first[0, 2] == 0.0 and second[0, 2] == pytest.approx((0.01 + 0.0) / 2)  # row 1 of #1, row 0 of #2


# --- options and the contract ------------------------------------------------------------------------


def test_steering_options_fail_with_the_fix(tmp_path: Path) -> None:
    base = Candidates()
    with pytest.raises(UserError, match=r"steering.critic=<run dir of train_value.py>"):
        make_steered_policy(base, {})
    with pytest.raises(UserError, match=r"Unknown steering option steering\.temperature; known: critic, k, beta"):
        make_steered_policy(base, {"critic": "random", "temperature": 1})
    with pytest.raises(UserError, match=r"steering.critic=.*nowhere: No checkpoint at"):
        make_steered_policy(base, {"critic": str(tmp_path / "nowhere")})
    policy_ckpt = tiny_checkpoint("flow", tmp_path / "flow")
    with pytest.raises(UserError, match=r"is neither a critic checkpoint of train_value\.py"):
        make_steered_policy(base, {"critic": str(policy_ckpt)})
    with pytest.raises(UserError, match=r"steering\.k=0"):
        make_steered_policy(base, {"critic": "random", "k": 0})
    with pytest.raises(UserError, match=r"steering\.k: Value 'many'"):
        make_steered_policy(base, {"critic": "random", "k": "many"})
    with pytest.raises(UserError, match=r"steering\.params='best'"):
        make_steered_policy(base, OmegaConf.create({"critic": "random", "params": "best"}))
    steered = make_steered_policy(base, {"critic": "random", "k": 3, "beta": 0})
    assert (steered.k, steered.beta, steered.critic_name) == (3, 0.0, "random")


@pytest.mark.parametrize("name", ["random", "flow"])
@pytest.mark.parametrize("critic", ["network", "random"])
def test_steered_policies_keep_the_policy_contract(name: str, critic: str, tmp_path: Path) -> None:
    def build() -> ValueSteeredPolicy:
        scorer = tiny_critic() if critic == "network" else RandomScorer()
        return ValueSteeredPolicy(make_policy(contract_config(name, tmp_path)), scorer, k=4, beta=1.0)

    a, b = build(), build()
    c = a.chunk
    for policy in (a, b):
        policy.reset("reach forward", 0)
        policy.reset("go", 1)
    o0 = obs(0)
    for policy in (a, b):  # the same calls on both: they hold the same random state after
        for actions, shape in [
            (policy.sample_actions(o0, 5), (5, c, 7)),
            (policy.act(o0), (c, 7)),
            (policy.sample_actions_batch([o0, obs(1, "go")], 3, [0, 1]), (2, 3, c, 7)),
        ]:
            assert actions.shape == shape and actions.dtype == np.float32 and np.isfinite(actions).all()
    # slot 0 does not depend on slot 1's observation (same seeds, same call sequence)
    first_a = a.act_batch([o0, obs(1, "go")], [0, 1])
    first_b = b.act_batch([o0, obs(2, "go")], [0, 1])
    np.testing.assert_allclose(first_a[0], first_b[0], rtol=1e-5, atol=1e-6)
    a.close()


@pytest.mark.parametrize("mode", ["p_theta", "ratio"])
def test_a_qsft_checkpoint_steers_another_policy(mode: str, tmp_path: Path) -> None:
    from policies.qsft.policy import load_qsft_critic
    from tests.qsft.helpers import tiny_qsft_checkpoint

    ckpt = tiny_qsft_checkpoint(tmp_path / "qsft")
    steered = make_steered_policy(Candidates(chunk=1), {"critic": str(ckpt), "k": 6, "beta": 0, "qsft_mode": mode,
                                                        "device": "cpu"})  # fmt: skip
    steered.reset("reach forward")
    o = obs(0)
    chunk = steered.act(o)
    candidates = Candidates(chunk=1).sample_actions(o, 6)[:, 0]
    q = load_qsft_critic(ckpt, mode, device="cpu").score(dict(o, instruction="reach forward"), candidates).numpy()
    assert chosen_index(chunk) == int(np.argmax(q))
    np.testing.assert_allclose(steered.last_stats[0].q_max, q.max(), rtol=1e-5)
    with pytest.raises(UserError, match=r"steering\.qsft_mode='best'"):
        make_steered_policy(Candidates(), {"critic": str(ckpt), "qsft_mode": "best"})
