"""Parallel rollouts: N environments in worker processes, one batched policy in the main process.

Policies are GPU models and environments are CPU simulators, so each worker steps one environment
and the main process gathers their observations, calls `policy.act_batch(observations, slots)` once
per control step and sends each worker the first action of its chunk (the Policy contract). A
worker that finishes an episode starts the next pending one right away; slot `i` of the policy is
worker `i`.

    with Runner(make_env, workers=4) as runner:
        for result in runner.run(specs, policy):       # EpisodeResults, in order of completion
            ...

`lockstep=False` (the default) calls the policy as soon as any worker has replied, on the workers
ready then, and sends their actions while the others still step: no worker waits for the slowest
one (or for another's reset), which keeps more of the environments' throughput with many workers
(benchmarks/sim_throughput.py). `lockstep=True` gathers every due reply before each policy call, so
that the batches themselves are the same on every run.

An episode's `EpisodeSpec` (task, seed) fixes its initial state, whichever worker runs it, and the
runner passes the seed to `policy.reset`, whose random draws in the episode then come from that seed
alone (the Policy contract, policies/base.py), whichever episodes share its batches. A neural
policy's rounding depends on the batch size, and the simulation amplifies it (docs/sim.md), so with
`fixed_batch=True` (the default) the runner has the policy run every forward on `workers` rows
(`policy.fix_batch_rows`, which also pads instructions to a fixed length), so that the batch no
longer changes a row's rounding: an episode is then the same, bit for bit, async or lockstep, in the
tests and on 24 of 24 real Lift and Stack rollouts of three policies (docs/sim.md). Without it,
async runs are samples of the same success rates.

`runner.stats` (RunnerStats) says where the time went: in the environments (the workers' own timing
of each reset and step), in the policy, or neither (workers waiting).
A worker that crashes (its pipe closes) or hangs (no reply within the reset / step timeout) is
killed and replaced; its episode is reported as failed, with the reason in `error`, and the run
goes on. Workers ignore SIGINT: on Ctrl-C the main process stops them (`close`), so an interrupted
run leaves no stray processes. `pin_cpus=True` pins worker i to the i-th CPU this process may use.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

from policies.base import Policy
from sim.env import Env
from sim.worker import Trajectory, worker_main

log = logging.getLogger(__name__)

#: Builds the environment of a task inside a worker; must be picklable (a module-level function
#: or a functools.partial of one).
EnvFactory = Callable[[str], Env]


@dataclass(frozen=True)
class EpisodeSpec:
    """One episode to run: its task, its seed (the initial state), its position in the run."""

    task: str
    seed: int
    index: int
    record: bool = False  # return the trajectory (frames, states, actions) with the result


@dataclass
class EpisodeResult:
    """How an episode ended. `error` is set if it could not finish (worker crash or hang, env error)."""

    task: str
    seed: int
    index: int
    instruction: str
    success: bool
    steps: int
    ret: float
    seconds: float
    error: str | None = None
    trajectory: Trajectory | None = field(default=None, repr=False)

    def record(self) -> dict[str, Any]:
        """A JSON-serialisable summary (no trajectory); `ret` is written as `return`."""
        out = {k: v for k, v in asdict(self).items() if k != "trajectory"}
        out["return"] = out.pop("ret")
        return out


def episode_seed(base_seed: int, task: str, i: int) -> int:
    """The seed of episode `i` of `task` in a run with `base_seed` (a stable hash, < 2**32)."""
    return int(np.random.SeedSequence([base_seed, zlib.crc32(task.encode()), i]).generate_state(1)[0])


def episode_specs(
    tasks: Sequence[str], episodes: int, base_seed: int, record: Callable[[int], bool] = lambda i: False
) -> list[EpisodeSpec]:
    """`episodes` per task, interleaved across tasks (index = i * len(tasks) + t); `record(i)` picks
    which per-task episode numbers keep their trajectory. Adding episodes keeps earlier indices."""
    return [
        EpisodeSpec(task, episode_seed(base_seed, task, i), i * len(tasks) + t, record(i))
        for i in range(episodes)
        for t, task in enumerate(tasks)
    ]


@dataclass
class RunnerStats:
    """Where a runner's time went, summed over its `run` calls (eval_sim logs `summary`)."""

    workers: int
    steps: int = 0  # environment steps (control steps, summed over workers)
    resets: int = 0
    wall_s: float = 0.0  # inside `run`, the caller's handling of yielded results included
    env_s: float = 0.0  # workers in env.reset / env.step (wall time, summed over workers)
    env_cpu_s: float = 0.0  # their CPU time there
    policy_s: float = 0.0  # the main process in policy.act_batch
    policy_calls: int = 0
    policy_observations: int = 0

    def add_env(self, timing: tuple[float, float], step: bool) -> None:
        self.steps, self.resets = self.steps + step, self.resets + (not step)
        self.env_s, self.env_cpu_s = self.env_s + timing[0], self.env_cpu_s + timing[1]

    def add_policy(self, seconds: float, observations: int) -> None:
        self.policy_s, self.policy_calls = self.policy_s + seconds, self.policy_calls + 1
        self.policy_observations += observations

    def summary(self) -> dict[str, float]:
        """Rates and shares: `env_busy` is the fraction of the workers' time spent in their
        environments (1 = never waiting for the policy, a pipe or another worker)."""
        wall = max(self.wall_s, 1e-9)
        return {
            "steps": self.steps, "steps_per_s": self.steps / wall,
            "env_busy": self.env_s / (self.workers * wall),
            "env_ms_per_step": 1000 * self.env_s / max(self.steps + self.resets, 1),
            "env_cpu_ms_per_step": 1000 * self.env_cpu_s / max(self.steps + self.resets, 1),
            "policy_share": self.policy_s / wall,
            "policy_ms_per_call": 1000 * self.policy_s / max(self.policy_calls, 1),
            "batch_per_call": self.policy_observations / max(self.policy_calls, 1),
        }  # fmt: skip

    def line(self) -> str:
        s = self.summary()
        return (
            f"{s['steps']} steps at {s['steps_per_s']:.1f} steps/s; environments busy {s['env_busy']:.0%} of "
            f"the workers' time ({s['env_ms_per_step']:.1f} ms, {s['env_cpu_ms_per_step']:.1f} ms CPU per step "
            f"or reset); policy {s['policy_share']:.0%} of the time ({s['policy_ms_per_call']:.1f} ms per call, "
            f"{s['batch_per_call']:.1f} observations per call)"
        )


@dataclass
class _Slot:
    """A worker process and the episode it is running."""

    index: int
    process: Any = None
    conn: Connection | None = None
    spec: EpisodeSpec | None = None
    instruction: str = ""
    steps: int = 0
    ret: float = 0.0
    started: float = 0.0
    obs: dict[str, Any] | None = None  # awaiting an action
    action: np.ndarray | None = None  # to send
    deadline: float = 0.0
    waiting_for: str = ""  # "reset" or "step" while a reply is due


class Runner:
    """Runs EpisodeSpecs with a Policy over `workers` environment processes (see the module doc)."""

    def __init__(
        self, make_env: EnvFactory, workers: int = 2, reset_timeout_s: float = 180.0, step_timeout_s: float = 60.0,
        lockstep: bool = False, pin_cpus: bool = False, fixed_batch: bool = True, spin_ms: float = 0.0,
    ) -> None:  # fmt: skip
        if workers < 1:
            raise ValueError(f"need at least one worker, got {workers}")
        if spin_ms < 0:
            raise ValueError(f"runner.spin_ms must be >= 0 (0: workers block while they wait), got {spin_ms}")
        self.make_env, self.reset_timeout_s, self.step_timeout_s = make_env, reset_timeout_s, step_timeout_s
        self.lockstep, self.fixed_batch, self.spin_s = lockstep, fixed_batch, spin_ms / 1000
        if pin_cpus and not hasattr(os, "sched_getaffinity"):
            log.warning("runner.pin_cpus: this system cannot pin processes to CPUs (Linux only); workers run anywhere")
        pinnable = pin_cpus and hasattr(os, "sched_getaffinity")
        self._cpus = sorted(os.sched_getaffinity(0)) if pinnable else []  # worker i on _cpus[i % n]; none: anywhere
        self.slots = [_Slot(i) for i in range(workers)]
        self.stats = RunnerStats(workers)
        self._ctx = mp.get_context("spawn")  # fresh interpreters: no inherited GL/CUDA/TF state

    @classmethod
    def from_config(cls, make_env: EnvFactory, cfg: Any) -> Runner:
        """A runner with the settings of a RunnerConfig (sim/config.py)."""
        return cls(
            make_env, cfg.workers, cfg.reset_timeout_s, cfg.step_timeout_s, cfg.lockstep, cfg.pin_cpus, cfg.fixed_batch,
            cfg.spin_ms,
        )  # fmt: skip

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, specs: Sequence[EpisodeSpec], policy: Policy) -> Iterator[EpisodeResult]:
        """Run every spec; yield each result as its episode ends (completion order)."""
        pending, start = deque(specs), time.perf_counter()
        rows = policy.batch_rows
        if self.fixed_batch:
            policy.fix_batch_rows(len(self.slots))  # a row's rounding: the same in every call
        try:
            while pending or any(s.spec is not None for s in self.slots):
                for slot in self.slots:
                    if slot.spec is None and pending:
                        self._start(slot, pending.popleft())
                    elif slot.action is not None:
                        self._send(slot, ("step", slot.action), "step", self.step_timeout_s)
                        slot.action = None
                yield from self._receive(policy)
                self._act(policy)
        finally:
            self.stats.wall_s += time.perf_counter() - start
            policy.fix_batch_rows(rows)

    def close(self) -> None:
        """Stop every worker (politely, then by force)."""
        for slot in self.slots:
            if slot.process is not None:
                with contextlib.suppress(OSError):  # already gone
                    slot.conn.send(("close",))
        for slot in self.slots:
            self._stop(slot, grace_s=5.0)

    # -- one control step ------------------------------------------------------------------------

    def _start(self, slot: _Slot, spec: EpisodeSpec) -> None:
        if slot.process is None:
            self._spawn(slot)
        slot.spec, slot.steps, slot.ret, slot.started, slot.obs = spec, 0, 0.0, time.monotonic(), None
        self._send(slot, ("reset", spec), "reset", self.reset_timeout_s)

    def _send(self, slot: _Slot, message: tuple, kind: str, timeout_s: float) -> None:
        with contextlib.suppress(OSError):  # the worker is gone; the receive step reports it
            slot.conn.send(message)
        slot.waiting_for, slot.deadline = kind, time.monotonic() + timeout_s

    def _receive(self, policy: Policy) -> Iterator[EpisodeResult]:
        """Wait for every due reply (until its deadline), or with lockstep=False for the first ones
        to arrive, and handle them; yield finished episodes."""
        waiting = {s.conn: s for s in self.slots if s.waiting_for}
        while waiting:
            due = len(waiting)
            timeout = max(0.0, min(s.deadline for s in waiting.values()) - time.monotonic())
            for conn in wait(list(waiting), timeout=timeout):
                slot = waiting.pop(conn)
                try:
                    reply = conn.recv()
                except (EOFError, OSError):
                    reply = ("lost", self._lost(slot, "crashed"))
                result = self._handle(slot, reply, policy)
                if result is not None:
                    yield result
            now = time.monotonic()
            for conn, slot in list(waiting.items()):
                if now >= slot.deadline:
                    del waiting[conn]
                    yield self._handle(slot, ("lost", self._lost(slot, "hung")), policy)
            if not self.lockstep and len(waiting) < due:  # some replied: act on them, the rest step on
                return

    def _handle(self, slot: _Slot, reply: tuple, policy: Policy) -> EpisodeResult | None:
        """Apply one worker reply to its slot; a finished (or failed) episode is returned."""
        kind, slot.waiting_for = reply[0], ""
        if kind == "obs":
            slot.obs, slot.instruction = reply[1], reply[1].get("instruction", "")
            self.stats.add_env(reply[2], step=False)
            policy.reset(slot.instruction, slot.index, slot.spec.seed)  # the episode's draws: from its seed
            return None
        if kind == "step":
            _, obs, reward, done, info, trajectory, timing = reply
            self.stats.add_env(timing, step=True)
            slot.steps, slot.ret = slot.steps + 1, slot.ret + reward
            if not done:
                slot.obs = obs
                return None
            return self._finish(slot, bool(info.get("success", False)), None, trajectory)
        if kind == "lost":
            self._stop(slot, grace_s=0.0)
            return self._finish(slot, False, reply[1], None)
        # "error": the environment raised; the worker lives on
        return self._finish(slot, False, f"environment error at step {slot.steps}:\n{reply[1]}", None)

    def _finish(self, slot: _Slot, success: bool, error: str | None, trajectory: Trajectory | None) -> EpisodeResult:
        spec = slot.spec
        if error:
            log.warning("episode %d (%s, seed %d) failed: %s", spec.index, spec.task, spec.seed, error)
        result = EpisodeResult(
            spec.task, spec.seed, spec.index, slot.instruction, success, slot.steps, slot.ret,
            time.monotonic() - slot.started, error, trajectory,
        )  # fmt: skip
        slot.spec, slot.obs, slot.action = None, None, None
        return result

    def _act(self, policy: Policy) -> None:
        """One batched policy call for every slot that holds an observation."""
        ready = [s for s in self.slots if s.obs is not None]
        if not ready:
            return
        start = time.perf_counter()
        actions = np.asarray(policy.act_batch([s.obs for s in ready], [s.index for s in ready]), dtype=np.float32)
        self.stats.add_policy(time.perf_counter() - start, len(ready))
        if actions.ndim != 3 or actions.shape[0] != len(ready) or actions.shape[2] != 7:
            raise ValueError(f"policy.act_batch returned shape {actions.shape}, expected ({len(ready)}, chunk, 7)")
        for slot, chunk in zip(ready, actions, strict=True):
            slot.action, slot.obs = chunk[0], None  # execute the first action of the chunk

    # -- worker processes ------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        parent, child = self._ctx.Pipe()
        cpu = self._cpus[slot.index % len(self._cpus)] if self._cpus else None
        process = self._ctx.Process(
            target=worker_main,
            args=(child, self.make_env, cpu, self.spin_s),
            name=f"sim-worker-{slot.index}",
            daemon=True,
        )
        try:
            process.start()  # may raise (no fork/spawn possible): the slot then holds no half-made worker
        finally:
            child.close()
        slot.process, slot.conn = process, parent

    def _lost(self, slot: _Slot, how: str) -> str:
        """Describe a lost worker: crashed (with its exit code) or hung (with the timeout)."""
        what = f"{slot.waiting_for} {slot.steps + 1}" if slot.waiting_for == "step" else slot.waiting_for
        if how == "hung":
            timeout = self.step_timeout_s if slot.waiting_for == "step" else self.reset_timeout_s
            return f"worker hung: no reply within {timeout:g} s to {what}"
        slot.process.join(timeout=5.0)
        return f"worker crashed (exit code {slot.process.exitcode}) during {what}"

    def _stop(self, slot: _Slot, grace_s: float) -> None:
        """End a slot's worker process (a new one is spawned for its next episode)."""
        if slot.process is None:
            return
        slot.process.join(timeout=grace_s)
        if slot.process.is_alive():
            slot.process.terminate()
            slot.process.join(timeout=2.0)
        if slot.process.is_alive():
            slot.process.kill()
            slot.process.join(timeout=2.0)
        slot.conn.close()
        slot.process, slot.conn, slot.waiting_for = None, None, ""
