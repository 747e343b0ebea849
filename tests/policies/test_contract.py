"""The Policy contract, for every registered policy (tests/policies/conftest.py builds tiny configs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from configs.errors import UserError
from policies.base import POLICIES, RandomPolicy, _import_policy_modules, fixed_batches, make_policy
from policies.learned import checkpoint_policy_name, dataset_stats
from policies.text import pad_ids
from tests.policies.conftest import contract_config, fake_stats, observation, tiny_checkpoint, tiny_model_config

_import_policy_modules()
NAMES = POLICIES.names()


def test_the_project_policies_are_registered() -> None:
    assert {"random", "vla", "flow"} <= set(NAMES)


def check(actions: np.ndarray, shape: tuple[int, ...]) -> None:
    assert actions.shape == shape and actions.dtype == np.float32 and np.isfinite(actions).all()


@pytest.mark.parametrize("name", NAMES)
def test_shapes_dtypes_and_finiteness(name: str, tmp_path: Path) -> None:
    policy = make_policy(contract_config(name, tmp_path))
    c = policy.chunk
    policy.reset("reach forward", slot=0)
    policy.reset("go", slot=1)
    o0, o1 = observation(0), observation(1, "go")
    check(policy.sample_actions(o0, 5), (5, c, 7))
    check(policy.sample_actions(o0, 1), (1, c, 7))
    check(policy.act(o0), (c, 7))
    check(policy.act_batch([o0, o1], [0, 1]), (2, c, 7))
    check(policy.sample_actions_batch([o0, o1], 3, [0, 1]), (2, 3, c, 7))
    policy.close()


@pytest.mark.parametrize("name", NAMES)
def test_slots_are_independent(name: str, tmp_path: Path) -> None:
    """Slot 0's actions do not depend on slot 1's observation, instruction or resets (same seed)."""
    cfg = contract_config(name, tmp_path)
    a, b = make_policy(cfg), make_policy(cfg)
    for policy in (a, b):
        policy.reset("reach forward", slot=0)
        policy.reset("go", slot=1)
    o0 = observation(0)
    first_a = a.sample_actions_batch([o0, observation(1, "go")], 3, [0, 1])
    first_b = b.sample_actions_batch([o0, observation(2, "go")], 3, [0, 1])
    np.testing.assert_allclose(first_a[0], first_b[0], rtol=1e-5, atol=1e-6)
    b.reset("a much longer instruction for the second slot", slot=1)
    act_a = a.act_batch([o0, observation(1, "go")], [0, 1])
    act_b = b.act_batch([o0, observation(3, "a much longer instruction for the second slot")], [0, 1])
    np.testing.assert_allclose(act_a[0], act_b[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_an_episode_draws_from_its_seed_whatever_its_slot_and_batch(name: str, tmp_path: Path) -> None:
    """Episode seed 11 gives the same candidates batched in slot 0 next to another episode as alone in
    slot 3 of another instance that ran other episodes there first, over two calls (the sim runner's
    batches depend on timing); resetting with the same seed draws the same again."""
    cfg = contract_config(name, tmp_path)
    a, b = make_policy(cfg), make_policy(cfg)
    a.reset("reach forward", 0, seed=11)
    a.reset("go", 1, seed=12)
    b.reset("go", 3, seed=5)
    b.sample_actions_batch([observation(2, "go")], 2, [3])
    b.reset("reach forward", 3, seed=11)
    o, other = observation(0), observation(1, "go")
    first = a.sample_actions_batch([o, other], 3, [0, 1])[0], a.sample_actions_batch([o, other], 3, [0, 1])[0]
    alone = b.sample_actions_batch([o], 3, [3])[0], b.sample_actions_batch([o], 3, [3])[0]
    for x, y in zip(first, alone, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    a.reset("reach forward", 2, seed=11)
    np.testing.assert_allclose(a.sample_actions_batch([o], 3, [2])[0], first[0], rtol=1e-5, atol=1e-6)
    a.close()
    b.close()


@pytest.mark.parametrize("name", NAMES)
def test_with_fixed_batch_rows_an_episode_is_bit_identical_whatever_its_batch(name: str, tmp_path: Path) -> None:
    """fix_batch_rows(3), as the sim runner sets it: episode seed 11's candidates are the same *bit for
    bit* alone, second of two next to an episode with a longer instruction, and fifth of five (a batch
    of three and a padded one of two, next to a shorter one), over two calls; the filler rows draw
    nothing from any episode's stream. The instructions' lengths matter: text padded to the batch's
    longest would change the row's sequence length, hence its rounding."""
    cfg = contract_config(name, tmp_path)
    o, runs = observation(0), []
    for position, n, text in ((0, 1, "go"), (1, 2, "put the red cube on the green cube"), (4, 5, "go")):
        policy = make_policy(cfg)
        policy.fix_batch_rows(3)
        batch = [observation(20 + n + j, text) for j in range(n)]
        batch[position] = o
        for j in range(n):
            policy.reset("reach forward" if j == position else text, j, seed=11 if j == position else 30 + n + j)
        runs.append([policy.sample_actions_batch(batch, 3, list(range(n)))[position] for _ in range(2)])
        policy.close()
    for other in runs[1:]:
        for x, y in zip(runs[0], other, strict=True):
            np.testing.assert_array_equal(x, y)
    unpadded = make_policy(cfg)  # the same draws without padding: equal up to rounding
    unpadded.reset("reach forward", 0, seed=11)
    np.testing.assert_allclose(unpadded.sample_actions(o, 3), runs[0][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["vla", "flow", "qsft"])
def test_fixed_batch_rows_fix_the_text_length_too(name: str, tmp_path: Path) -> None:
    """While rows are fixed, every text-reading module pads instructions to its max_text_tokens, so a
    row's sequence is as long next to a long instruction as next to a short one; unfixed, to the longest."""
    policy = make_policy(contract_config(name, tmp_path))
    readers = [m for m in policy.model.modules() if hasattr(m, "text_length")]
    assert readers and all(m.text_length is None for m in readers)
    policy.fix_batch_rows(3)
    assert all(m.text_length == m.max_text_tokens for m in readers)
    vla = next((m for m in readers if hasattr(m, "embed_prefix")), None)
    if vla is not None:
        images = torch.zeros(2, vla.image_size, vla.image_size, 3, dtype=torch.uint8)
        short = vla.embed_prefix(images, ["go", "go"]).embeds.shape[1]
        assert short == vla.embed_prefix(images, ["go", "put the red cube on the green cube"]).embeds.shape[1]
    policy.fix_batch_rows(None)
    assert all(m.text_length is None for m in readers)
    policy.close()


def test_pad_ids_to_a_fixed_length() -> None:
    ids, mask = pad_ids([[5, 6], [7]], 0, length=4)
    assert ids.tolist() == [[0, 0, 5, 6], [0, 0, 0, 7]] and mask.sum(1).tolist() == [2, 1]
    ids, mask = pad_ids([[5, 6], [7]], 0, side="right", length=3)
    assert ids.tolist() == [[5, 6, 0], [7, 0, 0]] and mask.tolist() == [[True, True, False], [True, False, False]]
    assert pad_ids([[5, 6, 7]], 0, length=2)[0].tolist() == [[5, 6, 7]]  # never shorter than the longest
    assert pad_ids([[5, 6], [7]], 0)[0].shape == (2, 2)


def test_fixed_batches_cover_every_row_once() -> None:
    assert fixed_batches(5, None) == [([0, 1, 2, 3, 4], 5)]
    assert fixed_batches(5, 3) == [([0, 1, 2], 3), ([3, 4, 3], 2)]
    assert fixed_batches(2, 4) == [([0, 1, 0, 0], 2)] and fixed_batches(4, 4) == [([0, 1, 2, 3], 4)]
    assert fixed_batches(0, 4) == []
    with pytest.raises(ValueError, match="batch rows"):
        RandomPolicy().fix_batch_rows(0)


@pytest.mark.parametrize("name", ["random", "vla", "flow", "qsft", "openvla"])
def test_episode_seeds_and_the_policy_seed_change_the_draws(name: str, tmp_path: Path) -> None:
    cfg = contract_config(name, tmp_path)
    if "temperature" in cfg:
        cfg.temperature = 1.0
    draws = {}
    for policy_seed, episode_seed in ((0, 1), (0, 2), (1, 1)):
        cfg.seed = policy_seed
        policy = make_policy(cfg)
        policy.reset("reach forward", 0, seed=episode_seed)
        draws[policy_seed, episode_seed] = policy.sample_actions(observation(0), 8)
    assert not np.allclose(draws[0, 1], draws[0, 2]) and not np.allclose(draws[0, 1], draws[1, 1])


@pytest.mark.parametrize("name", ["vla", "flow", "openvla"])
def test_learned_policies_refuse_bad_input(name: str, tmp_path: Path) -> None:
    policy = make_policy(contract_config(name, tmp_path))
    with pytest.raises(UserError, match="image_primary"):
        policy.sample_actions({"instruction": "go"}, 2)
    with pytest.raises(UserError, match="uint8"):
        policy.sample_actions({"image_primary": np.zeros((32, 32, 3), np.float32), "instruction": "go"}, 2)
    with pytest.raises(UserError, match="No instruction"):
        policy.sample_actions({"image_primary": np.zeros((32, 32, 3), np.uint8)}, 2, slot=4)
    with pytest.raises(UserError, match="k=0"):
        policy.sample_actions(observation(0), 0)


@pytest.mark.parametrize("name", ["vla", "flow"])
def test_checkpoint_errors_name_the_fix(name: str, tmp_path: Path) -> None:
    cfg = tiny_model_config(name).policy
    cfg.device = "cpu"
    with pytest.raises(UserError, match=f"policy.checkpoint=<dir>.*train_policy.py policy={name}"):
        make_policy(cfg)
    cfg.checkpoint = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="No checkpoint at"):
        make_policy(cfg)
    other = "flow" if name == "vla" else "vla"
    cfg.checkpoint = str(tiny_checkpoint(other, tmp_path / other))
    with pytest.raises(UserError, match=f"holds a '{other}' policy.*policy={other}"):
        make_policy(cfg)


def test_checkpoint_policy_name_reads_the_checkpoint(tmp_path: Path) -> None:
    for name in ("vla", "flow"):
        run = tiny_checkpoint(name, tmp_path / name)
        assert checkpoint_policy_name(run) == name
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"No checkpoint at|not a policy checkpoint"):
        checkpoint_policy_name(tmp_path / "empty")


def test_unknown_policy_suggests_the_closest() -> None:
    with pytest.raises(UserError, match=r"Did you mean 'vla'.*Known: .*flow.*random.*vla"):
        make_policy(OmegaConf.create({"name": "vlaa"}))


def test_unnorm_key_is_required_for_mixtures_and_checked() -> None:
    stats = {"bridge": fake_stats(0)["sim"], "fractal": fake_stats(1)["sim"]}
    with pytest.raises(UserError, match=r"policy.unnorm_key=<name>"):
        dataset_stats(stats, None, "ckpt")
    with pytest.raises(UserError, match="not a dataset"):
        dataset_stats(stats, "sim", "ckpt")
    assert dataset_stats(stats, "fractal", "ckpt") is stats["fractal"]
