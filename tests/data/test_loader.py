"""The batch sampler and loader: determinism, exact resume, DDP sharding, mixtures."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from data.loader import MixtureBatchSampler, held_out, make_loader


def _stream(sampler: MixtureBatchSampler, batches: int) -> list[int]:
    return [i for b in range(batches) for i in sampler.batch(b)]


def test_order_is_a_function_of_seed_and_step() -> None:
    a = MixtureBatchSampler([100], [1.0], 8, seed=3)
    b = MixtureBatchSampler([100], [1.0], 8, seed=3)
    c = MixtureBatchSampler([100], [1.0], 8, seed=4)
    assert _stream(a, 30) == _stream(b, 30) != _stream(c, 30)
    resumed = MixtureBatchSampler([100], [1.0], 8, seed=3, start_batch=17, num_batches=5)
    assert list(resumed) == [a.batch(b) for b in range(17, 22)]


def test_every_transition_once_per_epoch_across_ranks() -> None:
    n, world, bs = 103, 3, 4
    seen: list[int] = []
    for rank in range(world):
        sampler = MixtureBatchSampler([n], [1.0], bs, seed=0, rank=rank, world_size=world)
        epoch_len = len(range(rank, n, world))
        seen += _stream(sampler, epoch_len // bs + 2)[:epoch_len]
    assert sorted(seen) == list(range(n))
    # the second epoch is a new permutation of the same transitions
    s0 = MixtureBatchSampler([n], [1.0], 1, seed=0)
    first, second = _stream(s0, n), _stream(s0, 2 * n)[n:]
    assert sorted(second) == list(range(n)) and first != second


def test_mixture_follows_weights_and_covers_each_dataset() -> None:
    sizes, weights = [500, 60], [1.0, 0.54087]  # V-GPS bridge_fractal weights
    sampler = MixtureBatchSampler(sizes, weights, 64, seed=1)
    stream = _stream(sampler, 400)
    which = Counter(int(i >= 500) for i in stream)
    share = which[1] / len(stream)
    assert share == pytest.approx(0.54087 / 1.54087, abs=0.01)
    small = [i - 500 for i in stream if i >= 500][:60]  # first epoch of the small dataset
    assert sorted(small) == list(range(60))
    # resuming inside the second block of compositions reproduces the same batches
    resumed = MixtureBatchSampler(sizes, weights, 64, seed=1, start_batch=1030, num_batches=3)
    assert list(resumed) == [sampler.batch(b) for b in range(1030, 1033)]


def test_unshuffled_validation_visits_everything_once() -> None:
    sampler = MixtureBatchSampler([10, 7], [1, 1], 4, shuffle=False, num_batches=5)
    assert [i for b in sampler for i in b] == list(range(17))


def test_held_out_is_stable_and_proportional() -> None:
    keys = np.array([f"/data/traj{i}" for i in range(4000)])
    mask = held_out(keys, 0.05)
    assert mask.mean() == pytest.approx(0.05, abs=0.01)
    np.testing.assert_array_equal(mask, held_out(keys[::-1], 0.05)[::-1])


class _Toy(torch.utils.data.Dataset):
    """A stand-in MixtureDataset: the batch is a function of the indices only."""

    sizes = np.array([50])

    def __len__(self) -> int:
        return 50

    def __getitems__(self, indices):
        return {"index": torch.as_tensor(indices), "value": torch.as_tensor(indices, dtype=torch.float32) ** 2}


@pytest.mark.parametrize("workers", [0, 2])
def test_threaded_loader_with_no_workers_builds_batches_in_the_calling_thread(workers: int) -> None:
    import threading

    seen: list[str] = []

    class Recording(_Toy):
        def __getitems__(self, indices):
            seen.append(threading.current_thread().name)
            return super().__getitems__(indices)

    batches = iter(make_loader(Recording(), [1.0], 6, seed=5, num_workers=workers, num_batches=3))
    next(batches)  # an unfinished iterator leaves no pool behind with 0 workers
    on_caller = {name == threading.current_thread().name for name in seen}
    assert on_caller == ({True} if workers == 0 else {False})


@pytest.mark.parametrize(("backend", "workers"), [("threads", 0), ("threads", 2), ("processes", 2)])
def test_loader_is_deterministic_and_resumes_exactly(backend: str, workers: int) -> None:
    def indices(**kw) -> list[list[int]]:
        loader = make_loader(_Toy(), [1.0], 6, seed=5, num_workers=workers, backend=backend, **kw)
        return [b["index"].tolist() for b in loader]

    reference = indices(num_batches=12)
    assert indices(num_batches=5) + indices(start_batch=5, num_batches=7) == reference
    single = make_loader(_Toy(), [1.0], 6, seed=5, num_workers=0, num_batches=12)
    assert reference == [b["index"].tolist() for b in single]
