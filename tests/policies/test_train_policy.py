"""train_policy.py end to end on a small sim dataset: exact resume after a kill, checkpoints that act."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import policies.training as training
from configs.checkpoint import list_checkpoints
from configs.errors import UserError
from policies.base import make_policy
from tests.policies.conftest import DEBUG_TRAIN, observation, tiny_model_config

pytestmark = pytest.mark.tf
REPO = Path(__file__).resolve().parents[2]


class Killed(Exception):
    """Stands for the process being killed right after a checkpoint."""


def run(name: str, data_dir: Path, root: Path, *overrides: str) -> Path:
    cfg = tiny_model_config(name, f"data.data_dir={data_dir}", f"run_root={root}", *DEBUG_TRAIN, *overrides)
    return training.train_policy(cfg)


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:09d}"


def metric_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "train/samples_per_s"} for line in lines]


@pytest.mark.parametrize("name", ["vla", "flow"])
def test_kill_and_resume_equals_an_uninterrupted_run(
    name: str, policy_data_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """4 steps straight == 2 steps, killed after the step-2 checkpoint, resumed for 2 more (bit for bit)."""
    straight = run(name, policy_data_dir, tmp_path, "name=straight", "steps=4")
    save = training._save

    def save_then_die(*args, **kwargs):  # the process dies right after writing checkpoint 2
        path = save(*args, **kwargs)
        if args[-1] == 2:
            raise Killed
        return path

    monkeypatch.setattr(training, "_save", save_then_die)
    with pytest.raises(Killed):
        run(name, policy_data_dir, tmp_path, "name=resumed", "steps=4")
    (tmp_path / "train_policy" / "resumed" / "metrics.jsonl").open("a").write('{"step": 3, "train/loss": 99}\n')
    monkeypatch.setattr(training, "_save", save)
    resumed = run(name, policy_data_dir, tmp_path, "name=resumed", "steps=4")

    a, b = (
        load_file(str(ckpt(straight, 4) / "model.safetensors")),
        load_file(str(ckpt(resumed, 4) / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    half = load_file(str(ckpt(resumed, 2) / "model.safetensors"))
    assert any(not torch.equal(half[k], a[k]) for k in a)  # steps 3-4 trained
    assert "resumed from" in (resumed / "log.txt").read_text()  # in the run's own log, not only on the console
    started = json.loads((resumed / "environment.json").read_text())  # each start with its numerics
    assert [e["step"] for e in started] == [0, 2] and started[0]["threads"] == torch.get_num_threads()
    opt_a = torch.load(ckpt(straight, 4) / "trainer_state.pt", weights_only=False)
    opt_b = torch.load(ckpt(resumed, 4) / "trainer_state.pt", weights_only=False)
    assert opt_a["scheduler"] == opt_b["scheduler"]
    for sa, sb in zip(opt_a["optimizer"]["state"].values(), opt_b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    # the same losses, step by step (the stray line logged after the checkpoint was dropped on resume)
    assert metric_lines(straight) == metric_lines(resumed)
    assert [m["step"] for m in metric_lines(resumed) if "train/loss" in m] == [1, 2, 3, 4]


def test_a_non_finite_loss_between_logs_writes_no_checkpoint(
    policy_data_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """A NaN loss at step 2 with logs every 3 steps and checkpoints every 2: the run stops at the step-2
    checkpoint, naming the steps, and writes none (the weights after step 2 hold the NaN)."""
    from policies.flow import FlowModel

    loss = FlowModel.loss

    def nan_at_step_2(self, batch, generator=None):
        value, metrics = loss(self, batch, generator)
        nan_at_step_2.calls += 1
        if nan_at_step_2.calls == 2:
            value = value * float("nan")
        return value, {**metrics, "loss": value}

    nan_at_step_2.calls = 0
    monkeypatch.setattr(FlowModel, "loss", nan_at_step_2)
    with pytest.raises(FloatingPointError, match="in the 2 steps up to step 2; checkpoint 2 is not written"):
        run("flow", policy_data_dir, tmp_path, "name=nan", "steps=4", "log_every=3", "ckpt_every=2")
    assert list_checkpoints(tmp_path / "train_policy" / "nan") == []


def test_checkpoint_carries_what_acting_needs(policy_data_dir: Path, tmp_path: Path) -> None:
    run_dir = run("flow", policy_data_dir, tmp_path, "name=ckpt", "steps=2")
    latest = list_checkpoints(run_dir)[-1]
    for name in ("model.safetensors", "trainer_state.pt", "config.yaml", "dataset_statistics.json", "meta.json"):
        assert (latest / name).is_file(), name
    meta = json.loads((latest / "meta.json").read_text())
    assert meta["policy"] == "flow" and meta["image_size"] == 32 and meta["datasets"] == ["sim"]
    assert set(json.loads((latest / "dataset_statistics.json").read_text())) == {"sim"}
    assert (run_dir / "log.txt").read_text() and any((run_dir / "tb").iterdir())
    # acting: policy=flow policy.checkpoint=<run dir>, the architecture comes from the checkpoint
    cfg = tiny_model_config("flow", "policy.model.width=64").policy
    cfg.checkpoint, cfg.device = str(run_dir), "cpu"
    policy = make_policy(cfg)
    policy.reset("reach forward")
    actions = policy.sample_actions(observation(0, size=64), 6)
    assert actions.shape == (6, 4, 7) and np.isfinite(actions).all()
    assert np.abs(actions[..., :3]).max() < 0.1  # metres per step, not normalised units


def test_vla_checkpoint_acts(policy_data_dir: Path, tmp_path: Path) -> None:
    run_dir = run("vla", policy_data_dir, tmp_path, "name=vla", "steps=2", "val_every=0")
    assert (list_checkpoints(run_dir)[-1] / "text_tokenizer.json").is_file()
    cfg = tiny_model_config("vla").policy
    cfg.checkpoint, cfg.device = str(list_checkpoints(run_dir)[-1]), "cpu"
    actions = make_policy(cfg).sample_actions(observation(1), 10)
    assert actions.shape == (10, 1, 7) and np.isfinite(actions).all()
    # the same name rerun with another model size: a message that says why, not a state-dict traceback
    with pytest.raises(UserError, match="step_000000002 does not fit the model this command builds"):
        run("vla", policy_data_dir, tmp_path, "name=vla", "steps=4", "val_every=0", "policy.model.lm.hidden_size=64")


def test_untrainable_policy_is_refused_before_writing(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_policy.py"), "policy=random", f"run_root={tmp_path}/runs"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "not trainable" in proc.stderr and "flow, vla" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_data_parallel_steps_equal_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    """torchrun, 2 CPU ranks: each on half a batch, gradients averaged, == one model on the whole batch."""
    from tests.distributed import torchrun

    out = tmp_path / "ddp.json"
    torchrun("tests.policies.ddp_worker", "step", str(out))
    result = json.loads(out.read_text())
    assert result["moved"] == result["tensors"] and result["max_diff"] < 1e-4
    assert len(set(result["rank_checksums"])) == 1  # the ranks hold the same weights


def test_data_parallel_run_writes_once_and_acts(policy_data_dir: Path, tmp_path: Path) -> None:
    from tests.distributed import torchrun

    torchrun("tests.policies.ddp_worker", "train", f"data.data_dir={policy_data_dir}", f"run_root={tmp_path}",
             *DEBUG_TRAIN, "name=ddp", "steps=2")  # fmt: skip
    run_dir = tmp_path / "train_policy" / "ddp"
    assert [m["step"] for m in metric_lines(run_dir) if "train/loss" in m] == [1, 2]  # rank 0 alone logs
    assert (run_dir / "log_rank1.txt").is_file() and ckpt(run_dir, 2).is_dir()
    cfg = tiny_model_config("vla").policy
    cfg.checkpoint, cfg.device = str(run_dir), "cpu"
    assert make_policy(cfg).sample_actions(observation(1), 3).shape == (3, 1, 7)
