"""train_value's data parallelism under torchrun (values/agent.py averages gradients over the ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed import torchrun

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")


def test_ranks_on_half_batches_equal_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    out = tmp_path / "ddp.json"
    torchrun("tests.values.ddp_worker", str(out))
    result = json.loads(out.read_text())
    assert result["moved"] == result["tensors"]  # every weight and optimiser moment moved
    assert result["max_diff"] < 1e-4  # float noise: summation order, and Adam's step is ~lr on tiny gradients
    assert len(set(result["rank_checksums"])) == 1  # the ranks hold the same weights
