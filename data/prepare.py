"""Prepare the stores of a dataset config (once), and open them.

    python -m data.prepare data=bridge                  # build or check; prints counts and disk use
    python -m data.prepare data=bridge force=true       # rebuild

Training entry points call `prepare_data` too, so a first run prepares what it needs (with a
progress bar) and later runs open the finished stores in a second. See data/store.py for the format.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from configs.errors import UserError
from data.config import DataConfig, DatasetConfig
from data.datasets import DATASETS, Standardization
from data.normalize import dataset_statistics, load_statistics, save_statistics
from data.rlds import RLDSDataset, locate
from data.store import STORE_FORMAT, ChunkCounts, ShardTask, Store, StoreSpec, build_chunk, chunk_done

log = logging.getLogger(__name__)
STATS_FILE = "dataset_statistics.json"


@dataclass
class PreparedDataset:
    """The stores of one dataset of the config and its normalisation statistics."""

    name: str
    config: DatasetConfig
    train: Store
    val: Store | None  # the dataset's own validation split, if it has one
    stats: dict[str, Any]


def prepare_data(data: DataConfig, force: bool = False, need_val: bool = True) -> dict[str, PreparedDataset]:
    """Prepare (if needed) and open every dataset of `data`. Nothing is written if a dataset is missing."""
    if not data.datasets:
        raise UserError("The data config lists no datasets (data.datasets is empty).")
    found = {name: _open_source(name, ds, data) for name, ds in data.datasets.items()}  # fail before writing
    prepared = {}
    for name, (ds, std, rlds) in found.items():
        train = _prepare_split(name, ds, data, std, rlds, ds.split, force)
        val = None
        if need_val and ds.val_split and ds.val_split in rlds.splits():
            val = _prepare_split(name, ds, data, std, rlds, ds.val_split, force)
        prepared[name] = PreparedDataset(name, ds, train, val, _statistics(train, force))
    return prepared


def _open_source(name: str, ds: DatasetConfig, data: DataConfig) -> tuple[DatasetConfig, Standardization, RLDSDataset]:
    std = DATASETS.get(ds.standardize)
    root = locate(ds.data_dir or data.data_dir, ds.tfds_name, ds.version, std.how_to_get)
    rlds = RLDSDataset(root)
    unknown = set(ds.options) - set(std.options)
    if unknown:
        raise UserError(
            f"data.datasets.{name}.options: {sorted(unknown)} are not options of the {std.name!r} "
            f"standardisation; it has: {sorted(std.options) or 'none'}."
        )
    if ds.image_format not in ("jpeg", "raw"):
        raise UserError(f"data.datasets.{name}.image_format must be jpeg or raw, not {ds.image_format!r}.")
    cameras = _cameras(name, ds, std)
    rlds.check_keys([*std.keys, *(std.images[c] for c in cameras)])
    for cam in cameras:
        shape = rlds.features[std.images[cam]].shape
        if std.image_shape is not None and tuple(shape) != tuple(std.image_shape):
            raise UserError(
                f"{rlds.root}: {std.images[cam]} has shape {tuple(shape)} in features.json, but the "
                f"{std.name!r} standardisation expects {tuple(std.image_shape)}. Is this the right dataset?"
            )
    return ds, std, rlds


def _cameras(name: str, ds: DatasetConfig, std: Standardization) -> tuple[str, ...]:
    if ds.wrist and "image_wrist" not in std.images:
        raise UserError(f"data.datasets.{name}.wrist=true, but {std.name!r} defines no wrist camera.")
    return ("image_primary", "image_wrist") if ds.wrist else ("image_primary",)


def _prepare_split(
    name: str, ds: DatasetConfig, data: DataConfig, std: Standardization, rlds: RLDSDataset, split: str, force: bool
) -> Store:
    cameras = _cameras(name, ds, std)
    image_size = data.image_size if data.image_size is not None else ds.image_size
    spec = StoreSpec(
        source=str(rlds.root.resolve()),
        split=split,
        standardize=std.name,
        options={**std.options, **ds.options},
        cameras=cameras,
        image_size=image_size,
        image_format=ds.image_format,
    )
    root = Path(data.store_root) / ds.tfds_name / ds.version if data.store_root else rlds.root / "robosteer"
    path = root / f"{split}-{spec.digest()}"
    shards = rlds.shards(split)
    if not force and _complete(path, shards):
        return Store(path)
    _check_writable(root, name)
    tasks = [
        ShardTask(
            spec, shard, path / "chunks" / f"{split}-{i:05d}", std.keys, {c: std.images[c] for c in cameras},
            std.image_shape, std.key_feature, data.skip_corrupt,
        )
        for i, shard in enumerate(shards)
    ]  # fmt: skip
    todo = [t for t in tasks if force or not chunk_done(t.out, t.shard)]
    log.info("Preparing %s/%s: %d of %d shards -> %s", name, split, len(todo), len(tasks), path)
    _run_tasks(todo, data.prepare_workers, f"{name}/{split}")
    counts = ChunkCounts()
    for task in tasks:
        counts.add(
            ChunkCounts(**{k: v for k, v in _summary(task.out).items() if k in ChunkCounts.__dataclass_fields__})
        )
    corrupt = [s["corrupt"] for t in tasks if (s := _summary(t.out))["corrupt"]]
    first = rlds.features[std.images[cameras[0]]].shape
    shape = (image_size, image_size, 3) if image_size else tuple(first)
    meta = {
        "format": STORE_FORMAT,
        "name": name,
        "spec": spec.__dict__,
        "image": {"cameras": list(cameras), "format": ds.image_format, "shape": list(shape)},
        "chunks": [t.out.name for t in tasks],
        "shards": {t.shard.name: t.shard.stat().st_size for t in tasks},
        "counts": {**counts.__dict__, "corrupt": corrupt},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (path / "meta.json").write_text(json.dumps(meta, indent=1, default=list))
    _log_counts(name, split, meta["counts"], path)
    return Store(path)


def _complete(path: Path, shards: list[Path]) -> bool:
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text())
    return meta.get("format") == STORE_FORMAT and meta.get("shards") == {s.name: s.stat().st_size for s in shards}


def _check_writable(root: Path, name: str) -> None:
    probe = root
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise UserError(
            f"Cannot write the prepared store of {name!r} under {root} (read-only). "
            "Set data.store_root=<a writable directory>."
        )


def _run_tasks(tasks: list[ShardTask], workers: int, label: str) -> None:
    bar = tqdm(total=len(tasks), desc=f"prepare {label}", unit="shard", dynamic_ncols=True)
    episodes = 0
    if workers <= 1 or len(tasks) <= 1:
        results = map(build_chunk, tasks)
        pool = None
    else:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
        results = pool.map(build_chunk, tasks)
    try:
        for counts in results:
            episodes += counts.episodes
            bar.set_postfix(episodes=episodes)
            bar.update()
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _summary(out: Path) -> dict[str, Any]:
    return json.loads(out.with_suffix(".json").read_text())


def _log_counts(name: str, split: str, counts: dict[str, Any], path: Path) -> None:
    size = sum(f.stat().st_size for f in (path / "chunks").iterdir())
    log.info(
        "%s/%s: %d episodes, %d frames kept of %d episodes read (skipped %d without language, %d too short; "
        "dropped %d with NaN/inf); %.2f GB on disk",
        name, split, counts["episodes"], counts["frames"], counts["episodes_read"], counts["skipped_no_language"],
        counts["skipped_short"], counts["dropped_nonfinite"], size / 1e9,
    )  # fmt: skip
    for message in counts["corrupt"]:
        log.warning("skipped the rest of a corrupt shard: %s", message)


def _statistics(store: Store, force: bool) -> dict[str, Any]:
    path = store.path / STATS_FILE
    if path.is_file() and not force:
        return load_statistics(path)
    valid = np.isfinite(store.action[:, 0])
    stats = dataset_statistics(store.action[valid], store.state, store.num_episodes)
    save_statistics(stats, path)
    return stats


if __name__ == "__main__":
    from configs.run import hydra_main

    @hydra_main("prepare_data")
    def main(cfg: Any) -> None:
        prepared = prepare_data(cfg.data, force=cfg.force)
        for name, p in prepared.items():
            log.info("%s: train %s%s", name, p.train.path, f", val {p.val.path}" if p.val else "")

    main()
