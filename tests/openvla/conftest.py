"""Fixtures of the OpenVLA tests: one tiny checkpoint in the published layout per session, loaded by the real path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.threads import one_thread  # noqa: F401 - autouse: one intra-op thread


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from policies.openvla.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("openvla") / "tiny")


@pytest.fixture(scope="session")
def loaded(tiny_dir: Path) -> Any:
    """The tiny checkpoint loaded in float32 on the CPU (shared: tests must not modify the model)."""
    from policies.openvla.checkpoint import load_openvla

    return load_openvla(str(tiny_dir), "float32", "cpu")
