"""Transition batches for training: a map-style dataset over prepared stores and its sampler.

A batch (DESIGN.md "Transition batch"), B transitions, torch tensors:

    image, next_image       uint8 (B, H, W, 3)        (+ image_wrist, next_image_wrist if kept)
    action                  float32 (B, 7)            normalised with the dataset's own statistics
    state, next_state       float32 (B, 7)            (if asked for: value.proprio) the observation
                                                      states of s and s', normalised ("proprio" stats)
    reward, terminal        float32 (B,)              terminal is 0. / 1.
    mc_return               float32 (B,)
    instruction_id          int64 (B,)                index into `dataset.instructions`
    instruction             list[str] (B)
    success, timestep       int64 (B,)                episode success (-1 unknown), step in episode
    action_chunk            float32 (B, h, 7)         (if action_horizon h > 1) actions t .. t+h-1,
    action_chunk_mask       bool (B, h)               normalised; past the episode's end: zeros, False
    dataset                 int64 (B,)                index of the source dataset in the mixture

Order is a pure function of (seed, rank, world size, batch number): `MixtureBatchSampler` draws
each batch's composition from the dataset weights and walks a per-dataset permutation that is new
every epoch and sharded across ranks, so every transition is seen exactly once per epoch across
ranks, a resumed run continues with exactly the batches it would have seen, and the number of
workers changes nothing. Loading is deterministic (no randomness in workers).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from configs.errors import UserError
from data.config import DataConfig, RewardConfig
from data.normalize import ActionNormalizer
from data.prepare import PreparedDataset
from data.rewards import episode_returns, label_rewards, steps_to_end
from data.store import Store


class TransitionDataset(Dataset):
    """The transitions of some episodes of one store, with rewards, returns and normalised actions."""

    def __init__(
        self,
        store: Store,
        normalizer: ActionNormalizer,
        reward: RewardConfig,
        episodes: np.ndarray | None = None,
        vocab: dict[str, int] | None = None,
        cameras: Sequence[str] = ("image_primary",),
        action_horizon: int = 1,
        state_normalizer: ActionNormalizer | None = None,
    ) -> None:
        self.store, self.cameras, self.horizon = store, tuple(cameras), action_horizon
        keep = np.ones(store.num_episodes, bool) if episodes is None else np.asarray(episodes, bool)
        ep = np.nonzero(keep)[0]
        n_trans = store.ep_frames[ep] - 1  # transitions per kept episode
        # frame of each transition: the first T - 1 frames of each kept episode
        self.frame = np.concatenate([np.arange(s, s + n) for s, n in zip(store.ep_start[ep], n_trans, strict=True)])
        self.episode = np.repeat(ep, n_trans)
        to_end = steps_to_end(n_trans)
        self.timestep = (np.repeat(n_trans, n_trans) - 1 - to_end).astype(np.int64)
        self.success = store.ep_success[self.episode].astype(np.int64)
        is_success = self.success == 1 if not reward.unknown_is_success else self.success != 0
        self.reward, terminal = label_rewards(to_end, is_success, reward)
        self.terminal = terminal.astype(np.float32)
        self.mc_return = episode_returns(self.reward, terminal, to_end, is_success, reward)
        # store.action is NaN on each episode's last frame, so NaN marks "past the end" in chunks
        self._all_actions = normalizer.normalize(np.nan_to_num(store.action)).astype(np.float32)
        self._all_actions[~np.isfinite(store.action[:, 0])] = np.nan
        self.action = self._all_actions[self.frame]
        # with a state normaliser (value.proprio): batches carry `state` and `next_state`, normalised
        self._states = None if state_normalizer is None else state_normalizer.normalize(store.state).astype(np.float32)
        vocab = vocab if vocab is not None else {}
        for text in np.unique(store.ep_instruction[ep]):
            vocab.setdefault(str(text), len(vocab))
        self.vocab = vocab
        self.instruction_id = np.asarray([vocab[str(t)] for t in store.ep_instruction[self.episode]], np.int64)

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        """A collated batch of the given transitions (the DataLoader's fast path)."""
        idx = np.asarray(indices, dtype=np.int64)
        frames = self.frame[idx]
        batch: dict[str, Any] = {}
        for cam in self.cameras:
            key = "image" if cam == "image_primary" else cam  # image, image_wrist
            batch[key] = torch.from_numpy(self.store.read_images(cam, frames))
            batch[f"next_{key}"] = torch.from_numpy(self.store.read_images(cam, frames + 1))
        batch["action"] = torch.from_numpy(self.action[idx])
        if self._states is not None:
            batch["state"] = torch.from_numpy(self._states[frames])
            batch["next_state"] = torch.from_numpy(self._states[frames + 1])
        if self.horizon > 1:
            batch.update(self._chunks(frames))
        batch["reward"] = torch.from_numpy(self.reward[idx])
        batch["terminal"] = torch.from_numpy(self.terminal[idx])
        batch["mc_return"] = torch.from_numpy(self.mc_return[idx])
        batch["instruction_id"] = torch.from_numpy(self.instruction_id[idx])
        batch["instruction"] = [str(s) for s in self.store.ep_instruction[self.episode[idx]]]
        batch["success"] = torch.from_numpy(self.success[idx])
        batch["timestep"] = torch.from_numpy(self.timestep[idx])
        return batch

    def _chunks(self, frames: np.ndarray) -> dict[str, torch.Tensor]:
        """Actions of frames t .. t+h-1 (same episode only), zero-padded, with their validity mask."""
        steps = frames[:, None] + np.arange(self.horizon)[None]  # (B, h)
        steps = np.minimum(steps, len(self._all_actions) - 1)
        chunk = self._all_actions[steps]
        # valid while no NaN (an episode's last frame) occurred at or before this position
        valid = np.cumprod(np.isfinite(chunk[..., 0]), axis=1).astype(bool)
        chunk = np.where(valid[..., None], np.nan_to_num(chunk), 0.0).astype(np.float32)
        return {"action_chunk": torch.from_numpy(chunk), "action_chunk_mask": torch.from_numpy(valid)}


class MixtureDataset(Dataset):
    """Several TransitionDatasets behind one global index (dataset d owns [offset_d, offset_d+1))."""

    def __init__(self, parts: Sequence[TransitionDataset], names: Sequence[str]) -> None:
        shapes = {p.store.image_shape for p in parts}
        if len(shapes) > 1:
            raise UserError(
                f"Datasets {list(names)} have different image shapes {sorted(shapes)}: set "
                "data.datasets.<name>.image_size so they match."
            )
        self.parts, self.names = list(parts), list(names)
        self.sizes = np.asarray([len(p) for p in parts], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        vocab = parts[0].vocab if parts else {}
        self.instructions = sorted(vocab, key=vocab.get)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        idx = np.asarray(indices, dtype=np.int64)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        pieces, order = [], []
        for d in np.unique(which):
            sel = np.nonzero(which == d)[0]
            pieces.append(self.parts[d].__getitems__(idx[sel] - self.offsets[d]))
            pieces[-1]["dataset"] = torch.full((len(sel),), int(d), dtype=torch.int64)
            order.append(sel)
        return _merge(pieces, np.concatenate(order))


def _merge(pieces: list[dict[str, Any]], order: np.ndarray) -> dict[str, Any]:
    """Concatenate per-dataset batches and put the rows back in the requested order."""
    if len(pieces) == 1 and np.array_equal(order, np.arange(len(order))):
        return pieces[0]
    inverse = np.argsort(order)
    out: dict[str, Any] = {}
    for key in pieces[0]:
        if isinstance(pieces[0][key], list):
            flat = [x for p in pieces for x in p[key]]
            out[key] = [flat[i] for i in inverse]
        else:
            out[key] = torch.cat([p[key] for p in pieces])[torch.from_numpy(inverse)]
    return out


class MixtureBatchSampler(Sampler[list[int]]):
    """Batches of global indices into a MixtureDataset; see the module docstring.

    Args:
        sizes: transitions per dataset.
        weights: sampling weights (normalised here). Ignored when shuffle is False.
        start_batch: the first batch to yield (resume: the number of batches already trained on).
        num_batches: stop after this many batches; None = endless (training).
    """

    _BLOCK = 1024  # batches whose compositions are drawn together

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        start_batch: int = 0,
        num_batches: int | None = None,
    ) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64)
        if (self.sizes <= 0).any():
            raise UserError(f"Every dataset of a mixture needs transitions; sizes are {self.sizes.tolist()}.")
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world = rank, world_size
        self.shuffle = shuffle
        self.start_batch, self.num_batches = start_batch, num_batches
        # per rank, dataset d's epoch holds the positions rank, rank + W, ... of its permutation
        self.rank_sizes = (self.sizes - rank + world_size - 1) // world_size
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}
        self._block_cache: tuple[int, np.ndarray] = (-1, np.zeros((1, len(self.sizes)), np.int64))

    def __iter__(self) -> Iterator[list[int]]:
        b = self.start_batch
        while self.num_batches is None or b < self.start_batch + self.num_batches:
            yield self.batch(b)
            b += 1

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an endless sampler has no length")
        return self.num_batches

    def batch(self, b: int) -> list[int]:
        """The global indices of batch number `b` (a pure function of b)."""
        counts, positions = self._composition(b)
        out: list[np.ndarray] = []
        for d, (count, pos) in enumerate(zip(counts, positions, strict=True)):
            if count:
                out.append(self._stream(d, pos, count) + self.offsets[d])
        return np.concatenate(out).tolist()

    def _composition(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(samples per dataset in batch b, per-dataset stream position at its start)."""
        D = len(self.sizes)
        if D == 1 or not self.shuffle:
            if D == 1:
                return np.array([self.batch_size]), np.array([b * self.batch_size])
            # unshuffled mixtures (validation) walk the datasets one after another
            start = b * self.batch_size
            stops = np.cumsum(self.rank_sizes)
            lo = np.clip(start - (stops - self.rank_sizes), 0, self.rank_sizes)
            hi = np.clip(start + self.batch_size - (stops - self.rank_sizes), 0, self.rank_sizes)
            return hi - lo, lo
        block, within = divmod(b, self._BLOCK)
        cum = self._block_positions(block)  # (BLOCK + 1, D) positions at each batch of the block
        return cum[within + 1] - cum[within], cum[within]

    def _block_positions(self, block: int) -> np.ndarray:
        """(BLOCK + 1, D) per-dataset stream positions at each batch boundary of `block`."""
        cached, positions = self._block_cache
        if cached > block:
            cached, positions = -1, np.zeros((1, len(self.sizes)), np.int64)
        while cached < block:  # walk forward from the last block computed
            cached += 1
            rng = np.random.default_rng([self.seed, self.rank, cached, 7])
            counts = rng.multinomial(self.batch_size, self.weights, size=self._BLOCK)
            positions = np.vstack([positions[-1], positions[-1] + np.cumsum(counts, axis=0)])
        self._block_cache = (cached, positions)
        return positions

    def _stream(self, d: int, pos: int, count: int) -> np.ndarray:
        """Entries pos .. pos + count of dataset d's endless per-rank stream (local indices)."""
        n = int(self.rank_sizes[d])
        k = np.arange(pos, pos + count)
        epochs, within = np.divmod(k, n)
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._epoch_order(d, int(e))[self.rank + within[sel] * self.world]
        if not self.shuffle:
            return out[k < n]  # one pass only
        return out

    def _epoch_order(self, d: int, epoch: int) -> np.ndarray:
        key = (d, epoch)
        if key not in self._perm_cache:
            n = int(self.sizes[d])
            order = np.random.default_rng([self.seed, d, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perm_cache = {k: v for k, v in self._perm_cache.items() if k[0] != d}
            self._perm_cache[key] = order
        return self._perm_cache[key]


def _collated(batch: dict[str, Any]) -> dict[str, Any]:
    """collate_fn: `__getitems__` already returns a collated batch."""
    return batch


def held_out(keys: np.ndarray, fraction: float) -> np.ndarray:
    """(E,) bool: episodes whose stable key hash falls in the validation fraction."""
    h = np.asarray([int(hashlib.sha1(str(k).encode()).hexdigest()[:8], 16) for k in keys], dtype=np.float64)
    return h / 2**32 < fraction


def build_datasets(
    prepared: dict[str, PreparedDataset], data: DataConfig, split: str = "train", action_horizon: int = 1,
    proprio: bool = False,
) -> tuple[MixtureDataset, list[float]]:  # fmt: skip
    """The mixture of `split` ("train" or "val") over every dataset of the config, and its weights.

    Validation uses the dataset's own val split when it has one, else the held-out episodes of its
    train split (`val_fraction`). Each dataset is normalised with its own statistics; `proprio`: its
    batches also carry the normalised `state` and `next_state`.
    """
    vocab: dict[str, int] = {}
    parts, names, weights = [], [], []
    for name, p in prepared.items():
        cams = p.train.cameras
        normalizer = ActionNormalizer(p.stats, data.normalization, source=f"{name} statistics")
        if split == "train":
            store, episodes = p.train, (None if p.val else ~held_out(p.train.ep_key, p.config.val_fraction))
        else:
            store = p.val or p.train
            episodes = None if p.val else held_out(p.train.ep_key, p.config.val_fraction)
        if episodes is not None and not episodes.any():
            raise UserError(
                f"{name}: no {split} episodes. Episodes go to the held-out split by a hash of their key, a share "
                f"data.datasets.{name}.val_fraction={p.config.val_fraction} of them; with {len(set(p.train.ep_key))} "
                f"episodes none fell in the {split} split. Use more episodes (a few dozen at least), or another "
                "val_fraction."
            )
        states = ActionNormalizer(p.stats, data.normalization, f"{name} statistics", key="proprio") if proprio else None
        parts.append(TransitionDataset(store, normalizer, data.reward, episodes, vocab, cams, action_horizon, states))
        names.append(name)
        weights.append(p.config.weight)
    return MixtureDataset(parts, names), weights


class ThreadedLoader:
    """Builds batches in a thread pool and yields them in sampler order.

    JPEG decoding (libjpeg-turbo) and NumPy copies from memory maps release the GIL, so threads
    scale over cores without the DataLoader's inter-process copy of every image (a 256-transition
    batch of 256x256 frames is ~100 MB). Same batches, same order as the process-based loader.
    """

    def __init__(
        self, dataset: Dataset, batch_sampler: Iterable[list[int]], threads: int, prefetch: int, pin_memory: bool
    ) -> None:
        self.dataset, self.batch_sampler = dataset, batch_sampler
        self.threads, self.prefetch, self.pin_memory = max(threads, 0), max(prefetch, 1), pin_memory

    def _load(self, indices: list[int]) -> dict[str, Any]:
        batch = self.dataset.__getitems__(indices)
        if self.pin_memory:
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = iter(self.batch_sampler)
        if self.threads == 0:  # in the calling thread: no pool left behind by an iterator that is not finished
            yield from (self._load(b) for b in batches)
            return
        with ThreadPoolExecutor(self.threads, thread_name_prefix="loader") as pool:
            pending = deque(pool.submit(self._load, b) for _, b in zip(range(self.prefetch), batches, strict=False))
            while pending:
                batch = pending.popleft().result()
                upcoming = next(batches, None)
                if upcoming is not None:
                    pending.append(pool.submit(self._load, upcoming))
                yield batch

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]


def make_loader(
    dataset: MixtureDataset,
    weights: Sequence[float],
    batch_size: int,
    *,
    seed: int,
    num_workers: int = 2,
    backend: str = "threads",
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    start_batch: int = 0,
    num_batches: int | None = None,
    pin_memory: bool = False,
) -> Iterable[dict[str, Any]]:
    """Batches of `MixtureBatchSampler` (module docstring), built by `num_workers` threads or processes.

    `backend="threads"` (default, see ThreadedLoader) or `"processes"` (torch DataLoader workers).
    Both give the same batches in the same order; 0 workers builds batches in the calling thread.
    """
    sampler = MixtureBatchSampler(
        dataset.sizes, weights, batch_size, seed, rank, world_size, shuffle, start_batch, num_batches
    )
    if backend == "threads":
        return ThreadedLoader(dataset, sampler, num_workers, prefetch=2 * max(num_workers, 1), pin_memory=pin_memory)
    if backend != "processes":
        raise UserError(f"Unknown loader backend {backend!r}; use threads or processes.")
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=_collated,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )
