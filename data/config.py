"""Config schemas of the data group (`configs/data/*.yaml`) and of `python -m data.prepare`.

Every field is documented where it is declared; yaml files only choose values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class RewardConfig:
    """Sparse success labelling and Monte-Carlo returns (defaults: V-GPS, reference/vgps.md)."""

    # H: the last H transitions of a successful episode get `success_reward` (and are terminal).
    success_steps: int = 3
    # Reward on those last H transitions. V-GPS code: 0 (with -1 elsewhere); Q-SFT wants 1 / 0.
    success_reward: float = 0.0
    # Reward on every other transition (and on every transition of a failed episode).
    step_reward: float = -1.0
    # Mark the rewarded transitions terminal (no bootstrapping past them), as V-GPS and PTR do.
    terminal_on_success: bool = True
    # Discount of the Monte-Carlo return G_t = r_t + discount * (1 - terminal_t) * G_{t+1}.
    discount: float = 0.98
    # Monte-Carlo return of a failed episode (data/rewards.py): "truncated" = the discounted sum up to
    # the time-out (V-GPS's reverse scan; the default: on simulated Lift its critics separate and steer,
    # docs/steering.md), "constant" = step_reward / (1 - discount) at every step (Cal-QL's code, the
    # default of stops 28-30: a time-out is no terminal state, and an episode that keeps failing earns that).
    failure_return: str = "truncated"
    # Episodes whose dataset records no success flag (demonstrations such as Bridge) count as
    # successful; with False they count as failures.
    unknown_is_success: bool = True


@dataclass
class DatasetConfig:
    """One RLDS dataset prepared by tensorflow-datasets: `<data_dir>/<tfds_name>/<version>/`."""

    # Registry name of the standardisation that maps raw steps to canonical steps (data/datasets.py).
    standardize: str = MISSING
    # Directory name of the dataset under data_dir, e.g. "bridge_dataset" (OpenVLA: "bridge_orig").
    tfds_name: str = MISSING
    version: str = "1.0.0"
    # Root directory holding <tfds_name>/<version>; null = the `data.data_dir` of the mixture.
    data_dir: str | None = None
    # Split used for training and, if present in the dataset, the one used for validation.
    split: str = "train"
    val_split: str | None = "val"
    # If the dataset has no `val_split`, hold out this fraction of episodes (by a stable hash of the
    # episode's key) for validation; V-GPS uses 5%.
    val_fraction: float = 0.05
    # Sampling weight in a mixture (V-GPS: bridge 1.0, fractal 0.54087); normalised in code.
    weight: float = 1.0
    # Side length the prepared store keeps images at; null keeps the dataset's native size.
    image_size: int | None = None
    # "jpeg": keep the dataset's JPEG bytes (bit-exact, about the source size on disk, decoded by
    # the loader); "raw": decoded uint8 frames (H*W*3 bytes per frame on disk, fastest to load).
    image_format: str = "jpeg"
    # Also keep the wrist camera as `image_wrist` (if the standardisation defines one).
    wrist: bool = False
    # Keyword options of the standardisation function (e.g. bridge: relabel_actions, drop_first_step).
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """A dataset or a weighted mixture, its prepared store, rewards, normalisation and loading."""

    # name -> dataset; one entry for a single dataset, several for a weighted mixture.
    datasets: dict[str, DatasetConfig] = field(default_factory=dict)
    # Default root of the datasets (relative paths are taken from the working directory).
    data_dir: str = "datasets"
    # Where prepared stores go; null = beside each dataset (<data_dir>/<tfds_name>/<version>/robosteer).
    store_root: str | None = None
    # If set, the image size of every dataset (overrides data.datasets.<name>.image_size).
    image_size: int | None = None
    # How actions are mapped to [-1, 1]: bounds_q99 (OpenVLA: q01/q99), bounds_q999 (V-GPS:
    # p0.1/p99.9), bounds (min/max) or normal (mean/std). The gripper is never normalised.
    normalization: str = "bounds_q99"
    reward: RewardConfig = field(default_factory=RewardConfig)
    # A truncated or corrupt shard: false = stop with an error naming the file; true = skip the
    # rest of that shard and count it in the log.
    skip_corrupt: bool = False
    # Processes used to prepare the store (one shard per task).
    prepare_workers: int = 2
    # Batch builders: threads (JPEG decoding and memory-map copies release the GIL; no
    # inter-process copy of images) or processes (torch DataLoader workers).
    loader: str = "threads"
    # Number of loader threads / worker processes (0: build batches in the training thread).
    num_workers: int = 2
    # Seed of the shuffling order (the order is a function of seed, rank and step only).
    seed: int = 42


@dataclass
class PrepareDataConfig:
    """`python -m data.prepare`: build (or check) the prepared stores and their statistics."""

    data: DataConfig = MISSING
    # Rebuild the store even if a complete one for the same source and options exists.
    force: bool = False


def register(cs: Any) -> None:
    """Register this package's schemas in Hydra's ConfigStore."""
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(name="prepare_data_schema", node=PrepareDataConfig)
