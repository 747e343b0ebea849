"""Feature specs of RLDS datasets: reading `features.json`, and the specs robosteer writes.

`features.json` (written by tensorflow-datasets beside every prepared dataset) describes each
feature as nested `FeaturesDict` / `Dataset` / `Tensor` / `Scalar` / `Image` / `Text` nodes. The
reader flattens it into `FeatureSpec`s keyed like the serialised tf.Example
(`steps/observation/image_0`), which is all it needs to decode episodes without TensorFlow.

The specs robosteer writes are plain nested dicts of `("image", shape, encoding)`,
`("tensor", shape, dtype)`, `("scalar", dtype)` and `("text",)`; the writer process turns them
into `tfds.features` objects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from configs.errors import UserError

_CLASS = "pythonClassName"


@dataclass(frozen=True)
class FeatureSpec:
    """One leaf feature as serialised in the tf.Example of an episode."""

    key: str  # flat key, e.g. "steps/observation/image_0"
    kind: str  # "image", "tensor" or "text"
    shape: tuple[int | None, ...]  # per step for step features, per episode otherwise
    dtype: str  # numpy dtype name; "string" for text
    encoding: str | None = None  # "jpeg" / "png" for images
    in_steps: bool = False  # a per-step feature (a sequence of T values)


def read_features_json(path: str | Path) -> dict[str, FeatureSpec]:
    """Flatten a `features.json` into `{flat key: FeatureSpec}`."""
    path = Path(path)
    try:
        root = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"Cannot read the feature spec {path}: {err}") from None
    specs: dict[str, FeatureSpec] = {}
    _flatten(root, "", False, specs, path)
    return specs


def _flatten(node: dict, prefix: str, in_steps: bool, out: dict[str, FeatureSpec], path: Path) -> None:
    cls = node.get(_CLASS, "").rsplit(".", 1)[-1]
    if "featuresDict" in node:
        for name, child in node["featuresDict"]["features"].items():
            _flatten(child, f"{prefix}{name}/", in_steps, out, path)
    elif "sequence" in node:  # tfds.features.Dataset / Sequence: a per-step feature dict
        _flatten(node["sequence"]["feature"], prefix, True, out, path)
    elif "image" in node:
        info = node["image"]
        shape = tuple(_dim(d) for d in info["shape"]["dimensions"])
        out[prefix[:-1]] = FeatureSpec(
            prefix[:-1], "image", shape, info.get("dtype", "uint8"), info.get("encodingFormat", "png"), in_steps
        )
    elif "text" in node or cls == "Text":
        out[prefix[:-1]] = FeatureSpec(prefix[:-1], "text", (), "string", None, in_steps)
    elif "tensor" in node:
        info = node["tensor"]
        shape = tuple(_dim(d) for d in info.get("shape", {}).get("dimensions", []))
        encoding = info.get("encoding", "none")
        if encoding not in ("none", None):
            raise UserError(f"{path}: feature {prefix[:-1]!r} uses tensor encoding {encoding!r}, not supported")
        kind = "text" if info["dtype"] == "string" else "tensor"
        out[prefix[:-1]] = FeatureSpec(prefix[:-1], kind, shape, info["dtype"], None, in_steps)
    else:
        raise UserError(f"{path}: feature {prefix[:-1]!r} has an unsupported type {cls or sorted(node)}")


def _dim(d: str | int) -> int | None:
    d = int(d)
    return None if d < 0 else d


# ---------------------------------------------------------------------------------------------
# Specs robosteer writes.


def bridge_dataset_spec() -> dict[str, Any]:
    """The `bridge_dataset` 1.0.0 spec (rail-hosted BridgeData V2; OpenVLA's `bridge_orig`).

    From reference/data.md and the TFDS catalog: four 256x256 JPEG cameras (image_0 fixed
    over-the-shoulder, image_3 wrist), 7-D state and action, USE-large language embedding.
    """
    image = ("image", (256, 256, 3), "jpeg")
    return {
        "steps": {
            "observation": {
                "image_0": image,
                "image_1": image,
                "image_2": image,
                "image_3": image,
                "state": ("tensor", (7,), "float32"),
            },
            "action": ("tensor", (7,), "float32"),
            "reward": ("scalar", "float32"),
            "discount": ("scalar", "float32"),
            "is_first": ("tensor", (), "bool"),
            "is_last": ("tensor", (), "bool"),
            "is_terminal": ("tensor", (), "bool"),
            "language_instruction": ("text",),
            "language_embedding": ("tensor", (512,), "float32"),
        },
        "episode_metadata": {
            "episode_id": ("scalar", "int32"),
            "file_path": ("text",),
            "has_image_0": ("scalar", "bool"),
            "has_image_1": ("scalar", "bool"),
            "has_image_2": ("scalar", "bool"),
            "has_image_3": ("scalar", "bool"),
            "has_language": ("scalar", "bool"),
        },
    }


def sim_dataset_spec(image_size: int, wrist: bool = False, encoding: str = "jpeg") -> dict[str, Any]:
    """The spec of robosteer's simulated datasets (written by `collect_sim.py`).

    Steps follow DESIGN.md's canonical step; the episode metadata records success and provenance.
    """
    image = ("image", (image_size, image_size, 3), encoding)
    observation: dict[str, Any] = {"image_primary": image, "state": ("tensor", (7,), "float32")}
    if wrist:
        observation["image_wrist"] = image
    return {
        "steps": {
            "observation": observation,
            "action": ("tensor", (7,), "float32"),
            "reward": ("scalar", "float32"),
            "discount": ("scalar", "float32"),
            "is_first": ("tensor", (), "bool"),
            "is_last": ("tensor", (), "bool"),
            "is_terminal": ("tensor", (), "bool"),
            "language_instruction": ("text",),
        },
        "episode_metadata": {
            "episode_id": ("scalar", "int32"),
            "file_path": ("text",),
            "task": ("text",),
            "seed": ("scalar", "int64"),
            "success": ("scalar", "bool"),
        },
    }


SPECS = {"bridge_dataset": bridge_dataset_spec, "sim": sim_dataset_spec}


def flat_spec(spec: dict[str, Any], prefix: str = "") -> dict[str, tuple]:
    """`{"steps": {"action": leaf}}` -> `{"steps/action": leaf}`."""
    out: dict[str, tuple] = {}
    for name, value in spec.items():
        if isinstance(value, dict):
            out.update(flat_spec(value, f"{prefix}{name}/"))
        else:
            out[f"{prefix}{name}"] = value
    return out
