"""Numeric parity with OpenVLA's PUBLISHED modelling code on the same (tiny) weights — optional.

Needs an environment with the published pins and a checkout of openvla/openvla (docs/openvla.md):

    python3.11 -m venv /tmp/openvla-pinned && /tmp/openvla-pinned/bin/pip install torch torchvision \\
        transformers==4.40.1 tokenizers==0.19.1 timm==0.9.10 "numpy<2" pillow
    git clone https://github.com/openvla/openvla /tmp/openvla
    OPENVLA_PARITY_PYTHON=/tmp/openvla-pinned/bin/python OPENVLA_REPO=/tmp/openvla \\
        pytest -m slow tests/openvla/test_parity.py

tests/openvla/parity_reference.py runs there; this test compares its numbers with ours.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from policies.openvla.model import OpenVLA, vit_arch
from policies.openvla.policy import bin_centres, to_canonical, unnormalize
from policies.openvla.tiny import REAL_CONFIG, TINY_CONFIG, real_arch, write_tiny_checkpoint
from tests.openvla.helpers import observation, openvla_config

PYTHON, REPO = os.environ.get("OPENVLA_PARITY_PYTHON"), os.environ.get("OPENVLA_REPO")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (PYTHON and REPO), reason="set OPENVLA_PARITY_PYTHON and OPENVLA_REPO (module docstring)"),
]
INSTRUCTION = "Put the spoon on the towel"
# The shared tiny checkpoint (its greedy tokens are mostly non-action ids, decoded as clipped bins) and
# one whose lm_head favours action ids (greedy tokens are action ids: the bin decoding itself).
CHECKPOINTS = ("random", "actions")


@pytest.fixture(scope="module")
def checkpoints(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    actions = write_tiny_checkpoint(tmp_path_factory.mktemp("parity") / "actions", seed=3, action_scale=3.0)
    return {"random": tiny_dir, "actions": actions}


@pytest.fixture(scope="module")
def published(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("parity_io")
    request = {
        "checkpoints": [str(checkpoints[name]) for name in CHECKPOINTS],
        "image": observation(7, size=80)["image_primary"].tolist(),
        "instruction": INSTRUCTION,
        "unnorm_key": "bridge_orig",
        "tiny_archs": {name: vit_arch(name).kwargs for name in TINY_CONFIG["timm_model_ids"]},
        "real_config": REAL_CONFIG,
    }
    (work / "request.json").write_text(json.dumps(request))
    script = Path(__file__).with_name("parity_reference.py")
    command = [PYTHON, str(script), str(work / "request.json"), str(work / "out.json")]
    env = {**os.environ, "OPENVLA_REPO": REPO}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads((work / "out.json").read_text())
    assert out["versions"]["transformers"] == "4.40.1" and out["versions"]["timm"] == "0.9.10"
    return out


def test_real_size_keys_and_shapes_match_the_published_model(published: dict[str, Any]) -> None:
    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in OpenVLA(real_arch()).state_dict().items()}
    assert ours == published["real_shapes"]


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_published_code_loads_our_checkpoint_strictly(published: dict[str, Any], checkpoints: dict, name: str) -> None:
    info = published["checkpoints"][str(checkpoints[name])]["loading_info"]
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_inputs_logits_greedy_action_match(published: dict[str, Any], checkpoints: dict, name: str) -> None:
    """Bit-for-bit in float32 on the CPU (tolerances allow for other kernels)."""
    from policies.base import make_policy

    reference = published["checkpoints"][str(checkpoints[name])]
    policy = make_policy(openvla_config(checkpoints[name]))
    obs = {**observation(7, size=80), "instruction": INSTRUCTION}
    pixel_values, input_ids = policy.inputs(obs)
    assert input_ids[0].tolist() == reference["input_ids"]
    torch.testing.assert_close(pixel_values[0], torch.tensor(reference["pixel_values"]), rtol=0, atol=1e-6)
    model = policy.model
    with torch.no_grad():
        logits = model.language_model(inputs_embeds=model.embed_prefix(pixel_values, input_ids)).logits[0, -1]
    torch.testing.assert_close(logits, torch.tensor(reference["first_logits"]), rtol=1e-4, atol=1e-4)
    ids, _ = model.sample(pixel_values, input_ids, 1, temperature=0.0, restrict=False)
    assert ids[0].tolist() == reference["generated"]
    if name == "actions":
        assert bool(model.tokens.is_action(ids).all())
    action = np.array(reference["action"])
    np.testing.assert_allclose(unnormalize(bin_centres(model.tokens, ids[0].numpy()), policy.stats), action, atol=1e-12)
    np.testing.assert_allclose(policy.act(obs)[0], to_canonical(action), atol=1e-7)
