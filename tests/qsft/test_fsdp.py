"""train_qsft under torchrun with FSDP: 2 CPU ranks (gloo), launched as a real torchrun would launch them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed import torchrun

WORKER = "tests.qsft.fsdp_worker"
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")


def test_sharded_steps_equal_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    """Two ranks with half a batch each, weights sharded: the same two Q-SFT steps (AdamW, clipping, Polyak)
    as one unsharded model on the whole batch; for the VLA, the VLA with LoRA adapters, and Idefics3."""
    pytest.importorskip("peft")
    out = tmp_path / "step.json"
    torchrun(WORKER, "step", str(out))
    results = json.loads(out.read_text())
    assert set(results) == {"vla", "vla_lora", "idefics3"}
    for variant, result in results.items():
        assert result["keys_equal"], variant
        assert result["trained_moved"] == result["trained"] > 0, variant  # every trained tensor moved
        # float noise only: summation order differs, and AdamW's step is ~lr (1e-3) even for tiny gradients
        assert result["max_diff"] < 1e-4, (variant, result)


@pytest.mark.tf
def test_fsdp_run_resumes_exactly_and_its_checkpoint_acts(policy_data_dir: Path, tmp_path: Path) -> None:
    """4 steps straight == 2 steps, then a new torchrun resuming to 4 (bit for bit, metrics too); rank 0
    alone writes; the checkpoint holds full weights that one process resumes from and acts with."""
    from policies.base import make_policy
    from tests.policies.conftest import DEBUG_TRAIN, observation
    from tests.qsft.helpers import qsft_config
    from tests.qsft.test_train_qsft import ckpt, metric_lines, run

    common = [f"data.data_dir={policy_data_dir}", f"run_root={tmp_path}", *DEBUG_TRAIN, "warmup_steps=0",
              "lr_schedule=constant"]  # fmt: skip
    torchrun(WORKER, "train", *common, "name=straight", "steps=4")
    torchrun(WORKER, "train", *common, "name=resumed", "steps=2")
    torchrun(WORKER, "train", *common, "name=resumed", "steps=4")
    straight, resumed = tmp_path / "train_qsft" / "straight", tmp_path / "train_qsft" / "resumed"
    a, b = (load_file(str(ckpt(d, 4) / "model.safetensors")) for d in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    half = load_file(str(ckpt(resumed, 2) / "model.safetensors"))
    assert all(not torch.equal(half[k], a[k]) for k in a if k.startswith(("q.", "q_target.")) and "norm" not in k)
    assert metric_lines(straight) == metric_lines(resumed)
    assert [m["step"] for m in metric_lines(resumed) if "train/loss" in m] == [1, 2, 3, 4]  # one writer
    assert (resumed / "log_rank1.txt").is_file()
    # full weights, names as keys: one process resumes the run and acts with it
    run(policy_data_dir, tmp_path, "name=resumed", "steps=5", "warmup_steps=0", "lr_schedule=constant")
    assert ckpt(resumed, 5).is_dir()
    cfg = qsft_config().policy
    cfg.checkpoint, cfg.device = str(resumed), "cpu"
    assert make_policy(cfg).sample_actions(observation(0), 3).shape == (3, 1, 7)
