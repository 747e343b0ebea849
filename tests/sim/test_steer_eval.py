"""`eval_sim.py steer=true` end to end with a fake environment: a trained critic steers a policy checkpoint.

The environment is tests/sim/fakes.py's (no simulator); everything else is the real path:
`sim.evaluate.build_policy` / `evaluate`, the rollout runner, the critic checkpoint and the summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir

from configs import CONFIG_DIR
from configs.errors import UserError
from configs.schema import register
from sim.config import SimConfig
from tests.sim.fakes import FakeEnv
from tests.threads import one_thread  # noqa: F401 - autouse: one intra-op thread
from tests.values.conftest import sim_data_dir  # noqa: F401 - the session fixture of the value tests


def fake_env(sim_cfg: SimConfig, task: str) -> FakeEnv:
    """Stands in for sim.env.make_sim_env in the worker processes (picklable: module level)."""
    return FakeEnv(task)


@pytest.fixture
def fake_sim(monkeypatch: pytest.MonkeyPatch) -> None:
    import sim.evaluate

    monkeypatch.setattr(sim.evaluate, "make_sim_env", fake_env)


def eval_cfg(runs: Path, *overrides: str):
    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose("eval_sim", overrides=["sim=lift", "episodes=4", "videos=0", "runner.workers=2",
                                              f"run_root={runs}", *overrides])  # fmt: skip


def read_episodes(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "episodes.jsonl").read_text().splitlines()]


@pytest.mark.tf
def test_a_trained_critic_steers_a_policy_checkpoint_in_eval_sim(sim_data_dir: Path, tmp_path: Path,  # noqa: F811
                                                                 fake_sim: None) -> None:  # fmt: skip
    import policies.flow  # noqa: F401 - registers the flow model that tiny_checkpoint builds
    from configs.checkpoint import resolve_checkpoint
    from policies.steering import ValueSteeredPolicy
    from sim.evaluate import build_policy, evaluate
    from sim.report import compare_runs
    from tests.policies.conftest import tiny_checkpoint
    from tests.values.test_train_value import cfg as value_cfg
    from values.train import train_value

    critic_run = train_value(value_cfg(sim_data_dir, tmp_path / "runs", "name=critic", "steps=2"))
    ckpt = resolve_checkpoint(critic_run)
    policy = ["policy=flow", f"policy.checkpoint={tiny_checkpoint('flow', tmp_path / 'flow')}", "policy.device=cpu"]
    steer = ["steer=true", f"steering.critic={critic_run}", "steering.k=4", "steering.beta=0", "steering.device=cpu"]

    # the critic normalises with its checkpoint's statistics, the policy with its own
    steered_policy = build_policy(eval_cfg(tmp_path, *policy, *steer))
    assert isinstance(steered_policy, ValueSteeredPolicy) and steered_policy.k == 4
    (critic_stats,) = json.loads((ckpt / "dataset_statistics.json").read_text()).values()
    assert steered_policy.critic.normalizer.stats == critic_stats != steered_policy.base.normalizer.stats
    steered_policy.close()

    base = evaluate(eval_cfg(tmp_path, *policy, "name=base"))
    steered = evaluate(eval_cfg(tmp_path, *policy, *steer, "name=steered"))
    records = read_episodes(steered)
    assert len(records) == 4 and all(r["error"] is None for r in records)
    summary = json.loads((steered / "steering.json").read_text())
    assert (summary["k"], summary["beta"], summary["critic"]) == (4, 0.0, str(ckpt))
    assert summary["steps"] == sum(r["steps"] for r in records)  # every control step of every episode was steered
    assert summary["mean_q_spread"] > 0 and summary["mean_q_std"] > 0 and summary["mean_chosen_advantage"] > 0
    assert f"steered: K=4, beta=0, critic {ckpt}" in (steered / "summary.md").read_text()
    assert not (base / "steering.json").exists()
    # base and steered ran the same episodes (task, seed): the comparison pairs all of them
    assert "4 common episodes" in compare_runs([base, steered])


def test_steer_needs_a_critic_and_writes_nothing_without_one(tmp_path: Path) -> None:
    from sim.evaluate import evaluate

    with pytest.raises(UserError, match=r"steering\.critic=<run dir of train_value.py>"):
        evaluate(eval_cfg(tmp_path, "steer=true"))
    with pytest.raises(UserError, match=r"steering\.critic=.*nowhere: No checkpoint at"):
        evaluate(eval_cfg(tmp_path, "steer=true", f"steering.critic={tmp_path / 'nowhere'}"))
    for options, message in ((["steering.k=0"], r"steering\.k=0: steering needs at least one candidate"),
                             (["steering.beta=-1"], r"steering\.beta=-1\.0: use beta >= 0"),
                             (["sim.image_size=0"], r"sim\.image_size=0: render at least 8 px")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            evaluate(eval_cfg(tmp_path, "steer=true", "steering.critic=random", *options))
    assert not (tmp_path / "eval_sim").exists()


def test_random_critic_run_and_its_resume_check(tmp_path: Path, fake_sim: None) -> None:
    """The random-critic sanity check runs without a checkpoint; resuming it with other options is refused."""
    from sim.evaluate import evaluate

    steer = ["steer=true", "steering.critic=random", "steering.k=3", "name=random_critic"]
    run = evaluate(eval_cfg(tmp_path, *steer))
    summary = json.loads((run / "steering.json").read_text())
    assert summary["critic"] == "random" and summary["steps"] == sum(r["steps"] for r in read_episodes(run))
    assert evaluate(eval_cfg(tmp_path, *steer)) == run  # same options: resumes (nothing left to run)
    with pytest.raises(UserError, match="steering differ"):
        evaluate(eval_cfg(tmp_path, *steer, "steering.k=5"))


def test_a_rerun_runs_again_the_episodes_that_ended_in_an_error(tmp_path: Path, fake_sim: None) -> None:
    """A crashed worker's episode is recorded as failed with its reason; the same command run again replaces
    that record by a real rollout instead of counting the crash as a policy failure forever."""
    from sim.evaluate import evaluate

    run = evaluate(eval_cfg(tmp_path, "policy=random", "name=crashed"))
    records = read_episodes(run)
    crashed = {**records[1], "success": False, "error": "worker crashed (exit code -9) during step 1"}
    (run / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [records[0], crashed, *records[2:]]))
    evaluate(eval_cfg(tmp_path, "policy=random", "name=crashed"))
    again = read_episodes(run)
    assert len(again) == 4 and all(r.get("error") is None for r in again)
    assert {(r["task"], r["seed"]) for r in again} == {(r["task"], r["seed"]) for r in records}
    assert "running again 1 episodes that ended in an error" in (run / "log.txt").read_text()


def test_compare_to_pairs_the_run_with_an_earlier_one_and_checks_it_first(tmp_path: Path, fake_sim: None) -> None:
    """`compare_to=<base run>` writes sim.report's comparison into the run; a directory that is not a run,
    or a run on another seed or other tasks (no episode would pair up), is refused before anything is written."""
    from sim.evaluate import evaluate

    base = evaluate(eval_cfg(tmp_path, "policy=random", "name=base"))
    refused = [([f"compare_to={tmp_path / 'nowhere'}"], "is not an eval_sim run directory"),
               ([f"compare_to={base}", "seed=7"], "evaluated with seed=1000, this run with seed=7"),
               ([f"compare_to={base}", "sim=stack"], "evaluated lift, this run stack: no episode would")]  # fmt: skip
    for options, message in refused:
        with pytest.raises(UserError, match=message):
            evaluate(eval_cfg(tmp_path, "steer=true", "steering.critic=random", "name=other", *options))
    assert not (tmp_path / "eval_sim" / "other").exists()

    run = evaluate(eval_cfg(tmp_path, "steer=true", "steering.critic=random", "name=steered", f"compare_to={base}"))
    report = (run / "comparison.md").read_text()
    assert "## base" in report and "## steered" in report and "base vs steered: 4 common episodes" in report
    assert json.loads((run / "comparison.json").read_text())["paired"]["base vs steered"]["common"] == 4
    assert (run / "comparison.png").stat().st_size > 0 and "compared with" in (run / "log.txt").read_text()
