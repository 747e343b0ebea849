"""`policy=octo` against OCTO'S OWN CODE, served from Octo's environment — optional (needs that environment).

Octo (JAX, its pins) cannot live in robosteer's environment, so this test drives two: it builds a tiny
random checkpoint with octo-small-1.5's layout through Octo's `from_config` / `save_pretrained`, serves
it with `serve_policy.py policy=octo` under Octo's Python, connects a `RemotePolicy` from here, and
compares every K-sample and every executed action with what Octo's own evaluation stack gives on the
same images and PRNG keys (tests/serve/octo_reference.py: `ResizeImageWrapper`, `HistoryWrapper`,
`TemporalEnsembleWrapper`, `create_tasks`, `sample_actions(..., unnormalization_statistics=...)`).

Set-up (CPU is enough; docs/serving.md, "Checked against Octo's code"):

    python3.11 -m venv /tmp/octo-env
    /tmp/octo-env/bin/pip install "jax[cpu]==0.4.20" flax==0.7.5 numpy==1.24.3 ml_dtypes==0.2.0 chex==0.1.85 \\
        optax==0.1.5 distrax==0.1.5 tensorflow-probability==0.23.0 tensorflow-cpu==2.15.0 \\
        tensorflow_datasets==4.9.2 "tensorflow-metadata<1.16" transformers==4.40.2 "scipy<1.13" einops \\
        ml_collections "gym>=0.26" msgpack "websockets>=13" hydra-core lz4
    git clone https://github.com/octo-models/octo /tmp/octo && git clone https://github.com/kvablack/dlimp /tmp/dlimp
    /tmp/octo-env/bin/pip install --no-deps -e /tmp/octo -e /tmp/dlimp
    OCTO_PYTHON=/tmp/octo-env/bin/python pytest -m slow tests/serve/test_octo_parity.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from policies.remote import RemotePolicy

PYTHON = os.environ.get("OCTO_PYTHON")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PYTHON, reason="set OCTO_PYTHON to the Python of Octo's environment (module docstring)"),
]
REPO = Path(__file__).resolve().parents[2]
REFERENCE = Path(__file__).with_name("octo_reference.py")
SEED = 0  # the server's policy.seed (the default)
TOLERANCE = 1e-5  # absolute, on un-normalised actions
# (instruction, image side, steps, K or "act", slot): sim-sized images (resized to 256 on the way) and
# Octo-sized ones, K candidates per step, and `act` with Octo's temporal ensembling.
EPISODES = [
    ("put the spoon on the towel", 128, 4, 3, 0),
    ("pick up the red cube", 256, 3, 1, 1),
    ("open the drawer", 128, 6, "act", 2),
]


def images(seed: int, size: int, steps: int) -> np.ndarray:
    """A smooth scene with a moving square (noise would make the lanczos resampling the whole test)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, 0.5 * (x + y)], -1) * rng.uniform(80, 200, 3) + rng.uniform(0, 40, 3)
    frames = []
    for t in range(steps):
        frame = base.copy()
        top = int(size * (0.2 + 0.1 * t))
        frame[top : top + size // 5, size // 3 : size // 3 + size // 5] = rng.uniform(0, 255, 3)
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return np.stack(frames)


def policy_keys(slot: int, calls: int) -> list[int]:
    """The PRNG seeds OctoPolicy draws in a slot's first episode (reset without an episode seed): one per
    prediction from the episode's "octo" stream (Policy.episode_stream)."""
    from policies.base import Policy

    class Streams(Policy):  # the base class's streams, with OctoPolicy's seed
        seed = SEED

        def sample_actions(self, obs: dict, k: int, slot: int = 0) -> np.ndarray:
            raise NotImplementedError

    streams = Streams()
    streams.reset("", slot)
    rng = streams.episode_stream(slot, "octo")
    return [int(rng.integers(2**31)) for _ in range(calls)]


def octo_run(*args: str, timeout: float = 900) -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run([PYTHON, str(REFERENCE), *args], capture_output=True, text=True, env=env, timeout=timeout,
                         cwd="/")  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("octo") / "tiny"
    octo_run("build", str(path))
    assert (path / "config.json").exists() and (path / "dataset_statistics.json").exists()
    return path


@pytest.fixture(scope="module")
def expected(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """Octo's own stack on the episodes (augmented_keys=(): a plain resize, as SimplerEnv and policy=octo)."""
    work = tmp_path_factory.mktemp("octo_io")
    meta: dict[str, Any] = {"checkpoint": str(checkpoint), "dataset": "bridge_dataset", "window": 2, "episodes": []}
    arrays: dict[str, np.ndarray] = {}
    for e, (instruction, size, steps, k, slot) in enumerate(EPISODES):
        meta["episodes"].append({"instruction": instruction, "k": 1 if k == "act" else k, "augmented_keys": []})
        arrays[f"images{e}"] = images(e, size, steps)
        arrays[f"seeds{e}"] = np.array(policy_keys(slot, steps))
    np.savez(work / "request.npz", meta=np.array(json.dumps(meta)), **arrays)
    octo_run("expect", str(work / "request.npz"), str(work / "out.npz"))
    return dict(np.load(work / "out.npz"))


@pytest.fixture(scope="module")
def server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    log_path = tmp_path_factory.mktemp("octo_server") / "log.txt"  # a file: an unread pipe could fill and block
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [PYTHON, "serve_policy.py", "policy=octo", f"policy.checkpoint={checkpoint}", "host=127.0.0.1",
               f"port={port}", "warmup_k=[1,3]"]  # fmt: skip
    log = log_path.open("w")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"serve_policy.py policy=octo did not come up:\n{log_path.read_text()[-4000:]}")
        time.sleep(1.0)
    yield port
    proc.terminate()
    proc.wait(30)
    log.close()


def clip_gripper(actions: np.ndarray) -> np.ndarray:
    out = np.array(actions, np.float32)
    out[..., 6] = np.clip(out[..., 6], 0.0, 1.0)
    return out


@pytest.fixture(scope="module")
def served(server: int) -> dict[str, np.ndarray]:
    """What robosteer gets from the served Octo over the wire, episode by episode."""
    policy = RemotePolicy("127.0.0.1", server, timeout_s=300)
    assert policy.chunk == 4 and policy.metadata["policy"] == "octo"
    got: dict[str, np.ndarray] = {}
    for e, (instruction, size, steps, k, slot) in enumerate(EPISODES):
        policy.reset(instruction, slot)
        frames, out = images(e, size, steps), []
        for t in range(steps):
            obs = {"image_primary": frames[t], "instruction": instruction}
            out.append(policy.act(obs, slot)[0] if k == "act" else policy.sample_actions(obs, k, slot))
        got[f"out{e}"] = np.stack(out)
    policy.close()
    return got


def test_the_tiny_checkpoint_has_octo_small_layout(checkpoint: Path) -> None:
    """(`load_pretrained` reading it is what the server does before it answers /healthz.)"""
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model"]["heads"]["action"]["kwargs"]["action_horizon"] == 4
    assert set(config["model"]["observation_tokenizers"]) == {"primary", "wrist"}  # octo-small-1.5's cameras


@pytest.mark.parametrize("episode", [0, 1])
def test_k_samples_equal_octos_sample_actions(expected: dict, served: dict, episode: int) -> None:
    """Same history, pad mask, task, key and un-normalisation as Octo's stack: K candidates per step."""
    _, _, steps, k, _ = EPISODES[episode]
    want = clip_gripper(expected[f"samples{episode}"])  # (steps, K, horizon 4, 7)
    got = served[f"out{episode}"]
    assert got.shape == want.shape == (steps, k, 4, 7)
    print(
        f"episode {episode}: max |ours - Octo's| = {np.abs(got - want).max():.3g}, "
        f"sensitivity {expected[f'sensitivity{episode}']}"
    )
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)
    # not vacuous: every pixel one level brighter, or no pad mask, moves the actions well beyond the tolerance
    assert (expected[f"sensitivity{episode}"] > 10 * TOLERANCE).all(), expected[f"sensitivity{episode}"]


def test_act_equals_octos_temporal_ensembling(expected: dict, served: dict) -> None:
    want = clip_gripper(expected["executed2"])  # what TemporalEnsembleWrapper executed, per step
    got = served["out2"]
    assert got.shape == want.shape == (EPISODES[2][2], 7)
    print(f"act: max |ours - Octo's| = {np.abs(got - want).max():.3g}")
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)


def test_the_reference_ran_octos_code() -> None:
    """Guard: the Octo environment really has Octo (not PyPI's unrelated `octo`) and its pins."""
    code = "import octo.model.octo_model, jax, flax, numpy; print(jax.__version__, flax.__version__, numpy.__version__)"
    run = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd="/", timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"})  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-3:] == ["0.4.20", "0.7.5", "1.24.3"], run.stdout
    assert sys.executable != PYTHON
