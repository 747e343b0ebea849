"""The TF-free RLDS reader on a dataset written by the TFDS writer: spec, round trip, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from configs.errors import UserError
from data.features import flat_spec
from data.rlds import RLDSDataset, locate
from data.synthetic import bridge_spec
from tests.data.conftest import TRAIN, VAL

pytestmark = pytest.mark.tf

ROOT = ("data", "bridge_dataset", "1.0.0")


def test_features_json_is_the_bridge_spec(bridge_dir: Path) -> None:
    rlds = RLDSDataset(bridge_dir.joinpath(*ROOT))
    expected = flat_spec(bridge_spec())
    assert set(rlds.features) == set(expected)
    for key, leaf in expected.items():
        spec = rlds.features[key]
        assert spec.in_steps == key.startswith("steps/")
        if leaf[0] == "image":
            assert (spec.kind, spec.shape, spec.encoding) == ("image", (256, 256, 3), "jpeg")
        elif leaf[0] == "text":
            assert spec.kind == "text"
        else:
            shape, dtype = (leaf[1], leaf[2]) if leaf[0] == "tensor" else ((), leaf[1])
            assert (spec.shape, spec.dtype) == (tuple(shape), dtype)
    assert rlds.splits() == {"train": len(TRAIN), "val": len(VAL)}


def test_round_trip_is_identical(bridge_dir: Path, staged: dict) -> None:
    """episodes -> writer -> reader gives back every array, string and JPEG byte unchanged."""
    rlds = RLDSDataset(bridge_dir.joinpath(*ROOT))
    for split, keys in (("train", TRAIN), ("val", VAL)):
        episodes = [e for shard in rlds.shards(split) for e in rlds.episodes(shard, list(rlds.features))]
        by_path = {e["episode_metadata/file_path"]: e for e in episodes}
        assert sorted(by_path) == sorted(staged[k]["episode_metadata/file_path"] for k in keys)
        for key in keys:
            want = staged[key]
            got = by_path[want["episode_metadata/file_path"]]
            assert set(got) == set(want)
            for name, value in want.items():
                if isinstance(value, np.ndarray):
                    assert np.asarray(got[name]).dtype == value.dtype, name
                    np.testing.assert_array_equal(got[name], value, err_msg=name)
                else:
                    assert got[name] == value, name


def test_stock_tfds_reads_what_we_write(bridge_dir: Path, staged: dict) -> None:
    """tfds.builder_from_directory (in its own process: TensorFlow never enters the test process)."""
    script = textwrap.dedent(
        f"""
        import json, tensorflow_datasets as tfds
        b = tfds.builder_from_directory({str(bridge_dir.joinpath(*ROOT))!r})
        ds = b.as_dataset(split="train", shuffle_files=True)
        out = []
        for ep in ds.take(2):
            steps = list(ep["steps"])
            out.append({{"T": len(steps), "a0": steps[0]["action"].numpy().tolist(),
                         "img": steps[1]["observation"]["image_0"].numpy()[10, 20].tolist(),
                         "path": ep["episode_metadata"]["file_path"].numpy().decode()}})
        print(json.dumps(out))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    from data.images import decode

    by_path = {staged[k]["episode_metadata/file_path"]: staged[k] for k in TRAIN}
    for ep in got:
        want = by_path[ep["path"]]
        assert ep["T"] == len(want["steps/action"])
        np.testing.assert_allclose(ep["a0"], want["steps/action"][0])
        # TensorFlow's JPEG decoder and ours agree within rounding on the same bytes
        ours = decode(want["steps/observation/image_0"][1])[10, 20].astype(int)
        assert np.abs(ours - np.asarray(ep["img"])).max() <= 2


def test_missing_dataset_says_where_and_how(tmp_path: Path) -> None:
    from data.datasets import BRIDGE_HOW_TO_GET

    (tmp_path / "other_dataset").mkdir()
    with pytest.raises(UserError) as err:
        locate(tmp_path, "bridge_dataset", "1.0.0", BRIDGE_HOW_TO_GET)
    msg = str(err.value)
    assert str(tmp_path / "bridge_dataset" / "1.0.0") in msg
    assert "rail.eecs.berkeley.edu/datasets/bridge_release" in msg
    assert "other_dataset" in msg and "data.data_dir" in msg


def test_unknown_split_and_missing_shard(bridge_copy: Path) -> None:
    rlds = RLDSDataset(bridge_copy.joinpath(*ROOT[1:]))
    with pytest.raises(UserError, match=r"no split 'test'.*train, val"):
        rlds.shards("test")
    info_path = rlds.root / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["splits"][0]["shardLengths"] = ["4", "3"]  # announce a second shard that is not there
    info_path.write_text(json.dumps(info))
    with pytest.raises(UserError, match=r"should have 2 shards but 1 are present \(missing shard numbers \[1\]\)"):
        RLDSDataset(rlds.root).shards("train")


def test_wrong_dataset_for_standardisation(bridge_copy: Path) -> None:
    rlds = RLDSDataset(bridge_copy.joinpath(*ROOT[1:]))
    with pytest.raises(UserError, match=r"image_primary.*not in features.json"):
        rlds.check_keys(["steps/observation/image_primary"])
