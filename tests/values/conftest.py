"""A small simulated-format dataset (toy reaching task, half successes), written once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data.features import sim_dataset_spec
from data.rlds_writer import stage_episode, write_rlds
from data.synthetic import reaching_episode


@pytest.fixture(scope="session")
def sim_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data_dir holding robosteer_sim_suite/1.0.0 (the name `data=sim` reads): 40 episodes of 32 px."""
    root = tmp_path_factory.mktemp("sim")
    rng = np.random.default_rng(0)
    for i in range(40):
        stage_episode(root / "staging", f"{i:04d}", reaching_episode(rng, i, success=i % 2 == 0, image_size=32))
    write_rlds(root / "staging", root / "data", "robosteer_sim_suite", "1.0.0", sim_dataset_spec(32))
    return root / "data"
