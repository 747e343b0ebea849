"""Read RLDS datasets prepared by tensorflow-datasets, without TensorFlow.

A prepared dataset is a directory `<data_dir>/<name>/<version>/` holding `dataset_info.json`,
`features.json` and the shards `<name>-<split>.<tfrecord|array_record>-XXXXX-of-NNNNN`, exactly as
users download them (e.g. Bridge from rail.eecs.berkeley.edu). Each record is one episode: a
tf.Example whose step features hold T values each. `RLDSDataset.episodes` yields them as flat dicts:

    {"steps/observation/image_0": [T JPEG bytes], "steps/action": float32 (T, 7),
     "steps/language_instruction": [T str], "episode_metadata/file_path": str, ...}

Only the keys asked for are decoded, and images stay encoded (the store decides whether to decode).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from configs.errors import UserError
from data.features import FeatureSpec, read_features_json
from data.tfrecord import CorruptShardError, iter_tfrecord, parse_example

_SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})$")
_FORMAT_SUFFIX = {"tfrecord": "tfrecord", "array_record": "array_record"}


def locate(data_dir: str | Path, tfds_name: str, version: str, how_to_get: str = "") -> Path:
    """Return `<data_dir>/<tfds_name>/<version>` or raise a message that says how to fix it."""
    root = Path(data_dir).expanduser() / tfds_name / version
    if (root / "dataset_info.json").is_file():
        return root
    lines = [f"Dataset {tfds_name!r} {version} not found: expected {root}/ with dataset_info.json."]
    if root.is_dir():
        lines.append(f"{root} exists but has no dataset_info.json: is the download complete?")
    parent = root.parent
    if parent.is_dir():
        versions = sorted(p.name for p in parent.iterdir() if (p / "dataset_info.json").is_file())
        if versions:
            lines.append(f"Versions present in {parent}: {', '.join(versions)}.")
    if Path(data_dir).expanduser().is_dir():
        names = sorted(p.name for p in Path(data_dir).expanduser().iterdir() if p.is_dir())
        if names:
            lines.append(
                f"Datasets present in {data_dir}: {', '.join(names[:20])} (to read one of them: "
                "data.datasets.<name>.tfds_name=<dataset>)."
            )
    if how_to_get:
        lines.append(how_to_get.format(data_dir=data_dir, root=root))
    lines.append("Set the location with data.data_dir=<dir> (or data.datasets.<name>.data_dir).")
    raise UserError("\n  ".join(lines))


class RLDSDataset:
    """The splits, shards and feature spec of one prepared RLDS dataset."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        try:
            self.info: dict[str, Any] = json.loads((self.root / "dataset_info.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"Cannot read {self.root / 'dataset_info.json'}: {err}") from None
        self.features: dict[str, FeatureSpec] = read_features_json(self.root / "features.json")
        self.file_format: str = self.info.get("fileFormat", "tfrecord")
        if self.file_format not in _FORMAT_SUFFIX:
            raise UserError(f"{self.root}: file format {self.file_format!r} is not supported (tfrecord, array_record)")

    @property
    def name(self) -> str:
        return self.info.get("name", self.root.parent.name)

    def splits(self) -> dict[str, int]:
        """Split name -> number of episodes."""
        return {s["name"]: sum(int(n) for n in s.get("shardLengths", [])) for s in self.info.get("splits", [])}

    def shards(self, split: str) -> list[Path]:
        """The shard files of `split`, in order; every one announced by dataset_info.json must exist."""
        entry = next((s for s in self.info.get("splits", []) if s["name"] == split), None)
        if entry is None:
            raise UserError(f"{self.root} has no split {split!r}; it has: {', '.join(self.splits()) or 'none'}.")
        expected = len(entry.get("shardLengths", [])) or 1
        suffix = _FORMAT_SUFFIX[self.file_format]
        found = sorted(self.root.glob(f"*-{split}.{suffix}*"))
        if len(found) != expected:
            have = {int(m.group(1)) for p in found if (m := _SHARD_RE.search(p.name))}
            missing = [i for i in range(expected) if i not in have]
            raise UserError(
                f"{self.root}: split {split!r} should have {expected} shards but {len(found)} are present"
                + (f" (missing shard numbers {missing[:10]}{'...' if len(missing) > 10 else ''})" if missing else "")
                + ". Complete the download (re-run it; finished files are skipped)."
            )
        return found

    def check_keys(self, keys: Iterable[str]) -> None:
        """Raise a clear error if the dataset lacks a feature that a standardisation needs."""
        missing = [k for k in keys if k not in self.features]
        if missing:
            raise UserError(
                f"{self.root}: features {missing} are not in features.json. Is this the right dataset for "
                f"the chosen standardisation? Its features are: {', '.join(sorted(self.features))}."
            )

    def records(self, shard: Path, verify: bool = True) -> Iterator[memoryview | bytes]:
        if self.file_format == "tfrecord":
            yield from iter_tfrecord(shard, verify=verify)
            return
        from array_record.python.array_record_module import ArrayRecordReader

        reader = ArrayRecordReader(str(shard))
        try:
            for start in range(0, reader.num_records(), 64):
                yield from reader.read(start, min(start + 64, reader.num_records()))
        finally:
            reader.close()

    def episodes(self, shard: Path, keys: Iterable[str], verify: bool = True) -> Iterator[dict[str, Any]]:
        """Yield the decoded `keys` of every episode in `shard` (see the module docstring)."""
        specs = [self.features[k] for k in keys]
        for index, payload in enumerate(self.records(shard, verify)):
            try:
                yield decode_episode(payload, specs)
            except (KeyError, ValueError) as err:
                raise CorruptShardError(f"Episode {index} of {shard} cannot be decoded: {err}") from None


def decode_episode(payload: bytes | memoryview, specs: list[FeatureSpec]) -> dict[str, Any]:
    """Decode the given features of one serialised episode."""
    feature_map = parse_example(payload).features.feature
    out: dict[str, Any] = {}
    length: int | None = None
    for spec in specs:
        if spec.key not in feature_map:
            raise KeyError(f"feature {spec.key!r} is missing")
        value = _decode_feature(feature_map[spec.key], spec)
        if spec.in_steps:
            if length is not None and len(value) != length:
                raise ValueError(f"{spec.key!r} has {len(value)} steps, other features have {length}")
            length = len(value)
        out[spec.key] = value
    return out


def _decode_feature(feature: Any, spec: FeatureSpec) -> Any:
    kind = feature.WhichOneof("kind")
    if spec.kind in ("image", "text"):
        if kind != "bytes_list":
            raise ValueError(f"{spec.key!r} should be bytes, found {kind}")
        values = list(feature.bytes_list.value)
        if spec.kind == "text":
            values = [v.decode("utf-8") for v in values]
        return values if spec.in_steps else values[0]
    if kind == "float_list":
        array = np.asarray(feature.float_list.value, dtype=np.float32)
    elif kind == "int64_list":
        array = np.asarray(feature.int64_list.value, dtype=np.int64)
    else:
        raise ValueError(f"{spec.key!r} should be numeric, found {kind}")
    array = array.astype(np.dtype(spec.dtype), copy=False)
    shape = tuple(-1 if d is None else d for d in spec.shape)
    if spec.in_steps:
        return array.reshape((-1, *shape))
    return array.reshape(shape) if shape else array.reshape(())[()]  # a NumPy scalar of the spec's dtype


def encode_episode(episode: dict[str, Any], specs: dict[str, FeatureSpec]) -> bytes:
    """Serialise a flat episode as a tf.Example (the inverse of `decode_episode`), without TensorFlow.

    Used by tests and tools to write shards in the exact layout TFDS produces for `specs`.
    """
    from data.tfrecord import example_message_class

    example = example_message_class()()
    for key, spec in specs.items():
        value = episode[key]
        feature = example.features.feature[key]
        if spec.kind in ("image", "text"):
            items = value if spec.in_steps else [value]
            feature.bytes_list.value.extend(v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in items)
        elif np.dtype(spec.dtype).kind == "f":
            feature.float_list.value.extend(np.asarray(value, dtype=np.float32).ravel().tolist())
        else:
            feature.int64_list.value.extend(np.asarray(value).astype(np.int64).ravel().tolist())
    return example.SerializeToString()
