"""Registries, config composition and entry-point behaviour on bad input."""

from __future__ import annotations

import enum
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from configs import CONFIG_DIR
from configs.registry import Registry, UnknownNameError
from configs.run import check_group_choices, config_changes, record_environment, save_config
from configs.schema import register

REPO = Path(__file__).resolve().parents[1]


def test_registry_suggests_and_lists() -> None:
    reg = Registry[int]("widget")
    reg.register("bridge")(1)
    reg.register("fractal")(2)
    assert reg.get("bridge") == 1 and reg.names() == ["bridge", "fractal"] and "fractal" in reg
    with pytest.raises(UnknownNameError) as err:
        reg.get("bridg")
    assert str(err.value) == "Unknown widget 'bridg'. Did you mean 'bridge'? Known: bridge, fractal."
    with pytest.raises(UnknownNameError, match=r"'zzz'\. Known: bridge, fractal"):
        reg.get("zzz")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("bridge")(3)


def test_group_choices_are_checked() -> None:
    check_group_choices(["data=bridge", "data.data_dir=/x", "force=true"])
    with pytest.raises(UnknownNameError, match="Did you mean 'bridge'"):
        check_group_choices(["data=brige"])


def test_configs_compose_with_overrides() -> None:
    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("prepare_data", overrides=["data=bridge", "data.reward.discount=0.9", "data.data_dir=/d"])
    ds = cfg.data.datasets.bridge
    assert (ds.standardize, ds.tfds_name, ds.version) == ("bridge", "bridge_dataset", "1.0.0")
    assert cfg.data.reward.discount == 0.9 and cfg.data.reward.success_steps == 3
    with (
        initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None),
        pytest.raises(Exception, match="discount"),
    ):
        compose("prepare_data", overrides=["data.reward.discount=not-a-number"])


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data.prepare", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_missing_bridge_fails_cleanly_and_writes_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    proc = _run(["data=bridge", f"data.data_dir={data_dir}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert f"{data_dir}/bridge_dataset/1.0.0" in proc.stderr
    assert "wget" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tfds"] and not any(data_dir.iterdir())


def test_unknown_config_option_suggests(tmp_path: Path) -> None:
    proc = _run(["data=brige"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "Did you mean 'bridge'?" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("train_value", ["stepz=2"], "stepz is not an option of train_value.py (did you mean steps?)"),
        ("train_value", ["+stepz=2"], "stepz is not an option of train_value.py (did you mean steps?)"),
        ("train_value", ["value.encoder.archh=x"], "(did you mean value.encoder.arch?)"),
        ("train_value", ["steps=abc"], "steps: Value 'abc' of type 'str' could not be converted to Integer"),
        ("train_policy", ["+experiment=debug"], "+experiment=debug does not fit train_policy.py: it sets value"),
        (
            "eval_sim",
            ["policy=openvla", "policy.path=~/m/openvla-7b"],
            "Hydra does not expand `~`: write policy.path=$HOME/m/openvla-7b (the shell expands $HOME), or quote",
        ),
        (
            "eval_sim",
            ["name=a=b"],
            "name=a=b is not a valid override (mismatched input '=' expecting <EOF>). If the "
            "value holds characters Hydra's grammar reserves",
        ),
    ],
)
def test_wrong_options_are_user_errors_with_the_fix(script: str, args: list[str], message: str, tmp_path: Path) -> None:
    """What Hydra reports as a composition error (exit 1, its own wording, or silently stores an
    appended unknown option) is an error that names the option, the nearest known one, and how to list them."""
    proc = subprocess.run([sys.executable, str(REPO / f"{script}.py"), *args, f"run_root={tmp_path}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_writer_keeps_tensorflow_out_and_writes_scalars(tmp_path: Path) -> None:
    """TensorFlow in a process makes MuJoCo rendering segfault later: the trainers' writer must not import it."""
    code = (
        "import sys\n"
        "from configs.run import tensorboard_writer\n"
        f"w = tensorboard_writer({str(tmp_path)!r})\n"
        "[w.add_scalar('loss', float(i), i) for i in range(3)]\n"
        "w.close()\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
        "from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n"
        f"acc = EventAccumulator({str(tmp_path / 'tb')!r})\n"
        "acc.Reload()\n"
        "print([e.value for e in acc.Scalars('loss')])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[0.0, 1.0, 2.0]"


def test_an_entry_point_ends_its_process_group_after_its_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun every entry point closes the process group when its job returns (barrier, then
    destroy): ranks that simply exit can abort each other in gloo's threads. Here a one-rank group."""
    import torch.distributed as tdist

    from configs.run import hydra_main

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    seen = []

    @hydra_main("train_value")
    def job(cfg) -> str:
        seen.append((tdist.is_initialized(), cfg.steps))
        return "done"

    monkeypatch.setattr(sys, "argv", ["train_value.py", "+experiment=debug", "steps=3"])
    try:
        job()
        assert seen == [(True, 3)]  # the job ran inside the group, with the command line's config
        assert not tdist.is_initialized()
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()


def test_ctrl_c_ends_an_entry_point_with_a_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from configs.run import hydra_main

    @hydra_main("train_value")
    def job(cfg) -> None:
        raise KeyboardInterrupt  # wherever the job is when Ctrl-C arrives

    monkeypatch.setattr(sys, "argv", ["train_value.py", "+experiment=debug"])
    with pytest.raises(SystemExit) as exit_info:
        job()
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted: train_value.py stopped" in err and "same command (same name=) continues" in err
    assert "Traceback" not in err


def test_first_line_quotes_an_errors_first_line_or_its_type() -> None:
    from configs.errors import first_line

    assert first_line(OSError("no network\nretrying...")) == "no network"
    assert first_line(RuntimeError("  \n  ")) == "RuntimeError"
    assert first_line(ValueError("x" * 500), limit=10) == "x" * 10


def test_a_resume_with_other_options_is_reported_and_the_old_config_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from omegaconf import OmegaConf

    first = OmegaConf.create({"steps": 10, "data": {"reward": {"failure_return": "constant", "discount": 0.98}}})
    save_config(first, tmp_path)
    with caplog.at_level("INFO"):
        save_config(first, tmp_path)  # the same options: nothing to say, nothing kept
    assert not caplog.records and [f.name for f in tmp_path.iterdir()] == ["config.yaml"]

    longer = OmegaConf.merge(first, {"steps": 20})  # routine: an info line
    with caplog.at_level("INFO"):
        save_config(longer, tmp_path)
    assert [r.levelname for r in caplog.records] == ["INFO"] and "steps: 10 -> 20" in caplog.text
    caplog.clear()

    changed = OmegaConf.merge(longer, {"data": {"reward": {"failure_return": "truncated"}}, "seed": 1})
    with caplog.at_level("INFO"):
        save_config(changed, tmp_path)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "data.reward.failure_return: constant -> truncated; seed: None -> 1" in caplog.text
    assert "choose another name=" in caplog.text
    kept = [OmegaConf.load(f) for f in tmp_path.glob("config.*.yaml")]  # each earlier start, none lost
    assert sorted(c.steps for c in kept) == [10, 20] and {c.data.reward.failure_return for c in kept} == {"constant"}
    assert OmegaConf.load(tmp_path / "config.yaml") == changed
    assert config_changes(first, first) == []
    caplog.clear()
    with caplog.at_level("INFO"):  # only top-level options are routine: a nested `steps` changes the math
        save_config(OmegaConf.merge(changed, {"policy": {"steps": 5}}), tmp_path)
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "policy.steps: None -> 5" in caplog.text


def test_each_start_records_its_numerics_and_a_resume_with_other_ones_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One CPU thread and two give different weights (float sums split over threads): a resume that changes
    the thread count, the CPU's instructions, the device, torch or the ranks says the run stops being exact."""
    import json

    import torch

    path = tmp_path / "environment.json"
    with caplog.at_level("INFO"):
        first = record_environment(tmp_path, 0, "cpu")
        record_environment(tmp_path, 0, "cpu")  # a rerun from scratch (killed before any checkpoint)
        record_environment(tmp_path, 2, "cpu")  # an exact resume: the same numerics
    assert not caplog.records
    assert first["threads"] == torch.get_num_threads() and first["torch"] == torch.__version__
    assert first["device"] == "cpu" and first["world_size"] == 1 and first["cpu_capability"]
    assert [e["step"] for e in json.loads(path.read_text())] == [0, 0, 2]

    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 3)
    with caplog.at_level("INFO"):
        record_environment(tmp_path, 4, "cpu", world=2)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert f"threads: {threads} -> {threads + 3}; world_size: 1 -> 2" in caplog.text
    assert "up to step 4" in caplog.text and "OMP_NUM_THREADS" in caplog.text
    history = json.loads(path.read_text())
    assert [(e["step"], e["threads"], e["world_size"]) for e in history][-1] == (4, threads + 3, 2)
    caplog.clear()
    path.write_text("{ not json")  # a damaged record is replaced, training goes on
    with caplog.at_level("INFO"):
        record_environment(tmp_path, 6, "cpu")
    assert "not JSON" in caplog.text and [e["step"] for e in json.loads(path.read_text())] == [6]


class _Mode(enum.Enum):
    FAST = 1


@dataclass
class _Node:
    mode: _Mode = _Mode.FAST
    where: Path = Path("runs/x")
    ks: list[int] = field(default_factory=lambda: [1, 10])


def test_a_live_config_equals_its_saved_yaml(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Enums and paths of a structured config read back from config.yaml as strings: no change, no warning."""
    from omegaconf import OmegaConf

    live = OmegaConf.structured(_Node)
    save_config(live, tmp_path)
    assert config_changes(OmegaConf.load(tmp_path / "config.yaml"), live) == []
    with caplog.at_level("INFO"):
        save_config(live, tmp_path)
    assert not caplog.records and [f.name for f in tmp_path.iterdir()] == ["config.yaml"]
    assert config_changes(live, OmegaConf.merge(live, {"ks": [1, 50]})) == [("ks", [1, 10], [1, 50])]
