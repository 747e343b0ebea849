"""The benchmark scripts run end to end at toy sizes on the CPU and write the JSON their docs describe.

The figures themselves come from the GPU machine (benchmarks/run_gpu.sh); these runs only keep the
scripts working between GPU sessions (a moved import once broke value_train.py for a whole stop).
Each script runs in its own process, as users run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, out: Path, *args: str, timeout: int = 300, env: dict | None = None) -> Any:
    """Run benchmarks/<script> with `args` and `--out out`; its JSON (the last run if a list)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args, "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})},
    )  # fmt: skip
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    data = json.loads(out.read_text())
    return data[-1] if isinstance(data, list) else data


def positive(*values: float) -> bool:
    return all(v > 0 and v == v for v in values)


@pytest.mark.tf  # writes its synthetic Bridge-format dataset with the TensorFlow writer (a subprocess)
def test_value_train(tmp_path: Path) -> None:
    result = run_benchmark(
        "value_train.py", tmp_path / "value_train.json", "--device", "cpu", "--arch", "resnet10t",
        "--image-size", "32", "--batch", "8", "--steps", "2", "--warmup", "1", "--no-bf16", "--episodes", "2",
        "--workers", "1", "--cache", str(tmp_path / "cache"),
    )  # fmt: skip
    rates = result["samples_per_s"]
    assert set(rates) >= {"data", "model", "end_to_end", "end_to_end_synced"} and positive(*rates.values())
    assert positive(result["ms_per_step"]["update"], result["update_ms"]) and result["settings"]["arch"] == "resnet10t"


@pytest.mark.parametrize("policy", ["flow", "vla"])
def test_steer_latency(tmp_path: Path, policy: str) -> None:
    result = run_benchmark(
        "steer_latency.py", tmp_path / "steer.json", "--device", "cpu", "--policy", policy, "--policy-size", "tiny",
        "--policy-image-size", "32", "--image-size", "32", "--critic-arch", "resnet10t", "--critic-size", "32",
        "--ks", "1", "4", "--iters", "2", "--warmup", "1", "--threads", "2",
    )  # fmt: skip
    assert set(result["steered"]) == {"1", "4"} and positive(result["policy_ms"]["mean"])
    assert all(positive(s["ms"]["mean"], s["ratio"]) for s in result["steered"].values())
    assert set(result["policy_sample"]) == {"1", "4"} and positive(result["policy_sample"]["4"]["ms"]["mean"])
    assert positive(result["critic_score_50_ms"]["mean"], result["critic_encoder_ms"]["mean"])


def test_qsft_step(tmp_path: Path) -> None:
    result = run_benchmark(
        "qsft_step.py", tmp_path / "qsft.json", "--size", "tiny", "--device", "cpu", "--image-size", "32",
        "--batch", "4", "--iters", "1", "--warmup", "1", "--ks", "1", "2",
    )  # fmt: skip
    assert positive(result["sft_step_ms"], result["qsft_step_ratio"], result["qsft_step_frozen_ratio"])
    assert positive(result["select_ratio_1"], result["select_ratio_2"], result["select_ratio_hf_2"])


def test_openvla_sampling(tmp_path: Path) -> None:
    result = run_benchmark(
        "openvla_sampling.py", tmp_path / "openvla.json", "--size", "tiny", "--device", "cpu", "--dtype", "float32",
        "--threads", "1", "--ks", "1", "2", "--iters", "1", "--warmup", "1",
    )  # fmt: skip
    assert set(result["k"]) == {"1", "2"} and positive(result["greedy_ms"]["mean"], result["preprocess_ms"]["mean"])


@pytest.mark.sim
def test_sim_throughput(tmp_path: Path) -> None:
    result = run_benchmark(
        "sim_throughput.py", tmp_path / "sim.json", "--workers", "2", "--sizes", "0", "--seconds", "1",
        "--repeats", "1", "--per-worker", "1", env={"MUJOCO_GL": "egl"},
    )  # fmt: skip
    (row,) = result["results"]
    assert (row["workers"], row["image_size"]) == (2, 0)
    assert positive(row["raw_steps_per_s"], row["runner_steps_per_s"], row["runner_async_steps_per_s"])
    stats = row["runner_stats"]
    assert stats["steps"] > 0 and 0 < stats["env_busy"] <= 1.05 and positive(stats["env_cpu_ms_per_step"])


@pytest.mark.sim
def test_async_divergence(tmp_path: Path) -> None:
    from tests.policies.conftest import IMAGE_SIZE, tiny_checkpoint

    checkpoint = tiny_checkpoint("flow", tmp_path / "flow")
    result = run_benchmark(
        "async_divergence.py", tmp_path / "div.json", "--checkpoint", str(checkpoint), "--episodes", "1",
        "--size", str(IMAGE_SIZE), "--device", "cpu", env={"MUJOCO_GL": "egl"},
    )  # fmt: skip
    (episode,) = result["episodes"]
    assert episode["lockstep_rerun_identical"] is True and set(episode["max_action_diff"]) == {"0", "5", "20"}
    assert episode["async_identical"] is True and result["async_identical"] == 1  # fixed batch rows (default)
    # the same episode noise in both modes: the first actions differ by rounding at most, not by a draw
    assert episode["max_action_diff"]["0"] < 1e-4
