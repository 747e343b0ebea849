"""Prepared store + transition batches, checked against the raw episodes given to the writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from configs.errors import UserError
from data.config import DataConfig, DatasetConfig, RewardConfig
from data.datasets import binarize_gripper
from data.images import decode, encode_jpeg
from data.loader import build_datasets
from data.normalize import ActionNormalizer
from data.prepare import prepare_data
from data.rlds import RLDSDataset
from data.tfrecord import CorruptShardError, iter_tfrecord
from tests.data.conftest import NO_LANGUAGE, TRAIN, rewrite_train_shard

pytestmark = pytest.mark.tf


def config(data_dir: Path, **dataset: object) -> DataConfig:
    ds = DatasetConfig(standardize="bridge", tfds_name="bridge_dataset", **dataset)
    return OmegaConf.structured(DataConfig(datasets={"bridge": ds}, data_dir=str(data_dir), prepare_workers=1))


def expected_transitions(staged: dict, keys: list[str]) -> dict[str, np.ndarray]:
    """Independent computation of what the store + loader must give, from the raw episodes."""
    out: dict[str, list] = {"action": [], "frame_image": [], "next_image": [], "reward": [], "terminal": [], "mc": []}
    cfg = RewardConfig()
    for key in keys:
        ep = staged[key]
        state, raw_action = ep["steps/observation/state"], ep["steps/action"]
        T = len(state)
        grip = binarize_gripper(raw_action[:, 6])
        for t in range(T - 1):
            out["action"].append(np.concatenate([state[t + 1, :6] - state[t, :6], [grip[t]]]))
            out["frame_image"].append(ep["steps/observation/image_0"][t])
            out["next_image"].append(ep["steps/observation/image_0"][t + 1])
        n = T - 1
        r = np.where(np.arange(n) >= n - cfg.success_steps, cfg.success_reward, cfg.step_reward)
        g, returns = 0.0, []
        for t in reversed(range(n)):
            done = t >= n - cfg.success_steps
            g = r[t] + cfg.discount * (0.0 if done else 1.0) * g
            returns.append(g)
        out["reward"] += list(r)
        out["terminal"] += [float(t >= n - cfg.success_steps) for t in range(n)]
        out["mc"] += returns[::-1]
    return {k: np.asarray(v) if k not in ("frame_image", "next_image") else v for k, v in out.items()}


@pytest.fixture
def prepared(bridge_copy: Path):
    cfg = config(bridge_copy)
    return cfg, prepare_data(cfg)


def test_counts_and_skips(prepared) -> None:
    _, p = prepared
    counts = p["bridge"].train.meta["counts"]
    assert counts["episodes_read"] == len(TRAIN)
    assert counts["skipped_no_language"] == 1
    assert counts["episodes"] == len(TRAIN) - 1
    assert NO_LANGUAGE not in {k.rsplit("traj", 1)[-1] for k in p["bridge"].train.ep_key}
    assert p["bridge"].val is not None and p["bridge"].val.num_episodes == 2


def test_batches_match_the_raw_episodes(prepared, staged) -> None:
    cfg, p = prepared
    train, _ = build_datasets(p, cfg, "train")
    by_path = {staged[k]["episode_metadata/file_path"]: k for k in TRAIN}
    keys = [by_path[path] for path in p["bridge"].train.ep_key]  # the store's episode order
    assert NO_LANGUAGE not in keys and len(keys) == len(TRAIN) - 1
    want = expected_transitions(staged, keys)
    assert len(train) == len(want["action"])
    normalizer = ActionNormalizer(p["bridge"].stats, "bounds_q99")
    idx = np.arange(len(train))
    batch = train.__getitems__(idx.tolist())
    np.testing.assert_allclose(
        batch["action"].numpy(), normalizer.normalize(want["action"].astype(np.float32)), atol=1e-5
    )
    np.testing.assert_array_equal(batch["reward"].numpy(), want["reward"])
    np.testing.assert_array_equal(batch["terminal"].numpy(), want["terminal"])
    np.testing.assert_allclose(batch["mc_return"].numpy(), want["mc"], rtol=1e-5)
    for i in (0, 5, len(train) - 1):
        np.testing.assert_array_equal(batch["image"][i].numpy(), decode(want["frame_image"][i]))
        np.testing.assert_array_equal(batch["next_image"][i].numpy(), decode(want["next_image"][i]))
    instructions = {staged[k]["steps/language_instruction"][0] for k in keys}
    assert set(batch["instruction"]) == instructions == set(train.instructions)
    assert [train.instructions[i] for i in batch["instruction_id"]] == batch["instruction"]


def test_proprio_batches_carry_the_normalised_states_of_s_and_s_next(prepared, staged) -> None:
    """value.proprio: `state` / `next_state` are the raw states of frames t and t+1, normalised with the
    dataset's "proprio" statistics in all seven dimensions (bounds_q99: clipped to [-1, 1])."""
    cfg, p = prepared
    plain, _ = build_datasets(p, cfg, "train")
    train, _ = build_datasets(p, cfg, "train", proprio=True)
    idx = list(range(len(train)))
    batch = train.__getitems__(idx)
    assert "state" not in plain.__getitems__(idx)  # only when asked for
    by_path = {staged[k]["episode_metadata/file_path"]: k for k in TRAIN}
    raw = [staged[by_path[path]]["steps/observation/state"].astype(np.float32) for path in p["bridge"].train.ep_key]
    now = np.concatenate([s[:-1] for s in raw])
    after = np.concatenate([s[1:] for s in raw])
    stats = p["bridge"].stats["proprio"]
    low, high = np.asarray(stats["q01"]), np.asarray(stats["q99"])
    expected = lambda x: np.clip(2 * (x - low) / (high - low + 1e-8) - 1, -1, 1)  # noqa: E731
    np.testing.assert_allclose(batch["state"].numpy(), expected(now), atol=1e-5)
    np.testing.assert_allclose(batch["next_state"].numpy(), expected(after), atol=1e-5)
    assert np.ptp(batch["state"].numpy()[:, 6]) > 0  # the gripper dimension is normalised too
    del p["bridge"].stats["proprio"]  # statistics without it: an error that says how to recompute them
    with pytest.raises(UserError, match=r"proprio.*data.prepare"):
        build_datasets(p, cfg, "train", proprio=True)


def test_statistics_cached_and_reused(prepared, bridge_copy) -> None:
    cfg, p = prepared
    stats_file = p["bridge"].train.path / "dataset_statistics.json"
    mtime = stats_file.stat().st_mtime_ns
    again = prepare_data(cfg)
    assert stats_file.stat().st_mtime_ns == mtime
    assert again["bridge"].stats == p["bridge"].stats
    assert again["bridge"].train.path == p["bridge"].train.path
    valid = np.isfinite(p["bridge"].train.action[:, 0])
    np.testing.assert_allclose(
        p["bridge"].stats["action"]["q99"], np.quantile(p["bridge"].train.action[valid], 0.99, 0)
    )


def test_raw_and_resized_stores(bridge_copy, prepared) -> None:
    _, p = prepared
    raw = prepare_data(config(bridge_copy, image_format="raw"))["bridge"].train
    jpeg = p["bridge"].train
    assert raw.path != jpeg.path
    frames = np.array([0, 7, raw.num_frames - 1])
    np.testing.assert_array_equal(raw.read_images("image_primary", frames), jpeg.read_images("image_primary", frames))
    small = prepare_data(config(bridge_copy, image_size=64))["bridge"].train
    assert small.read_images("image_primary", frames).shape == (3, 64, 64, 3)


def test_wrist_camera(bridge_copy) -> None:
    store = prepare_data(config(bridge_copy, wrist=True))["bridge"].train
    assert store.cameras == ["image_primary", "image_wrist"]
    assert store.read_images("image_wrist", np.array([0])).shape == (1, 256, 256, 3)


def test_nonfinite_episode_dropped_and_counted(bridge_copy, staged) -> None:
    episodes = [staged[k] for k in TRAIN[:3]]
    bad = dict(episodes[1])
    bad["steps/action"] = bad["steps/action"].copy()
    bad["steps/action"][2, 6] = np.nan  # the gripper channel survives relabelling
    rewrite_train_shard(bridge_copy, [episodes[0], bad, episodes[2]])
    store = prepare_data(config(bridge_copy))["bridge"].train
    assert store.meta["counts"]["dropped_nonfinite"] == 1
    assert store.num_episodes == 2


def test_corrupt_shard_error_or_skip(bridge_copy) -> None:
    shard = RLDSDataset(bridge_copy / "bridge_dataset" / "1.0.0").shards("train")[0]
    sizes = [len(bytes(r)) + 16 for r in iter_tfrecord(shard)]
    shard.write_bytes(shard.read_bytes()[: sum(sizes[:2]) + 100])  # two episodes intact, then cut
    with pytest.raises(CorruptShardError, match=shard.name):
        prepare_data(config(bridge_copy))
    cfg = config(bridge_copy)
    cfg.skip_corrupt = True
    store = prepare_data(cfg)["bridge"].train
    assert store.meta["counts"]["episodes_read"] == 2
    corrupt = store.meta["counts"]["corrupt"]
    assert len(corrupt) == 1 and shard.name in corrupt[0] and "skip_corrupt" not in corrupt[0]  # no advice to skip


def test_wrong_image_size_is_a_clear_error(bridge_copy, staged) -> None:
    ep = dict(staged[TRAIN[0]])
    small = encode_jpeg(np.zeros((128, 128, 3), np.uint8))
    ep["steps/observation/image_0"] = [small] * len(ep["steps/action"])
    rewrite_train_shard(bridge_copy, [ep])
    with pytest.raises(UserError, match=r"image of shape \(128, 128, 3\).*expects \(256, 256, 3\)"):
        prepare_data(config(bridge_copy))


def test_unknown_option_and_read_only(bridge_copy, monkeypatch) -> None:
    with pytest.raises(UserError, match=r"\['relable'\] are not options.*drop_first_step"):
        prepare_data(config(bridge_copy, options={"relable": True}))
    monkeypatch.setattr("data.prepare.os.access", lambda path, mode: False)  # a read-only data directory
    with pytest.raises(UserError, match=r"read-only.*data.store_root"):
        prepare_data(config(bridge_copy))
    assert not (bridge_copy / "bridge_dataset" / "1.0.0" / "robosteer").exists()
