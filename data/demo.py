"""`make demo` before the simulator lands: the data pipeline end to end on a generated dataset.

Writes a small dataset in the exact `bridge_dataset` 1.0.0 format (TensorFlow writer process),
prepares its store, computes statistics, and draws a few training batches; prints what it did.

    python -m data.demo [--episodes 40] [--data-dir datasets/demo]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from configs.run import setup_logging
from data.config import DataConfig, DatasetConfig
from data.loader import build_datasets, make_loader
from data.prepare import prepare_data
from data.rlds_writer import stage_episode, write_rlds
from data.synthetic import bridge_episode, bridge_spec

log = logging.getLogger("demo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--data-dir", default="datasets/demo")
    args = parser.parse_args()
    setup_logging()
    data_dir = Path(args.data_dir)
    if not (data_dir / "bridge_dataset" / "1.0.0" / "dataset_info.json").exists():
        shutil.rmtree(data_dir, ignore_errors=True)
        rng = np.random.default_rng(0)
        staging = data_dir / "staging"
        for i in range(args.episodes):
            stage_episode(staging, f"{i:05d}", bridge_episode(rng, i, language=i % 10 != 9))
        start = time.perf_counter()
        keys = sorted(p.stem for p in staging.glob("*.npz"))
        write_rlds(staging, data_dir, "bridge_dataset", "1.0.0", bridge_spec(), splits={"train": keys})
        log.info("wrote %d Bridge-format episodes in %.1f s", len(keys), time.perf_counter() - start)
        shutil.rmtree(staging)
    cfg = OmegaConf.structured(
        DataConfig(
            datasets={"bridge": DatasetConfig(standardize="bridge", tfds_name="bridge_dataset")}, data_dir=str(data_dir)
        )
    )
    prepared = prepare_data(cfg)
    train, weights = build_datasets(prepared, cfg, "train")
    loader = make_loader(train, weights, batch_size=32, seed=0, num_workers=2)
    start = time.perf_counter()
    for step, batch in zip(range(20), loader, strict=False):
        if step == 0:
            log.info("batch: %s", {k: tuple(v.shape) for k, v in batch.items() if hasattr(v, "shape")})
    log.info(
        "%d training transitions, %d instructions; 20 batches of 32 in %.2f s; mean MC return %.2f",
        len(train), len(train.instructions), time.perf_counter() - start, float(train.parts[0].mc_return.mean()),
    )  # fmt: skip


if __name__ == "__main__":
    main()
