"""Fixtures: a small dataset in the exact `bridge_dataset` 1.0.0 format, written by the TFDS writer.

The session fixture runs the TensorFlow writer process once (~15 s). Variants (corrupt shards,
NaN actions, wrong image sizes) are derived from it without TensorFlow, by re-serialising
episodes with `data.rlds.encode_episode` into a copy of the dataset directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data.rlds import RLDSDataset, encode_episode
from data.rlds_writer import load_staged, stage_episode, write_rlds
from data.synthetic import bridge_episode, bridge_spec
from data.tfrecord import write_tfrecord

TRAIN = [f"ep{i:03d}" for i in range(7)]
VAL = ["ep100", "ep101"]
NO_LANGUAGE = "ep003"  # has_language False: must be skipped and counted
NO_WRIST = "ep002"  # image_3 missing (zeros, has_image_3 False)


@pytest.fixture(scope="session")
def bridge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<tmp>/data` holding bridge_dataset/1.0.0 with train (7 episodes) and val (2) splits."""
    root = tmp_path_factory.mktemp("bridge")
    rng = np.random.default_rng(0)
    for key in TRAIN + VAL:
        i = int(key[2:])
        episode = bridge_episode(rng, i, language=key != NO_LANGUAGE, missing_cameras=(3,) if key == NO_WRIST else ())
        stage_episode(root / "staging", key, episode)
    write_rlds(
        root / "staging", root / "data", "bridge_dataset", "1.0.0", bridge_spec(), splits={"train": TRAIN, "val": VAL}
    )
    return root


@pytest.fixture(scope="session")
def staged(bridge_dir: Path) -> dict[str, dict]:
    """The episodes as they were given to the writer, by key."""
    return {key: load_staged(bridge_dir / "staging" / f"{key}.npz") for key in TRAIN + VAL}


@pytest.fixture
def bridge_copy(bridge_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the dataset's data_dir (tests may damage it)."""
    dst = tmp_path / "data"
    shutil.copytree(bridge_dir / "data" / "bridge_dataset" / "1.0.0", dst / "bridge_dataset" / "1.0.0")
    return dst


def rewrite_train_shard(data_dir: Path, episodes: list[dict]) -> Path:
    """Replace the train split of the dataset under `data_dir` by `episodes` (no TensorFlow)."""
    root = data_dir / "bridge_dataset" / "1.0.0"
    rlds = RLDSDataset(root)
    shard = rlds.shards("train")[0]
    write_tfrecord(shard, [encode_episode(e, rlds.features) for e in episodes])
    info = json.loads((root / "dataset_info.json").read_text())
    for split in info["splits"]:
        if split["name"] == "train":
            split["shardLengths"] = [str(len(episodes))]
    (root / "dataset_info.json").write_text(json.dumps(info))
    return shard
