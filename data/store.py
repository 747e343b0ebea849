"""The prepared store: a one-time conversion of RLDS shards into random-access arrays.

Why: training samples transitions uniformly at random. A tf.data pipeline reads episodes in order
through a shuffle buffer whose memory grows with its size (reference/data.md: Octo and OpenVLA
loaders that fill hundreds of GB). The store instead keeps, per source shard, a "chunk":

    chunks/<split>-<shard>.npz              state (F, 7), action (F, 7) (NaN on each episode's last
                                            frame), per-episode frame counts, success, instruction,
                                            key, and for JPEG images their byte offsets (F + 1,)
    chunks/<split>-<shard>.<camera>.jpg     the frames' JPEG bytes back to back    (image_format=jpeg)
    chunks/<split>-<shard>.<camera>.u8      decoded frames, uint8 (F, H, W, 3)      (image_format=raw)
    chunks/<split>-<shard>.json             the chunk's counts; written last, marks it complete
    meta.json                               source, options, counts; written when all chunks are done
    dataset_statistics.json                 normalisation statistics (train split)

so any frame is one memory-mapped read away, memory stays flat whatever the dataset size, and an
interrupted preparation resumes shard by shard. Disk cost: about the size of the source's kept
camera for jpeg (Bridge image_0: ~1/4 of its 124 GB), H*W*3 bytes per frame for raw.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from configs.errors import UserError
from data import images as imagelib
from data.datasets import Canonical
from data.rlds import RLDSDataset
from data.tfrecord import CorruptShardError

STORE_FORMAT = 1


@dataclass
class ChunkCounts:
    """What happened to the episodes of one shard."""

    episodes_read: int = 0
    episodes: int = 0
    frames: int = 0
    skipped_no_language: int = 0
    dropped_nonfinite: int = 0
    skipped_short: int = 0
    corrupt: str = ""  # error message if the rest of the shard was skipped

    def add(self, other: ChunkCounts) -> None:
        for name in (
            "episodes_read",
            "episodes",
            "frames",
            "skipped_no_language",
            "dropped_nonfinite",
            "skipped_short",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True)
class StoreSpec:
    """Everything that determines a store's content (its directory name hashes this)."""

    source: str  # dataset root <data_dir>/<name>/<version>
    split: str
    standardize: str
    options: dict[str, Any]
    cameras: tuple[str, ...]  # canonical camera names kept, e.g. ("image_primary",)
    image_size: int | None
    image_format: str

    def digest(self) -> str:
        blob = json.dumps({**self.__dict__, "format": STORE_FORMAT}, sort_keys=True, default=list)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


@dataclass
class ShardTask:
    """Arguments of `build_chunk` (picklable, for worker processes)."""

    spec: StoreSpec
    shard: Path
    out: Path  # chunk path without suffix
    keys: tuple[str, ...]
    image_keys: dict[str, str]  # camera -> raw key
    image_shape: tuple[int, int, int] | None
    key_feature: str | None
    skip_corrupt: bool
    counts: ChunkCounts = field(default_factory=ChunkCounts)


def chunk_done(out: Path, shard: Path) -> bool:
    """A chunk is complete if its summary exists and was built from this exact shard file."""
    summary = out.with_suffix(".json")
    if not summary.is_file():
        return False
    info = json.loads(summary.read_text())
    return info.get("shard_bytes") == shard.stat().st_size


def build_chunk(task: ShardTask) -> ChunkCounts:
    """Standardise every episode of one shard and write its chunk (runs in a worker process)."""
    from data.datasets import DATASETS

    std = DATASETS.get(task.spec.standardize)
    rlds = RLDSDataset(task.spec.source)
    counts = ChunkCounts()
    writer = _ChunkWriter(task)
    episodes = rlds.episodes(task.shard, (*task.keys, *task.image_keys.values(), *_opt(task.key_feature)))
    try:
        for index, raw in enumerate(episodes):
            counts.episodes_read += 1
            inputs = {k: raw[k] for k in task.keys}
            if not _finite(inputs):  # before standardising: binarisation would hide a NaN gripper
                counts.dropped_nonfinite += 1
                continue
            canon = std.fn(inputs, **task.spec.options)
            reason = _reject(canon)
            if reason:
                setattr(counts, reason, getattr(counts, reason) + 1)
                continue
            key = raw[task.key_feature] if task.key_feature else f"{task.shard.name}:{index}"
            writer.add(canon, {cam: [raw[k][i] for i in canon.frames] for cam, k in task.image_keys.items()}, key)
            counts.episodes += 1
            counts.frames += len(canon.frames)
    except CorruptShardError as err:
        if not task.skip_corrupt:
            raise
        counts.corrupt = str(err).split(". Re-download this file")[0]  # skipped already: no advice to skip
    writer.close(counts)
    return counts


def _opt(key: str | None) -> tuple[str, ...]:
    return (key,) if key else ()


def _finite(raw: dict[str, object]) -> bool:
    """True if every float feature of the raw episode is finite."""
    return all(np.isfinite(v).all() for v in raw.values() if isinstance(v, np.ndarray) and v.dtype.kind == "f")


def _reject(canon: Canonical) -> str:
    """Why an episode is not kept ("" if it is)."""
    if not canon.instruction:
        return "skipped_no_language"
    if len(canon.frames) < 2:
        return "skipped_short"
    if not (np.isfinite(canon.state).all() and np.isfinite(canon.action).all()):
        return "dropped_nonfinite"
    return ""


class _ChunkWriter:
    """Accumulates one shard's episodes and writes the chunk files."""

    def __init__(self, task: ShardTask) -> None:
        self.task = task
        self.state: list[np.ndarray] = []
        self.action: list[np.ndarray] = []
        self.ep: dict[str, list] = {"frames": [], "success": [], "instruction": [], "key": []}
        self.offsets: dict[str, list[int]] = {cam: [0] for cam in task.image_keys}
        task.out.parent.mkdir(parents=True, exist_ok=True)
        suffix = "jpg" if task.spec.image_format == "jpeg" else "u8"
        self.paths = {cam: _tmp(task.out.with_name(f"{task.out.name}.{cam}.{suffix}")) for cam in task.image_keys}
        self.files = {cam: open(path, "wb") for cam, path in self.paths.items()}  # noqa: SIM115 - closed in close()

    def add(self, canon: Canonical, frames: dict[str, list[bytes]], key: str) -> None:
        for cam, encoded in frames.items():
            for image in encoded:
                self._write_image(cam, image, key)
        T = len(canon.frames)
        action = np.full((T, 7), np.nan, dtype=np.float32)
        action[:-1] = canon.action
        self.state.append(canon.state.astype(np.float32))
        self.action.append(action)
        self.ep["frames"].append(T)
        self.ep["success"].append(-1 if canon.success is None else int(canon.success))
        self.ep["instruction"].append(canon.instruction)
        self.ep["key"].append(str(key))

    def _write_image(self, cam: str, encoded: bytes, key: str) -> None:
        spec = self.task.spec
        shape = imagelib.encoded_shape(encoded)
        expected = self.task.image_shape
        if expected is not None and shape != tuple(expected):
            raise UserError(
                f"{self.task.shard}: episode {key!r} has a {cam} image of shape {shape}, but the "
                f"{spec.standardize!r} standardisation expects {tuple(expected)}. Is this the right dataset?"
            )
        if shape[2] != 3:
            raise UserError(f"{self.task.shard}: episode {key!r}: {cam} images must be RGB, got shape {shape}")
        size = spec.image_size
        resize = size is not None and (shape[0], shape[1]) != (size, size)
        needs_pixels = spec.image_format == "raw" or resize
        if needs_pixels:
            pixels = imagelib.decode(encoded)
            if resize:
                pixels = imagelib.resize(pixels, size)
            data = pixels.tobytes() if spec.image_format == "raw" else imagelib.encode_jpeg(pixels)
        elif encoded[:2] != b"\xff\xd8":  # PNG source kept as JPEG: re-encode once
            data = imagelib.encode_jpeg(imagelib.decode(encoded))
        else:
            data = bytes(encoded)
        self.files[cam].write(data)
        self.offsets[cam].append(self.offsets[cam][-1] + len(data))

    def close(self, counts: ChunkCounts) -> None:
        out = self.task.out
        for f in self.files.values():
            f.close()
        for path in self.paths.values():
            os.replace(path, path.with_name(path.name[: -len(".tmp")]))
        arrays: dict[str, np.ndarray] = {
            "state": _stack(self.state, (0, 7)),
            "action": _stack(self.action, (0, 7)),
            "ep_frames": np.asarray(self.ep["frames"], dtype=np.int32),
            "ep_success": np.asarray(self.ep["success"], dtype=np.int8),
            "ep_instruction": np.asarray(self.ep["instruction"], dtype=str),
            "ep_key": np.asarray(self.ep["key"], dtype=str),
        }
        for cam, offsets in self.offsets.items():
            arrays[f"{cam}_offsets"] = np.asarray(offsets, dtype=np.int64)
        tmp = _tmp(out.with_suffix(".npz"))
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, out.with_suffix(".npz"))
        summary = {"shard": self.task.shard.name, "shard_bytes": self.task.shard.stat().st_size, **counts.__dict__}
        _tmp(out.with_suffix(".json")).write_text(json.dumps(summary))
        os.replace(_tmp(out.with_suffix(".json")), out.with_suffix(".json"))


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _stack(parts: list[np.ndarray], empty_shape: tuple[int, ...]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(empty_shape, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Reading.


class Store:
    """Read-only view of a prepared store: frames, episodes and images.

    Frames of an episode are contiguous; `action[f]` takes frame f to f + 1 and is NaN on the last
    frame of each episode. Images are read through memory maps opened lazily in each process, so a
    Store can be shared with DataLoader workers.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise UserError(f"{self.path} is not a complete prepared store (no meta.json); run python -m data.prepare")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("format") != STORE_FORMAT:
            raise UserError(f"{self.path} was prepared by another robosteer version; prepare it again (force=true)")
        self.cameras: list[str] = list(self.meta["image"]["cameras"])
        self.image_format: str = self.meta["image"]["format"]
        self.image_shape: tuple[int, int, int] = tuple(self.meta["image"]["shape"])
        parts = [np.load(self.path / "chunks" / f"{name}.npz") for name in self.meta["chunks"]]
        self.state = _stack([p["state"] for p in parts], (0, 7))
        self.action = _stack([p["action"] for p in parts], (0, 7))
        self.ep_frames = np.concatenate([p["ep_frames"] for p in parts]).astype(np.int64)
        self.ep_success = np.concatenate([p["ep_success"] for p in parts])
        self.ep_instruction = np.concatenate([p["ep_instruction"] for p in parts])
        self.ep_key = np.concatenate([p["ep_key"] for p in parts])
        self.ep_start = np.concatenate([[0], np.cumsum(self.ep_frames)[:-1]]).astype(np.int64)
        chunk_frames = [len(p["state"]) for p in parts]
        self.chunk_start = np.concatenate([[0], np.cumsum(chunk_frames)]).astype(np.int64)
        self._offsets = {cam: [p[f"{cam}_offsets"] for p in parts] for cam in self.cameras}
        self._maps: dict[tuple[str, int], np.memmap] = {}
        self._pid = os.getpid()

    @property
    def num_frames(self) -> int:
        return len(self.state)

    @property
    def num_episodes(self) -> int:
        return len(self.ep_frames)

    def read_images(self, camera: str, frames: np.ndarray) -> np.ndarray:
        """(B,) frame indices -> (B, H, W, 3) uint8."""
        if camera not in self.cameras:
            raise UserError(f"{self.path} has no camera {camera!r} (it has {self.cameras}); prepare it with wrist=true")
        frames = np.asarray(frames, dtype=np.int64)
        out = np.empty((len(frames), *self.image_shape), dtype=np.uint8)
        chunk = np.searchsorted(self.chunk_start, frames, side="right") - 1
        for c in np.unique(chunk):
            sel = np.nonzero(chunk == c)[0]
            local = frames[sel] - self.chunk_start[c]
            blob = self._map(camera, int(c))
            if self.image_format == "raw":
                out[sel] = blob[local]
            else:
                offsets = self._offsets[camera][c]
                for i, f in zip(sel, local, strict=True):
                    out[i] = imagelib.decode(blob[offsets[f] : offsets[f + 1]])
        return out

    def _map(self, camera: str, chunk: int) -> np.memmap:
        if os.getpid() != self._pid:  # forked into a worker: do not share file handles
            self._maps, self._pid = {}, os.getpid()
        key = (camera, chunk)
        if key not in self._maps:
            name = self.meta["chunks"][chunk]
            if self.image_format == "raw":
                path = self.path / "chunks" / f"{name}.{camera}.u8"
                frames = int(self.chunk_start[chunk + 1] - self.chunk_start[chunk])
                shape = (frames, *self.image_shape)
            else:
                path = self.path / "chunks" / f"{name}.{camera}.jpg"
                shape = None
            if path.stat().st_size == 0:
                self._maps[key] = np.zeros(shape or (0,), dtype=np.uint8)
            else:
                self._maps[key] = np.memmap(path, dtype=np.uint8, mode="r", shape=shape)
        return self._maps[key]
