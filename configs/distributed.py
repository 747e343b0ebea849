"""torchrun: the rank of this process, its device, and the collectives the training loops need.

    torchrun --nproc_per_node=4 train_value.py data=bridge      # DDP-style (values/agent.py averages gradients)
    torchrun --nproc_per_node=4 train_qsft.py vlm=paligemma ...  # FSDP (policies/qsft/training.py)

torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; a single process needs nothing and every helper here is
then a no-op. The process group uses NCCL on CUDA, gloo on the CPU (what the tests run).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from configs.errors import UserError

# Under torchrun rank r draws its random numbers from seed + r * RANK_SEED, so that the ranks do not
# repeat each other's noise (augmentation, sampled actions, relabelling) on their shards of a batch.
RANK_SEED = 7919


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def seed(self, seed: int) -> int:
        """This rank's seed for random draws (`seed` itself on rank 0 and in a single process)."""
        return seed + RANK_SEED * self.rank

    @property
    def log_name(self) -> str:
        """This rank's log file in the run directory: log.txt for rank 0, log_rank<r>.txt for the others."""
        return "log.txt" if self.main else f"log_rank{self.rank}.txt"


def setup_distributed(device: str) -> Distributed:
    """The process group of a torchrun launch (created once), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed()
    import torch.distributed as dist

    use_cuda = device != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    info = Distributed(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    return info


def end_distributed() -> None:
    """End the process group, if there is one: a barrier first, so that no rank closes its connections
    while another is still receiving the last collective (gloo once aborted rank 0 at exit with
    "terminate called without an active exception"), then destroy it. Every entry point calls this
    when its job returns (configs/run.py `hydra_main`); a no-op in a single process."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def resolve_device(name: str, dist: Distributed) -> torch.device:
    """auto / cuda / cpu; on CUDA this rank's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device=cuda but no CUDA device is available; use device=cpu or device=auto.")
        return torch.device("cuda", dist.local_rank)
    return torch.device(name)


def start_training(device: str, batch_size: int) -> tuple[Distributed, torch.device]:
    """What every trainer starts with: the process group (or one process), this rank's device, and a
    check that `batch_size` splits evenly over the ranks."""
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}: a training batch needs at least one row per rank.")
    dist = setup_distributed(device)
    if batch_size % dist.world:
        raise UserError(f"batch_size={batch_size} must be divisible by the {dist.world} ranks.")
    return dist, resolve_device(device, dist)


def run_directory(dist: Distributed, resume: str | None, root: str, job: str, name: str | None) -> Path:
    """The run directory: `resume`, else `<root>/<job>/<name or timestamp>` made by rank 0 and shared
    (a timestamped name could differ between the ranks)."""
    from configs.checkpoint import latest_checkpoint
    from configs.run import new_run_dir

    if resume:
        if latest_checkpoint(resume) is None:
            raise UserError(f"resume={resume}: no checkpoint there to resume from (expected <dir>/checkpoints/step_*).")
        return Path(resume)
    return broadcast(new_run_dir(root, job, name) if dist.main else None, dist)


def broadcast(value: Any, dist: Distributed) -> Any:
    """Rank 0's `value` (any picklable object) on every rank."""
    if dist.world == 1:
        return value
    import torch.distributed as tdist

    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(dist: Distributed) -> None:
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()


@contextlib.contextmanager
def main_first(dist: Distributed) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes a prepared dataset), the other ranks after it (and reuse it)."""
    if not dist.main:
        barrier(dist)
    yield
    if dist.main:
        barrier(dist)


def mean_over_ranks(values: dict[str, torch.Tensor | float], dist: Distributed) -> dict[str, float]:
    """{name: value} averaged over the ranks (every rank passes the same names)."""
    if dist.world == 1:
        return {k: float(v) for k, v in values.items()}
    import torch.distributed as tdist

    names = sorted(values)
    flat = torch.tensor([float(values[k]) for k in names], dtype=torch.float64)
    if tdist.get_backend() == "nccl":
        flat = flat.cuda()
    tdist.all_reduce(flat)
    return {k: float(v) / dist.world for k, v in zip(names, flat.tolist(), strict=True)}


def gather_lists(values: list[Any], dist: Distributed) -> list[Any]:
    """Every rank's list, concatenated in rank order, on every rank (picklable items)."""
    if dist.world == 1:
        return list(values)
    import torch.distributed as tdist

    boxes: list[Any] = [None] * dist.world
    tdist.all_gather_object(boxes, list(values))
    return [item for box in boxes for item in box]


def average_gradients(params: list[nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of `params` across ranks, in one flat buffer per dtype."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    for dtype in sorted({g.dtype for g in grads}, key=str):  # the same order on every rank
        group = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        torch._foreach_copy_(
            group, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in group]), group, strict=True)]
        )
