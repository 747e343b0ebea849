"""collect_sim on real robosuite -> RLDS (TensorFlow writer process) -> the data layer, with a resume.

One episode of every task at 64 px, the scripted experts at their default corruption.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from configs import CONFIG_DIR
from configs.schema import register
from data.config import DataConfig, DatasetConfig
from data.images import decode
from data.loader import build_datasets, make_loader
from data.prepare import prepare_data
from data.rlds import RLDSDataset
from sim.runner import episode_specs
from sim.tasks import TASKS

pytestmark = [pytest.mark.sim, pytest.mark.tf]
SIZE = 64
KEYS = (
    "steps/observation/image_primary", "steps/observation/state", "steps/action", "steps/language_instruction",
    "steps/is_terminal", "episode_metadata/success", "episode_metadata/task", "episode_metadata/seed",
)  # fmt: skip


def collect_cfg(data_dir: Path, *overrides: str):
    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose("collect_sim", overrides=["task=suite", "episodes=1", f"sim.image_size={SIZE}",
                                                 "runner.workers=2", f"data_dir={data_dir}", *overrides])  # fmt: skip


def test_collection_resumes_and_round_trips_through_rlds_and_the_data_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import sim.collect

    staged = []
    real_stage = sim.collect.stage_episode

    def stage_then_interrupt(*args, **kwargs):  # Ctrl-C after two episodes are staged
        staged.append(real_stage(*args, **kwargs))
        if len(staged) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(sim.collect, "stage_episode", stage_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        sim.collect.collect(collect_cfg(tmp_path))
    monkeypatch.setattr(sim.collect, "stage_episode", real_stage)
    with caplog.at_level(logging.INFO, logger="sim.collect"):
        root = sim.collect.collect(collect_cfg(tmp_path))
    assert "2 already staged, collecting 2" in caplog.text  # no episode lost or collected twice
    assert root == tmp_path / "robosteer_sim_suite" / "1.0.0"
    assert not (tmp_path / "robosteer_sim_suite-1.0.0.staging").exists()

    tasks = TASKS.names()
    summary = json.loads((root / "collection.json").read_text())["summary"]
    assert sorted(summary) == tasks and all(s["episodes"] == 1 for s in summary.values())
    rlds = RLDSDataset(root)
    assert rlds.splits() == {"train": len(tasks)}
    episodes = [ep for shard in rlds.shards("train") for ep in rlds.episodes(shard, KEYS)]
    seeds = {s.task: s.seed for s in episode_specs(tasks, 1, 0)}  # collect_sim's default seed
    for ep in episodes:
        task = ep["episode_metadata/task"]
        task = task.decode() if isinstance(task, bytes) else task
        assert ep["episode_metadata/seed"] == seeds[task]
        success = bool(ep["episode_metadata/success"])
        assert success == (summary[task]["successes"] == 1) and bool(ep["steps/is_terminal"][-1]) == success
        frames = ep["steps/observation/image_primary"]
        T = len(frames)
        assert decode(frames[0]).shape == (SIZE, SIZE, 3) and ep["steps/observation/state"].shape == (T, 7)
        action = ep["steps/action"]
        assert action.shape == (T, 7) and np.all(action[-1] == 0) and np.isin(action[:-1, 6], (0.0, 1.0)).all()
        instruction = ep["steps/language_instruction"][0]
        assert (instruction.decode() if isinstance(instruction, bytes) else instruction) in TASKS.get(task).instructions

    dataset = DatasetConfig(standardize="robosteer_sim", tfds_name="robosteer_sim_suite", image_format="raw")
    data = OmegaConf.structured(DataConfig({"sim": dataset}, data_dir=str(tmp_path), prepare_workers=1))
    prepared = prepare_data(data, need_val=False)
    assert prepared["sim"].train.num_episodes == len(tasks)
    train, weights = build_datasets(prepared, data, "train")
    batch = next(iter(make_loader(train, weights, batch_size=8, seed=0, num_workers=0)))
    assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["next_image"].dtype == batch["image"].dtype
    assert batch["action"].shape == (8, 7) and float(batch["action"][:, :6].abs().max()) <= 1.0
