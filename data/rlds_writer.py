"""Write RLDS datasets with tensorflow-datasets, in a process of their own.

Writing TFDS image features needs TensorFlow (`pip install -e .[rlds]`, tensorflow-cpu), and
TensorFlow must never share a process with MuJoCo rendering (DESIGN.md "Processes"). So producers
(sim collection, the robot recorder, test fixtures) *stage* episodes as .npz files, and
`write_rlds` runs `python -m data.rlds_writer` on the staging directory:

    stage_episode(staging, key, episode)        # any process, NumPy only
    write_rlds(staging, data_dir, name, version, spec)   # spawns the TensorFlow writer

An episode is a flat dict keyed like the dataset's features: "steps/<...>" values hold T entries
(arrays (T, ...), lists of T encoded images as bytes, lists of T str), "episode_metadata/<...>"
values are scalars or str. Images are written exactly as given (encode them with data.images), so
a round trip returns the same bytes. The result is readable by `data.rlds.RLDSDataset` and by stock
`tfds.builder_from_directory`.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from configs.errors import UserError
from data.features import flat_spec

_OFFSETS = "@offsets"


def stage_episode(staging: str | Path, key: str, episode: dict[str, Any]) -> Path:
    """Save one episode under `staging/<key>.npz` atomically (a crash never leaves half a file)."""
    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for name, value in episode.items():
        if isinstance(value, list) and value and isinstance(value[0], (bytes, bytearray, memoryview)):
            arrays[name] = np.frombuffer(b"".join(bytes(v) for v in value), dtype=np.uint8)
            arrays[name + _OFFSETS] = np.cumsum([0, *(len(v) for v in value)]).astype(np.int64)
        else:
            arrays[name] = np.asarray(value)
    path = staging / f"{key}.npz"
    fd, tmp = tempfile.mkstemp(dir=staging, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


def load_staged(path: str | Path) -> dict[str, Any]:
    """Inverse of `stage_episode`."""
    with np.load(path) as z:
        out: dict[str, Any] = {}
        for name in z.files:
            if name.endswith(_OFFSETS):
                continue
            if name + _OFFSETS in z.files:
                blob, offsets = z[name], z[name + _OFFSETS]
                out[name] = [blob[a:b].tobytes() for a, b in itertools.pairwise(offsets)]
            else:
                value = z[name]
                out[name] = value.tolist() if value.dtype.kind == "U" else value
        return out


def staged_keys(staging: str | Path) -> list[str]:
    return sorted(p.stem for p in Path(staging).glob("*.npz"))


def write_rlds(
    staging: str | Path,
    data_dir: str | Path,
    name: str,
    version: str,
    spec: dict[str, Any],
    split: str = "train",
    splits: dict[str, list[str]] | None = None,
    file_format: str = "tfrecord",
    timeout: float | None = None,
) -> Path:
    """Write the staged episodes as `<data_dir>/<name>/<version>/` in a TensorFlow subprocess.

    `splits` maps split names to staged keys; by default every staged episode goes to `split`.
    As in datasets built by TFDS, episodes are stored in the order of a hash of their key (so readers
    may use `shuffle_files=True`); match episodes by a metadata field, not by position.
    Returns the dataset directory.
    """
    splits = splits or {split: staged_keys(staging)}
    root = Path(data_dir) / name / version
    if (root / "dataset_info.json").exists():
        raise UserError(f"{root} already holds a dataset; remove it or write to another name/version.")
    job = {
        "staging": str(Path(staging).resolve()),
        "data_dir": str(Path(data_dir).resolve()),
        "name": name,
        "version": version,
        "spec": spec,
        "splits": splits,
        "file_format": file_format,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "data.rlds_writer", f.name],
            capture_output=True, text=True, env=env, timeout=timeout, cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        if "No module named 'tensorflow'" in tail:
            raise UserError("Writing RLDS needs TensorFlow: pip install -e '.[rlds]' (tensorflow-cpu).")
        raise UserError(f"The RLDS writer failed (exit {proc.returncode}):\n{tail}")
    return root


# ---------------------------------------------------------------------------------------------
# Inside the writer process (TensorFlow imported here only).


def _tfds_features(spec: dict[str, Any]) -> Any:
    import tensorflow_datasets as tfds

    def build(node: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in node.items():
            if isinstance(value, dict):
                inner = build(value)
                out[key] = tfds.features.Dataset(inner) if key == "steps" else tfds.features.FeaturesDict(inner)
            elif value[0] == "image":
                out[key] = tfds.features.Image(shape=tuple(value[1]), dtype=np.uint8, encoding_format=value[2])
            elif value[0] == "tensor":
                out[key] = tfds.features.Tensor(shape=tuple(value[1]), dtype=np.dtype(value[2]))
            elif value[0] == "scalar":
                out[key] = tfds.features.Scalar(dtype=np.dtype(value[1]))
            elif value[0] == "text":
                out[key] = tfds.features.Text()
            else:
                raise ValueError(f"unknown feature kind {value!r}")
        return out

    return tfds.features.FeaturesDict(build(spec))


def _nest(flat: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """Staged flat episode -> TFDS example: {"steps": [step dicts], "episode_metadata": {...}}."""
    leaves = flat_spec(spec)
    missing = sorted(set(leaves) - set(flat))
    if missing:
        raise ValueError(f"episode lacks features {missing}")
    steps_keys = [k for k in leaves if k.startswith("steps/")]
    T = len(flat[steps_keys[0]])
    steps: list[dict[str, Any]] = [{} for _ in range(T)]
    meta: dict[str, Any] = {}
    for key in leaves:
        parts = key.split("/")
        if parts[0] == "steps":
            values = flat[key]
            if len(values) != T:
                raise ValueError(f"{key} has {len(values)} steps, expected {T}")
            for t in range(T):
                _put(steps[t], parts[1:], values[t])
        else:
            _put(meta, parts[1:], flat[key])
    return {"steps": steps, "episode_metadata": meta}


def _put(d: dict[str, Any], path: list[str], value: Any) -> None:
    for p in path[:-1]:
        d = d.setdefault(p, {})
    d[path[-1]] = value.item() if isinstance(value, np.generic) else value


def _run_job(job: dict[str, Any]) -> None:
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    import tensorflow_datasets as tfds

    features = _tfds_features(job["spec"])
    staging = Path(job["staging"])

    def examples(keys: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        for key in keys:
            yield key, _nest(load_staged(staging / f"{key}.npz"), job["spec"])

    tfds.dataset_builders.store_as_tfds_dataset(
        name=job["name"],
        version=job["version"],
        features=features,
        split_datasets={split: list(examples(keys)) for split, keys in job["splits"].items()},
        data_dir=job["data_dir"],
        file_format=job["file_format"],
        disable_shuffling=False,  # TFDS orders episodes by a hash of their key, as real datasets are
    )


if __name__ == "__main__":
    _run_job(json.loads(Path(sys.argv[1]).read_text()))
