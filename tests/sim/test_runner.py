"""The rollout runner with a fake environment (no simulator): batching, seeds, crashes, hangs, Ctrl-C."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from policies.base import Observation, Policy, RandomPolicy
from sim.runner import EpisodeSpec, Runner, episode_seed, episode_specs
from tests.sim.fakes import make_fake_env


class EchoPolicy(Policy):
    """Action x = 0.01 * observed step; records its batch sizes and resets."""

    def __init__(self, interrupt_after: int | None = None) -> None:
        super().__init__()
        self.batches: list[int] = []
        self.resets: list[tuple[str, int]] = []
        self.interrupt_after = interrupt_after

    def reset(self, instruction: str, slot: int = 0, seed: int | None = None) -> None:
        super().reset(instruction, slot, seed)
        self.resets.append((instruction, slot))

    def sample_actions(self, obs: Observation, k: int, slot: int = 0) -> np.ndarray:
        action = np.zeros((k, 1, 7), np.float32)
        action[..., 0] = 0.01 * obs["state"][0]
        return action

    def act_batch(self, observations: Sequence[Observation], slots: Sequence[int] | None = None) -> np.ndarray:
        self.batches.append(len(observations))
        if self.interrupt_after is not None and len(self.batches) > self.interrupt_after:
            raise KeyboardInterrupt
        return super().act_batch(observations, slots)


def specs(seeds: Sequence[int], record: bool = False) -> list[EpisodeSpec]:
    return [EpisodeSpec("fake", s, i, record) for i, s in enumerate(seeds)]


def expected_steps(seed: int) -> int:
    return 3 + seed % 4


def test_episode_seeds_are_deterministic_distinct_and_stable_when_extended() -> None:
    a = episode_specs(["lift", "stack"], 5, base_seed=0)
    assert a == episode_specs(["lift", "stack"], 5, base_seed=0)
    assert [s.index for s in a] == list(range(10)) and [s.task for s in a[:4]] == ["lift", "stack"] * 2
    assert len({s.seed for s in a}) == 10
    assert episode_specs(["lift", "stack"], 8, base_seed=0)[:10] == a  # more episodes keep the first ones
    assert {s.seed for s in episode_specs(["lift", "stack"], 5, base_seed=1)}.isdisjoint({s.seed for s in a})
    assert episode_seed(0, "lift", 3) == a[6].seed and 0 <= a[6].seed < 2**32
    recorded = episode_specs(["lift"], 4, 0, record=lambda i: i < 2)
    assert [s.record for s in recorded] == [True, True, False, False]


def test_task_selections_name_one_task_several_or_the_suite() -> None:
    from configs.errors import UserError
    from sim.tasks import TASKS, task_names

    assert task_names("stack") == ["stack"] and task_names("suite") == TASKS.names()
    assert task_names("stack+lift") == ["stack", "lift"] == task_names("stack+lift+stack")
    with pytest.raises(UserError, match="lfit"):
        task_names("stack+lfit")


@pytest.mark.parametrize("lockstep", [True, False])
def test_runs_every_episode_with_batched_policy_calls(lockstep: bool) -> None:
    policy = EchoPolicy()
    seeds = list(range(7))
    with Runner(make_fake_env, workers=3, lockstep=lockstep) as runner:
        results = list(runner.run(specs(seeds, record=True), policy))
    assert sorted(r.seed for r in results) == seeds
    for r in results:
        n = expected_steps(r.seed)
        assert (r.steps, r.success, r.error, r.instruction) == (n, r.seed % 2 == 0, None, "fake fake")
        assert r.ret == pytest.approx(0.01 * sum(range(n)))  # reward = action x = 0.01 * previous step
        assert r.trajectory.images.shape == (n + 1, 8, 8, 3) and r.trajectory.action.shape == (n, 7)
        np.testing.assert_array_equal(r.trajectory.state[:, 0], np.arange(n + 1))
    assert sum(policy.batches) == sum(expected_steps(s) for s in seeds)  # one action per step
    assert max(policy.batches) == 3 if lockstep else max(policy.batches) <= 3  # without lockstep: whoever is ready
    assert len(policy.resets) == 7 and {slot for _, slot in policy.resets} == {0, 1, 2}


def test_results_do_not_depend_on_the_number_of_workers_or_lockstep() -> None:
    def run(workers: int, lockstep: bool = True) -> dict[int, tuple]:
        with Runner(make_fake_env, workers=workers, lockstep=lockstep) as runner:
            return {r.seed: (r.steps, r.success, r.ret) for r in runner.run(specs(range(6)), EchoPolicy())}

    assert run(1) == run(3) == run(3, lockstep=False)


def test_a_stochastic_policy_gives_the_same_episodes_whatever_the_batches() -> None:
    """The runner passes each episode's seed to reset, so a random policy's draws (whose sum is the
    fake environment's return) are the same with 1 or 3 workers, with lockstep or with the batches a
    slow worker makes timing-dependent; the policy's seed changes them."""
    make_env = functools.partial(make_fake_env, slow_seed=2, slow_s=0.05)

    def run(workers: int, lockstep: bool, seed: int = 0) -> dict[int, float]:
        with Runner(make_env, workers=workers, lockstep=lockstep) as runner:
            return {r.seed: r.ret for r in runner.run(specs(range(8)), RandomPolicy(seed=seed))}

    reference = run(1, True)
    assert len(set(reference.values())) == 8  # every episode drew its own numbers
    assert run(3, False) == reference == run(3, True)
    assert run(3, False, seed=1) != reference


def test_a_neural_policy_repeats_bit_for_bit_async_or_lockstep(tmp_path: Path) -> None:
    """A flow policy (float noise through a network, whose rounding depends on the batch size): with the
    runner's fixed batch rows every episode's return (the sum of its actions' x) is the same bit for
    bit in a lockstep run and in async runs whose batches a slow worker makes timing-dependent; the
    episodes' instructions differ in length, as the sim tasks' phrasings do."""
    from policies.base import make_policy
    from tests.policies.conftest import contract_config

    cfg = contract_config("flow", tmp_path)
    make_env = functools.partial(make_fake_env, slow_seed=2, slow_s=0.05, varied_instructions=True)

    def run(lockstep: bool) -> dict[int, float]:
        policy = make_policy(cfg)
        with Runner(make_env, workers=3, lockstep=lockstep) as runner:
            returns = {r.seed: r.ret for r in runner.run(specs(range(8)), policy)}
        assert policy.batch_rows is None  # the runner's setting ends with its run
        return returns

    reference = run(True)
    assert len(set(reference.values())) == 8
    assert run(False) == reference == run(False)


def test_without_lockstep_a_slow_worker_does_not_hold_the_others_back() -> None:
    """One environment steps 20x slower: lockstep batches every call over both workers; without it
    the fast worker's episodes go on alone (batches of 1) and they all finish."""
    make_env = functools.partial(make_fake_env, slow_seed=0, slow_s=0.2)
    batches = {}
    for lockstep in (True, False):
        policy = EchoPolicy()
        with Runner(make_env, workers=2, lockstep=lockstep) as runner:
            results = {r.seed: r for r in runner.run(specs(range(5)), policy)}
        assert sorted(results) == list(range(5)) and all(r.error is None for r in results.values())
        batches[lockstep] = policy.batches
    assert batches[True].count(1) < batches[False].count(1)
    assert batches[False].count(1) >= sum(expected_steps(s) for s in range(1, 5)) - 1


def test_stats_account_for_the_environments_and_the_policy() -> None:
    """RunnerStats: every step and reset counted with the workers' own timing, every policy call and
    observation; with lockstep the fast worker waits for the slow one, so the workers are busy
    at most about half the time."""
    make_env = functools.partial(make_fake_env, slow_seed=0, slow_s=0.2)
    policy = EchoPolicy()
    with Runner(make_env, workers=2, lockstep=True) as runner:
        results = list(runner.run(specs(range(5)), policy))
    stats, summary = runner.stats, runner.stats.summary()
    assert stats.steps == sum(r.steps for r in results) and stats.resets == 5
    assert (stats.policy_calls, stats.policy_observations) == (len(policy.batches), sum(policy.batches))
    assert 0.2 * expected_steps(0) <= stats.env_s < stats.wall_s  # the slow episode's sleeps, in one worker
    assert stats.env_cpu_s < 0.2  # sleeping is not CPU time
    assert summary["env_busy"] < 0.6 and summary["batch_per_call"] == pytest.approx(
        sum(policy.batches) / len(policy.batches)
    )
    assert "environments busy" in stats.line()


def test_pinned_workers_each_run_on_their_own_cpu() -> None:
    import os

    class Where(EchoPolicy):
        def __init__(self) -> None:
            super().__init__()
            self.cpus: dict[int, list[int]] = {}

        def act_batch(self, observations: Sequence[Observation], slots: Sequence[int] | None = None) -> np.ndarray:
            self.cpus.update({slot: obs["cpus"] for obs, slot in zip(observations, slots, strict=True)})
            return super().act_batch(observations, slots)

    allowed = sorted(os.sched_getaffinity(0))
    for pin, workers in ((True, 3), (False, 2)):
        policy = Where()
        with Runner(make_fake_env, workers=workers, pin_cpus=pin) as runner:
            assert all(r.error is None for r in runner.run(specs(range(4)), policy))
        expected = {i: [allowed[i % len(allowed)]] if pin else allowed for i in range(workers)}
        assert policy.cpus == expected


def test_spinning_workers_give_the_same_episodes_and_poll_while_they_wait() -> None:
    """runner.spin_ms: a worker polls its pipe before it blocks. The episodes are the same; the CPU a worker
    spends while a slow policy thinks (20 ms per call) is ~0 blocking and ~the whole wait spinning."""

    class Slow(EchoPolicy):
        def __init__(self) -> None:
            super().__init__()
            self.cpu: dict[int, list[float]] = {}

        def act_batch(self, observations: Sequence[Observation], slots: Sequence[int] | None = None) -> np.ndarray:
            for obs, slot in zip(observations, slots, strict=True):
                self.cpu.setdefault(slot, []).append(obs["cpu_s"])
            time.sleep(0.02)
            return super().act_batch(observations, slots)

    runs = {}
    for spin_ms in (0.0, 50.0):
        policy = Slow()
        with Runner(make_fake_env, workers=1, spin_ms=spin_ms) as runner:
            results = sorted((r.seed, r.success, r.steps, r.ret) for r in runner.run(specs(range(3)), policy))
        cpu = policy.cpu[0]
        runs[spin_ms] = results, (cpu[-1] - cpu[0]) / (len(cpu) - 1)  # worker CPU s per policy call
    assert runs[0.0][0] == runs[50.0][0]
    assert runs[0.0][1] < 0.005 and runs[50.0][1] > 0.012, runs
    with pytest.raises(ValueError, match="spin_ms"):
        Runner(make_fake_env, workers=1, spin_ms=-1)


def test_a_crashing_worker_fails_its_episode_and_the_run_goes_on() -> None:
    make_env = functools.partial(make_fake_env, crash_seed=4)
    with Runner(make_env, workers=2) as runner:
        results = {r.seed: r for r in runner.run(specs(range(6)), EchoPolicy())}
    assert sorted(results) == list(range(6))
    crashed = results[4]
    assert not crashed.success and "worker crashed (exit code 3) during step 2" in crashed.error
    assert all(r.error is None and r.steps == expected_steps(s) for s, r in results.items() if s != 4)


@pytest.mark.parametrize("lockstep", [True, False])
def test_a_hanging_worker_is_detected_by_its_step_timeout(lockstep: bool) -> None:
    make_env = functools.partial(make_fake_env, hang_seed=1)
    start = time.monotonic()
    with Runner(make_env, workers=2, step_timeout_s=1.0, lockstep=lockstep) as runner:
        results = {r.seed: r for r in runner.run(specs(range(4)), EchoPolicy())}
    assert time.monotonic() - start < 30
    assert "worker hung: no reply within 1 s to step 2" in results[1].error and not results[1].success
    assert all(results[s].error is None for s in (0, 2, 3))


def test_an_environment_error_fails_the_episode_and_keeps_the_worker() -> None:
    make_env = functools.partial(make_fake_env, error_seed=2)
    with Runner(make_env, workers=1) as runner:
        results = {r.seed: r for r in runner.run(specs(range(4)), EchoPolicy())}
        pid = runner.slots[0].process.pid
    assert "environment error at step 1" in results[2].error and "the fake environment broke" in results[2].error
    assert all(results[s].error is None for s in (0, 1, 3)) and pid is not None


def test_a_worker_that_cannot_start_raises_its_own_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """If starting a worker process fails (e.g. a spawned child re-running a script without a
    `__main__` guard), that error reaches the caller, not one from closing a half-made worker."""
    runner = Runner(make_fake_env, workers=2)

    class Unstartable:
        def __init__(self, **_: object) -> None:
            pass

        def start(self) -> None:
            raise RuntimeError("cannot start a process here")

    monkeypatch.setattr(runner._ctx, "Process", Unstartable)
    with pytest.raises(RuntimeError, match="cannot start a process here"), runner:
        list(runner.run(specs(range(2)), EchoPolicy()))
    assert all(slot.process is None and slot.conn is None for slot in runner.slots)


def test_interrupt_stops_every_worker() -> None:
    runner = Runner(make_fake_env, workers=2)
    with pytest.raises(KeyboardInterrupt), runner:
        list(runner.run(specs(range(10)), EchoPolicy(interrupt_after=3)))
    assert all(slot.process is None for slot in runner.slots)


def test_result_record_is_json_ready() -> None:
    with Runner(make_fake_env, workers=1) as runner:
        (result,) = runner.run(specs([2], record=True), EchoPolicy())
    record = result.record()
    assert set(record) == {"task", "seed", "index", "instruction", "success", "steps", "return", "seconds", "error"}
    assert record["success"] is True and record["steps"] == 5


def test_a_worker_whose_runner_is_gone_exits_quietly(capfd: pytest.CaptureFixture) -> None:
    """The runner killed (SIGKILL) while a worker steps: the worker's reply finds a closed pipe; it
    returns without a BrokenPipeError traceback (it used to print two)."""
    import multiprocessing as mp

    from sim.worker import worker_main

    runner_end, worker_end = mp.Pipe()
    runner_end.send(("reset", EpisodeSpec("fake", 3, 0, False)))
    runner_end.close()  # gone before the reply
    worker_main(worker_end, make_fake_env)
    assert "Traceback" not in capfd.readouterr().err
