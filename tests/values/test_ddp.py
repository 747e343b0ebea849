"""train_value under torchrun: gradients averaged over the ranks (values/agent.py), each rank its own
noise, validation split over the ranks, one writer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.distributed import torchrun

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")
WORKER = "tests.values.ddp_worker"


def test_ranks_on_half_batches_equal_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    out = tmp_path / "ddp.json"
    torchrun(WORKER, "step", str(out))
    result = json.loads(out.read_text())
    assert result["moved"] == result["tensors"]  # every weight and optimiser moment moved
    assert result["max_diff"] < 1e-4  # float noise: summation order, and Adam's step is ~lr on tiny gradients
    assert len(set(result["rank_checksums"])) == 1  # the ranks hold the same weights


@pytest.mark.tf
def test_validation_split_over_ranks_equals_one_process_and_ranks_draw_apart(sim_data_dir: Path,
                                                                            tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "val.json"
    torchrun(WORKER, "validate", str(out), f"data.data_dir={sim_data_dir}", f"run_root={tmp_path}",
             "batch_size=8", "val_batches=3", "value.negative_proportion=0.5")  # fmt: skip
    result = json.loads(out.read_text())
    shared, alone = result["shared"], result["alone"]
    rows = result["rows"]  # every target Q call on each rank: half of a batch of 8
    assert {n for rank in rows for n in rank} == {4} and len(rows[0]) == len(rows[1]) >= 3
    assert "val/auc_success_matched" in alone and shared.keys() == alone.keys()
    for key, value in alone.items():  # the ranks' halves of each batch make up the whole batch
        assert math.isclose(shared[key], value, rel_tol=1e-4, abs_tol=1e-5), (key, shared[key], value)
    rank0, rank1 = result["noise"]
    assert rank0 == result["one"]  # rank 0 draws what a single process draws
    assert rank0["image"] != rank1["image"]  # the same rows, augmented differently on the two ranks


@pytest.mark.tf
def test_data_parallel_run_writes_once_and_validates(sim_data_dir: Path, tmp_path: Path) -> None:
    from configs.checkpoint import list_checkpoints
    from values.critic import load_critic

    # the real entry point, as users launch it (`torchrun --nproc_per_node=2 train_value.py ...`)
    torchrun("train_value", "+experiment=debug", f"data.data_dir={sim_data_dir}", f"run_root={tmp_path}", "name=ddp",
             "steps=2", "val_batches=2")  # fmt: skip
    run = tmp_path / "train_value" / "ddp"
    assert [c.name for c in list_checkpoints(run)] == ["step_000000002"]
    log = (run / "log.txt").read_text()
    assert "auc_success_matched=" in log and "td_error=" in log  # rank 0 logged the gathered validation
    assert (run / "log_rank1.txt").is_file() and "td_error=" not in (run / "log_rank1.txt").read_text()
    assert load_critic(run, device="cpu") is not None
