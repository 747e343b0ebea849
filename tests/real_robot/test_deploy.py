"""deploy_robot.py end to end against the simulated service: sessions, recording, dry run, user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from configs import CONFIG_DIR
from configs.errors import UserError
from configs.schema import register
from data.features import flat_spec, sim_dataset_spec
from data.rlds_writer import load_staged
from real_robot.deploy import deploy
from real_robot.sim_service import free_port_pair
from tests.real_robot.conftest import IMAGE_SIZE

REPO = Path(__file__).resolve().parents[2]


def config(port: int, tmp_path: Path, *overrides: str):
    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose("deploy_robot", overrides=[
            "robot=sim", f"robot.port={port}", f"robot.image_size={IMAGE_SIZE}", "robot.timeout_ms=300",
            "robot.safety.control_hz=20", "instruction=put the spoon on the towel", "max_steps=6",
            f"run_root={tmp_path}", "name=session", *overrides,
        ])  # fmt: skip


def test_session_records_labelled_episodes(sim_service, tmp_path: Path) -> None:
    service = sim_service()
    summaries = deploy(config(service.port, tmp_path, "episodes=2", "success=true", "record.write_at_end=false"))
    assert [s["stop_reason"] for s in summaries] == ["completed 6 steps"] * 2
    run_dir = tmp_path / "deploy_robot" / "session"
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "log.txt", "staging", "episodes.jsonl"}
    lines = [json.loads(line) for line in (run_dir / "episodes.jsonl").read_text().splitlines()]
    assert [(e["episode_id"], e["success"], e["labelled"], e["actions"]) for e in lines] == [
        (0, True, True, 6),
        (1, True, True, 6),
    ]
    episode = load_staged(run_dir / "staging" / "ep0001.npz")
    assert set(flat_spec(sim_dataset_spec(IMAGE_SIZE))) <= set(episode)
    assert episode["steps/action"].shape == (7, 7) and not episode["steps/action"][-1].any()  # null last action
    np.testing.assert_allclose(episode["steps/action"][:-1], np.array(service.executed[6:]), atol=1e-6)
    assert episode["episode_metadata/success"] and episode["steps/is_terminal"][-1]
    assert episode["episode_metadata/file_path"] == "robot/session/ep0001"
    assert episode["steps/language_instruction"][0] == "put the spoon on the towel"
    assert "episode summary" in (run_dir / "log.txt").read_text()
    assert [kind for _, kind, _ in service.events].count("act:reset") == 2  # reset before each episode


@pytest.mark.tf
def test_a_robot_that_stops_answering_ends_the_session_and_keeps_its_episodes(sim_service, tmp_path: Path) -> None:
    """The service goes silent in episode 1 of 2 (its observations, then the safe stop, unanswered): no
    second episode is started, the message says why, and what was recorded is written as the dataset."""
    from real_robot.sim_service import Fault

    service = sim_service(Fault("no_reply", on="obs", at=3, duration_s=30.0))
    cfg = config(service.port, tmp_path, "episodes=2", "success=false", f"record.data_dir={tmp_path / 'data'}")
    with pytest.raises(UserError, match=r"stopped answering in episode 1 .*no observation.*start a new session"):
        deploy(cfg)
    assert [kind for _, kind, _ in service.events].count("act:reset") == 1  # no second episode
    run_dir = tmp_path / "deploy_robot" / "session"
    assert len((run_dir / "episodes.jsonl").read_text().splitlines()) == 1
    assert any((tmp_path / "data").rglob("dataset_info.json"))  # the staged episode was written as RLDS


def test_unlabelled_episode_is_kept(sim_service, tmp_path: Path, monkeypatch) -> None:
    service = sim_service()

    def no_terminal(prompt: str) -> str:
        raise EOFError

    monkeypatch.setattr("builtins.input", no_terminal)
    deploy(config(service.port, tmp_path, "record.write_at_end=false"))
    line = json.loads((tmp_path / "deploy_robot" / "session" / "episodes.jsonl").read_text())
    assert line["success"] is None and line["labelled"] is False
    assert not load_staged(tmp_path / "deploy_robot" / "session" / "staging" / "ep0000.npz")["episode_metadata/success"]


def test_dry_run_sends_nothing_and_records_nothing(sim_service, connect, tmp_path: Path, capsys) -> None:
    service = sim_service()
    connect(service)  # someone initialised the robot earlier; a dry run never sends init
    before = len(service.events)
    deploy(config(service.port, tmp_path, "dry_run=true"))
    assert {kind for _, kind, _ in service.events[before:]} <= {"hash", "obs"}
    assert capsys.readouterr().out.count("would send") == 6
    assert not (tmp_path / "deploy_robot" / "session" / "staging").exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "deploy_robot.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_unreachable_robot_and_bad_input_are_user_errors(tmp_path: Path) -> None:
    out = _cli("instruction=x", f"robot.port={free_port_pair()}", "robot.connect_timeout_s=0.3",
               "robot.timeout_ms=100", f"run_root={tmp_path}")  # fmt: skip
    assert out.returncode == 2 and "No WidowX service answers" in out.stderr and "robot.host" in out.stderr
    for args, message in (
        (["instruction=  "], "instruction is empty"),
        ([], "instruction is empty"),  # not given at all (a missing value in the config)
        (["instruction=x", "robot.port=-1"], "robot.port=-1: the service's REP port is 1..65534"),
    ):
        out = _cli(*args, f"run_root={tmp_path}")
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "deploy_robot").exists()


@pytest.mark.tf
def test_recorded_session_is_rlds_readable_by_the_sim_standardisation(sim_service, tmp_path: Path) -> None:
    from data.datasets import DATASETS
    from data.rlds import RLDSDataset

    service = sim_service()
    deploy(config(service.port, tmp_path, "success=false"))
    root = tmp_path / "deploy_robot" / "session" / "rlds" / "robosteer_widowx" / "1.0.0"
    rlds = RLDSDataset(root)
    std = DATASETS.get("robosteer_sim")
    (raw,) = [e for shard in rlds.shards("train") for e in rlds.episodes(shard, list(rlds.features))]
    canonical = std.fn(raw)
    assert canonical.success is False and canonical.instruction == "put the spoon on the towel"
    np.testing.assert_allclose(canonical.action, np.array(service.executed), atol=1e-6)
    assert canonical.state.shape == (7, 7) and len(raw[std.images["image_primary"]]) == 7
