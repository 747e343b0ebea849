"""train_qsft end to end on the policy tests' small sim dataset: exact resume, acting, critic, frozen pi_phi."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import policies.qsft.training as training
from configs.errors import UserError
from policies.base import make_policy
from policies.qsft.policy import load_qsft_critic
from tests.policies.conftest import DEBUG_TRAIN, observation, tiny_checkpoint
from tests.qsft.helpers import qsft_config

pytestmark = pytest.mark.tf


class Killed(Exception):
    """Stands for the process being killed right after a checkpoint."""


def run(data_dir: Path, root: Path, *overrides: str) -> Path:
    cfg = qsft_config(f"data.data_dir={data_dir}", f"run_root={root}", *DEBUG_TRAIN, *overrides)
    return training.train_qsft(cfg)


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:09d}"


def metric_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "train/samples_per_s"} for line in lines]


def test_kill_and_resume_equals_an_uninterrupted_run(policy_data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """4 steps straight == 2 steps, killed after the step-2 checkpoint, resumed for 2 more (bit for bit)."""
    extra = ("steps=4", "augment=true", "polyak=0.1")
    straight = run(policy_data_dir, tmp_path, "name=straight", *extra)
    save = training._save

    def save_then_die(*args, **kwargs):
        path = save(*args, **kwargs)
        if args[-1] == 2:
            raise Killed
        return path

    monkeypatch.setattr(training, "_save", save_then_die)
    with pytest.raises(Killed):
        run(policy_data_dir, tmp_path, "name=resumed", *extra)
    monkeypatch.setattr(training, "_save", save)
    resumed = run(policy_data_dir, tmp_path, "name=resumed", *extra)

    a, b = (
        load_file(str(ckpt(straight, 4) / "model.safetensors")),
        load_file(str(ckpt(resumed, 4) / "model.safetensors")),
    )
    assert a.keys() == b.keys() and {k.split(".")[0] for k in a} == {"pi", "q", "q_target"}
    for key in a:
        assert torch.equal(a[key], b[key]), key
    half = load_file(str(ckpt(resumed, 2) / "model.safetensors"))
    for part in ("pi.", "q.", "q_target."):  # all three moved in steps 3-4 (joint pi_phi, Polyak target)
        assert any(not torch.equal(half[k], a[k]) for k in a if k.startswith(part)), part
    assert metric_lines(straight) == metric_lines(resumed)
    logged = [m for m in metric_lines(resumed) if "train/loss" in m]
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    assert all(0 <= m["train/target"] <= 1 and np.isfinite(m["train/q_loss"]) for m in logged)
    assert any("val/q_loss" in m for m in metric_lines(resumed))
    assert any((straight / "tb").iterdir()) and (straight / "log.txt").read_text()
    assert "resumed from" in (resumed / "log.txt").read_text()
    assert [e["step"] for e in json.loads((resumed / "environment.json").read_text())] == [0, 2]


def test_checkpoint_acts_and_scores(policy_data_dir: Path, tmp_path: Path) -> None:
    run_dir = run(policy_data_dir, tmp_path, "name=act", "steps=2", "val_every=0", "policy.model.labels=dummy")
    cfg = qsft_config("policy.beta=2.0").policy
    cfg.checkpoint, cfg.device = str(run_dir), "cpu"
    policy = make_policy(cfg)
    policy.reset("reach forward")
    actions = policy.sample_actions(observation(0), 5)
    assert actions.shape == (5, 1, 7) and np.isfinite(actions).all()
    critic = load_qsft_critic(run_dir, "ratio", device="cpu")
    scores = critic.score(observation(0), actions[:, 0])
    assert scores.shape == (5,) and torch.isfinite(scores).all() and (scores > 0).all()
    batch = critic.score_batch([observation(0), observation(1)], np.stack([actions[:, 0], actions[:, 0]]))
    torch.testing.assert_close(batch[0], scores)
    p_theta = load_qsft_critic(run_dir, "p_theta", device="cpu").score(observation(0), actions[:, 0])
    assert ((p_theta > 0) & (p_theta < 1)).all()


def test_mc_backup_run_and_its_value_separation(policy_data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """backup=mc trains on [0, 1] returns; benchmarks/value_separation.py scores the checkpoint like a critic."""
    from tests.values.test_value_separation import load_script

    run_dir = run(policy_data_dir, tmp_path, "name=mc", "steps=2", "backup=mc", "gamma=0.9", "data.reward.discount=0.9",
                  "data.reward.success_reward=1", "data.reward.step_reward=0", "policy.model.labels=dummy")  # fmt: skip
    val = [line for line in metric_lines(run_dir) if "val/target" in line]
    assert val and all(0 < line["val/target"] <= 1 and line["val/target_clipped"] == 0 for line in val)
    script, results = load_script(), {}
    for mode, fraction in (("p_theta", None), ("ratio", 0.5)):
        out = tmp_path / f"sep_{mode}.json"
        argv = ["value_separation.py", str(run_dir), "--qsft-mode", mode, "--out", str(out)]
        monkeypatch.setattr("sys.argv", argv + (["--val-fraction", str(fraction)] if fraction else []))
        script.main()
        results[mode] = json.loads(out.read_text())
        assert results[mode]["scorer"] == f"qsft:{mode}" and 0 <= results[mode]["auc_success_matched"] <= 1
    # the split hashes episode keys: a larger held-out fraction keeps the smaller one's episodes and adds some
    assert results["ratio"]["transitions"] > results["p_theta"]["transitions"]
    # benchmarks/qsft_backup.py on the same checkpoint: the run's floor, ordered estimates, JSON out
    from benchmarks import qsft_backup as backup

    out = tmp_path / "backup.json"
    monkeypatch.setattr("sys.argv", ["qsft_backup.py", str(run_dir), "--out", str(out)])
    backup.main()
    result = json.loads(out.read_text())
    assert result["floor"] == 1e-4 and result["transitions"] == results["p_theta"]["transitions"]
    assert 0 <= result["mc_return"] <= 1  # the run's rewards are in Q-SFT's units: compared
    assert result["max"]["mean"] >= result["double"]["mean"] and result["max"]["mean"] >= result["pi_top"]["mean"]


def test_frozen_behaviour_from_a_train_policy_checkpoint(policy_data_dir: Path, tmp_path: Path) -> None:
    """pi_phi trained beforehand (train_policy.py): Q-SFT starts all three from it and leaves pi_phi alone."""
    init = tiny_checkpoint("vla", tmp_path / "sft")
    run_dir = run(policy_data_dir, tmp_path, "name=frozen", "steps=2", "val_every=0", "behaviour=frozen",
                  f"policy.model.init={init}", "policy.model.vla.lm.hidden_size=64")  # fmt: skip
    before = load_file(str(ckpt(init, 0) / "model.safetensors"))
    after = load_file(str(ckpt(run_dir, 2) / "model.safetensors"))
    for key, value in before.items():
        assert torch.equal(after[f"pi.net.{key}"], value), key
    assert any(not torch.equal(after[f"q.net.{k}"], v) for k, v in before.items())
    # the init's architecture (hidden 32), not the command line's 64, is what the checkpoint records
    cfg = qsft_config().policy
    cfg.checkpoint, cfg.device = str(run_dir), "cpu"
    assert make_policy(cfg).sample_actions(observation(2), 2).shape == (2, 1, 7)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("behaviour=sometimes", "behaviour="), ("pi_floor=1.5", "pi_floor"), ("behaviour=frozen", "policy.model.init"),
        ("backup=sarsa", "backup="), ("backup=mc", "data.reward.success_reward=1 data.reward.step_reward=0"),
        ("policy.model.lora.rank=4", "policy.model.init="),
        ("data.reward.terminal_on_success=false", "returns would exceed 1"),
    ],
)  # fmt: skip
def test_bad_options_fail_before_anything_is_written(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        training.train_qsft(qsft_config(f"run_root={tmp_path}/runs", "data.data_dir=/nowhere", override))
    assert not (tmp_path / "runs").exists()


def test_hf_vlm_backbone_trains_with_gradient_checkpointing_and_acts(policy_data_dir: Path, tmp_path: Path) -> None:
    from tests.qsft.helpers import tiny_idefics3

    vlm = tiny_idefics3(tmp_path / "vlm")
    run_dir = run(policy_data_dir, tmp_path, "name=vlm", "steps=2", "val_every=0", "gradient_checkpointing=true",
                  "policy.model.backbone=hf", f"policy.model.hf.source={vlm}",
                  "policy.model.hf.prompt='<image>{instruction}'")  # fmt: skip
    logged = [m for m in metric_lines(run_dir) if "train/loss" in m]
    assert len(logged) == 2 and all(np.isfinite(m["train/loss"]) for m in logged)
    cfg = qsft_config().policy  # the backbone, model and processor come from the checkpoint
    cfg.checkpoint, cfg.device = str(run_dir), "cpu"
    assert make_policy(cfg).sample_actions(observation(3), 3).shape == (3, 1, 7)
