"""The Q-SFT config tree: the vlm group, policy=qsft in eval_sim, and the entry point on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from configs import CONFIG_DIR
from configs.schema import register

REPO = Path(__file__).resolve().parents[2]


def test_vlm_group_switches_the_backbone() -> None:
    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        default = compose("train_qsft")
        smol = compose("train_qsft", overrides=["vlm=smolvlm", "policy.model.hf.dtype=float32"])
        qwen = compose("train_qsft", overrides=["vlm=qwen2_vl"])
        evaluate = compose("eval_sim", overrides=["policy=qsft", "policy.beta=4"])
    assert default.policy.model.backbone == "vla" and default.policy.model.hf.source is None
    assert smol.policy.model.backbone == "hf" and smol.policy.model.hf.source == "HuggingFaceTB/SmolVLM-256M-Instruct"
    assert smol.policy.model.hf.dtype == "float32" and "<image>" in smol.policy.model.hf.prompt
    assert "<|image_pad|>" in qwen.policy.model.hf.prompt
    assert evaluate.policy.name == "qsft" and evaluate.policy.beta == 4


def test_entry_point_refuses_bad_options_and_writes_nothing(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_qsft.py"), "behaviour=sometimes", f"run_root={tmp_path}/runs"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "behaviour='sometimes'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()
