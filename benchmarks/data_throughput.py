"""Loader throughput and memory: robosteer's prepared store vs a plain tf.data read of the same shards.

    python benchmarks/data_throughput.py --episodes 150 --scales 1 4 --out benchmarks/results/data_throughput.json

Both produce training *transitions* (image, next image, action) in batches of 256 from a dataset in
the exact `bridge_dataset` 1.0.0 format (256x256 JPEG image_0; the other cameras absent). Each
configuration runs in its own process pinned with `taskset` to 1 or 2 cores, so "per core" means
what it says; peak memory is the peak PSS of the process and its workers, sampled every 50 ms.

- tf.data (dlimp/Octo style, the favourable variant): episodes via `tfds.builder_from_directory`
  with steps undecoded, every frame's JPEG decoded once inside the episode, (frame, next frame)
  pairs built there, then flattened, shuffled through a buffer, batched.
- ours: `data.loader.make_loader` on the prepared store, `jpeg` (two decodes per transition: image
  and next image) and `raw` (decoded frames in the store) formats, thread and process backends,
  several worker counts.
`--scales` grows the dataset by replicating its shards, to show whether memory follows its size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BATCH = 256


def build_dataset(cache: Path, episodes: int, scale: int) -> Path:
    """`cache/scale<k>/bridge_dataset/1.0.0`: `episodes` synthetic episodes, shards replicated k times."""
    base = cache / "scale1"
    if not (base / "bridge_dataset" / "1.0.0" / "dataset_info.json").exists():
        import numpy as np

        from data.rlds_writer import stage_episode, write_rlds
        from data.synthetic import bridge_episode, bridge_spec

        shutil.rmtree(base, ignore_errors=True)
        rng = np.random.default_rng(0)
        for i in range(episodes):
            ep = bridge_episode(rng, i, length=38, missing_cameras=(1, 2, 3))
            stage_episode(base / "staging", f"{i:05d}", ep)
        write_rlds(base / "staging", base, "bridge_dataset", "1.0.0", bridge_spec())
        shutil.rmtree(base / "staging")
    if scale == 1:
        return base
    dst = cache / f"scale{scale}"
    root = dst / "bridge_dataset" / "1.0.0"
    if not (root / "dataset_info.json").exists():
        src = base / "bridge_dataset" / "1.0.0"
        root.mkdir(parents=True, exist_ok=True)
        shards = sorted(src.glob("*-train.tfrecord-*"))
        total = len(shards) * scale
        for copy in range(scale):
            for i, shard in enumerate(shards):
                n = copy * len(shards) + i
                shutil.copy(shard, root / f"bridge_dataset-train.tfrecord-{n:05d}-of-{total:05d}")
        info = json.loads((src / "dataset_info.json").read_text())
        lengths = info["splits"][0]["shardLengths"] * scale
        info["splits"] = [{**info["splits"][0], "shardLengths": lengths}]
        (root / "dataset_info.json").write_text(json.dumps(info))
        shutil.copy(src / "features.json", root / "features.json")
    return dst


# ---------------------------------------------------------------------------------------------
# Measured processes.


def run_tfdata(data_dir: str, cores: int, seconds: float, shuffle_buffer: int) -> dict:
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    tf.config.threading.set_inter_op_parallelism_threads(cores)
    tf.config.threading.set_intra_op_parallelism_threads(cores)
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(f"{data_dir}/bridge_dataset/1.0.0")
    ds = builder.as_dataset("train", decoders={"steps": tfds.decode.SkipDecoding()}, shuffle_files=True)

    def transitions(episode: dict) -> dict:
        steps = episode["steps"]
        frames = tf.map_fn(tf.io.decode_jpeg, steps["observation"]["image_0"], fn_output_signature=tf.uint8)
        return {"image": frames[:-1], "next_image": frames[1:], "action": steps["action"][:-1]}

    ds = ds.repeat().map(transitions, num_parallel_calls=cores).unbatch()
    ds = ds.shuffle(shuffle_buffer).batch(BATCH).prefetch(2)
    return _measure(iter(ds.as_numpy_iterator()), seconds)


def run_ours(data_dir: str, image_format: str, workers: int, seconds: float, backend: str) -> dict:
    import torch
    from omegaconf import OmegaConf

    from data.config import DataConfig, DatasetConfig
    from data.loader import build_datasets, make_loader
    from data.prepare import prepare_data

    torch.set_num_threads(1)
    ds_cfg = DatasetConfig(standardize="bridge", tfds_name="bridge_dataset", image_format=image_format)
    cfg = OmegaConf.structured(DataConfig(datasets={"bridge": ds_cfg}, data_dir=data_dir, prepare_workers=2))
    train, weights = build_datasets(prepare_data(cfg, need_val=False), cfg, "train")
    loader = make_loader(train, weights, BATCH, seed=0, num_workers=workers, backend=backend)
    return _measure(iter(loader), seconds)


def _measure(batches, seconds: float) -> dict:
    for _ in range(3):  # warm-up: workers started, buffers filled
        next(batches)
    sampler = _PssSampler()
    sampler.start()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += len(next(batches)["action"])
    elapsed = time.perf_counter() - start
    sampler.stop()
    return {
        "transitions_per_s": count / elapsed,
        "peak_pss_mb": sampler.peak["Pss"] / 2**20,
        "peak_anonymous_mb": sampler.peak["Anonymous"] / 2**20,
        "seconds": elapsed,
    }


class _PssSampler(threading.Thread):
    """Peak memory of this process and its descendants: PSS (shared pages split fairly, includes
    memory-mapped file pages, which are reclaimable page cache) and anonymous memory (heap, buffers)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self._stop_flag = {"Pss": 0, "Anonymous": 0}, False

    def run(self) -> None:
        while not self._stop_flag:
            self._sample()
            time.sleep(0.05)

    def _sample(self) -> None:
        for key, value in _tree_memory(os.getpid()).items():
            self.peak[key] = max(self.peak[key], value)

    def stop(self) -> None:
        self._stop_flag = True
        self.join()
        self._sample()


def _tree_memory(pid: int) -> dict[str, int]:
    total = {"Pss": 0, "Anonymous": 0}
    for p in [pid, *_descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                key = line.split(":")[0]
                if key in total:
                    total[key] += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def _descendants(pid: int) -> list[int]:
    out = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        out += [int(child), *_descendants(int(child))]
    return out


# ---------------------------------------------------------------------------------------------
# Orchestration.


def _spawn(cores: int, args: list[str]) -> dict:
    cpus = ",".join(str(c) for c in range(cores))
    cmd = ["taskset", "-c", cpus, sys.executable, __file__, "--measure", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _our_configs(workers: list[int]) -> list[tuple[str, str, int]]:
    """(format, backend, workers) combinations; 0 workers is the same for both backends."""
    return [
        (fmt, backend, w)
        for fmt in ("jpeg", "raw")
        for backend in ("threads", "processes")
        for w in workers
        if not (backend == "processes" and w == 0)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=150)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cores", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--shuffle-buffer", type=int, default=10_000, help="tf.data shuffle buffer (transitions)")
    parser.add_argument("--cache", default="/tmp/robosteer-bench/data")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/data_throughput.json"))
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        kind, data_dir, *rest = args.measure
        if kind == "tf":
            result = run_tfdata(data_dir, int(rest[0]), float(rest[1]), int(rest[2]))
        else:
            result = run_ours(data_dir, rest[0], int(rest[1]), float(rest[2]), rest[3])
        print(json.dumps(result))
        return
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "device": "CPU"}, "runs": []}
    for scale in args.scales:
        data_dir = str(build_dataset(Path(args.cache), args.episodes, scale))
        for fmt in ("jpeg", "raw"):  # prepare once per format, outside the measurement
            start = time.perf_counter()
            _spawn(2, ["ours", data_dir, fmt, "0", "0.1", "threads"])
            results["runs"].append({"kind": "prepare", "format": fmt, "scale": scale, "s": time.perf_counter() - start})
        for cores in args.cores:
            tf_run = _spawn(cores, ["tf", data_dir, str(cores), str(args.seconds), str(args.shuffle_buffer)])
            results["runs"].append({"kind": "tf.data", "scale": scale, "cores": cores, **tf_run})
            print(json.dumps(results["runs"][-1]), flush=True)
            for fmt, backend, workers in _our_configs(args.workers):
                run = _spawn(cores, ["ours", data_dir, fmt, str(workers), str(args.seconds), backend])
                results["runs"].append(
                    {"kind": "robosteer", "format": fmt, "backend": backend, "workers": workers, "scale": scale,
                     "cores": cores, **run}
                )  # fmt: skip
                print(json.dumps(results["runs"][-1]), flush=True)
    results["dataset"] = {"episodes_per_scale": args.episodes, "steps_per_episode": 38, "image": "256x256 JPEG"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
