"""Launching a test worker under torchrun: 2 CPU ranks (gloo), as a real torchrun launch would run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def torchrun(module: str, *args: str) -> None:
    """`torchrun --standalone --nproc_per_node=2 -m MODULE ARGS`; fails with the ranks' output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]


def compare_with_reference(mine: dict[str, Any], reference: dict[str, Any], initial: dict[str, Any]) -> dict:
    """Inside a worker, on every rank (it gathers): this rank's state dict against a one-process reference.

    Returns the largest difference over the float tensors, how many of them the reference moved from
    `initial`, and each rank's checksum of its own weights (equal when the ranks stayed in step).
    """
    import torch
    import torch.distributed as tdist

    keys = [k for k, v in reference.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    checksum = torch.tensor([float(sum(mine[k].double().sum() for k in keys))], dtype=torch.float64)
    sums = [torch.zeros(1, dtype=torch.float64) for _ in range(tdist.get_world_size())]
    tdist.all_gather(sums, checksum)
    return {
        "max_diff": max(float((mine[k] - reference[k]).abs().max()) for k in keys),
        "moved": sum(not torch.equal(reference[k], initial[k]) for k in keys), "tensors": len(keys),
        "rank_checksums": [float(s) for s in sums],
    }  # fmt: skip
