"""Fixtures of the OpenVLA tests: one tiny checkpoint in the published layout per session, loaded by the real path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from policies.openvla.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("openvla") / "tiny")


@pytest.fixture(scope="session")
def loaded(tiny_dir: Path) -> Any:
    """The tiny checkpoint loaded in float32 on the CPU (shared: tests must not modify the model)."""
    from policies.openvla.checkpoint import load_openvla

    return load_openvla(str(tiny_dir), "float32", "cpu")


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Tiny models run fastest on one intra-op thread (a shared 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
