"""Environment steps/s of the eval runner (sim/runner.py) vs raw robosuite stepping, at 1..N workers.

    python benchmarks/sim_throughput.py                                  # lift, 1..cpu_count workers, 0 and 128 px
    python benchmarks/sim_throughput.py --workers 1 4 8 --sizes 128 256 --seconds 30 --label "GPU machine, EGL"

- raw:    W independent processes, each stepping its own `robosuite.make` environment (the arguments
          sim/env.py uses: OSC_POSE at 5 Hz, the same cheaper render settings) with a zero action
          and, at size S > 0, robosuite's own camera observation of S x S px; a reset every episode
          horizon. Steps/s summed over the processes: the most W cores can give.
- runner: `sim.runner.Runner` with W workers running episodes of the same task (SimEnv: action
          conversion, image flip, state, privileged poses) for a trivial policy (zero action, open
          gripper) that the main process calls once per control step for every worker; the
          observations, images included, travel through the workers' pipes. Rounds of
          `--per-worker` episodes per worker. Measured with `lockstep=true` (each policy call waits
          for every worker; `runner_*`) and, for W > 1, with `lockstep=false`, the default since
          policies draw per episode (the policy acts on the workers that have replied;
          `runner_async_*`).

Goal (issue 3): runner >= 80% of raw at every W. Each measurement runs for about `--seconds` (whole
episodes) after a warm-up episode; raw and runner alternate `--repeats` times and the best of each
is kept, since other processes on a shared machine only ever slow a measurement down. On a shared
machine wall-clock rates stay noisy, so the CPU time per environment step is recorded too (raw: the
stepping process; runner: its workers plus the main process): `cpu_ratio` = raw / runner CPU per
step is the throughput fraction the runner keeps once the cores are saturated, and does not depend
on the machine's load. `runner_stats` (sim.runner.RunnerStats) splits the runner's time: CPU and wall
ms per step inside env.reset / env.step as the workers time them (compare with raw's CPU per step: what
is above it is spent outside the environment), and `env_busy`, the fraction of the workers' time spent
stepping (the rest they wait for the policy, the pipes or, with lockstep, the slowest worker).
A control step at 5 Hz is 100 physics substeps (robosuite's 20 Hz: 25).
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from policies.base import Policy  # noqa: E402 - after the repository is on the path
from sim.config import SimConfig  # noqa: E402
from sim.env import SimEnv  # noqa: E402


def raw_worker(
    task: str, size: int, seconds: float, queue: mp.Queue, cpu: int | None = None, simenv: bool = False
) -> None:
    """Step a plain robosuite environment (`simenv`: robosteer's SimEnv, as a runner worker does, without the
    runner) for `seconds` (on CPU `cpu` only, if given); put (steps, wall s, CPU s) on the queue."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    from robosuite.controllers import load_composite_controller_config

    from sim.env import _fast_rendering, quiet_robosuite
    from sim.tasks import TASKS

    quiet_robosuite()
    import robosuite

    spec = TASKS.get(task)
    cfg = SimConfig(task=task, image_size=max(size, 8), render=size > 0, terminate_on_success=False)
    if simenv:
        env = SimEnv(task, cfg)
        action = np.zeros(7, np.float32)
        action[6] = 1.0  # the runner's trivial policy: stay put, gripper open

        def reset() -> None:
            env.reset(0)
    else:
        env = robosuite.make(
            spec.env_name, robots="Panda", controller_configs=load_composite_controller_config(robot="Panda"),
            has_renderer=False, has_offscreen_renderer=size > 0, use_camera_obs=size > 0, camera_names=spec.camera,
            camera_heights=max(size, 8), camera_widths=max(size, 8), control_freq=cfg.control_freq, horizon=10**6,
            ignore_done=True, hard_reset=False, reward_shaping=True, **spec.env_kwargs,
        )  # fmt: skip
        if size > 0:
            _fast_rendering(env, size)
        action = np.zeros(7)
        reset = env.reset
    horizon = spec.horizon(cfg.control_freq)
    reset()
    for _ in range(horizon):  # warm-up episode
        env.step(action)
    steps, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        reset()
        for _ in range(horizon):
            env.step(action)
        steps += horizon
    queue.put((steps, time.perf_counter() - start, time.process_time() - cpu))
    env.close()


def measure_raw(
    task: str, size: int, workers: int, seconds: float, pin_cpus: bool = False, simenv: bool = False
) -> tuple[float, float]:
    """(steps/s summed over `workers` processes, CPU ms per step); `pin_cpus`: process i on CPU i, as the
    runner pins its workers; `simenv`: the processes step SimEnv instead of plain robosuite."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    cpus = sorted(os.sched_getaffinity(0)) if pin_cpus else []
    procs = [ctx.Process(target=raw_worker,
                         args=(task, size, seconds, queue, cpus[i % len(cpus)] if cpus else None, simenv))
             for i in range(workers)]  # fmt: skip
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    steps = sum(r[0] for r in results)
    return sum(s / wall for s, wall, _ in results), 1000 * sum(r[2] for r in results) / steps


class TimedSimEnv(SimEnv):
    """SimEnv whose observations carry (worker pid, its CPU seconds so far), for the CPU accounting."""

    def _observation(self) -> dict[str, Any]:
        obs = super()._observation()
        obs["cpu"] = (os.getpid(), time.process_time())
        return obs


def make_timed_env(cfg: SimConfig, task: str) -> TimedSimEnv:
    return TimedSimEnv(task, cfg)


class Still(Policy):
    """The trivial policy: stay put, gripper open. Keeps the latest CPU time seen from every worker."""

    def __init__(self) -> None:
        super().__init__()
        self.cpu: dict[int, float] = {}

    def sample_actions(self, obs: dict[str, Any], k: int, slot: int = 0) -> np.ndarray:
        pid, seconds = obs["cpu"]
        self.cpu[pid] = seconds
        action = np.zeros((k, 1, 7), np.float32)
        action[..., 6] = 1.0
        return action


def measure_runner(
    task: str,
    size: int,
    workers: int,
    seconds: float,
    lockstep: bool = True,
    per_worker: int = 3,
    pin_cpus: bool = False,
    spin_ms: float = 0.0,
) -> tuple[float, float, dict[str, float]]:
    """(steps/s of the runner with `workers` workers, CPU ms per step of workers + main process,
    the runner's RunnerStats summary: where the time went).

    Rounds of `per_worker` episodes per worker, as an evaluation runs many episodes per worker: in the
    last episodes of a round some workers have nothing left to run.
    """
    from sim.runner import Runner, RunnerStats, episode_specs

    cfg = SimConfig(task=task, image_size=max(size, 8), render=size > 0, terminate_on_success=False)
    policy = Still()
    make_env = functools.partial(make_timed_env, cfg)
    with Runner(make_env, workers=workers, lockstep=lockstep, pin_cpus=pin_cpus, spin_ms=spin_ms) as runner:
        list(runner.run(episode_specs([task], workers, 0), policy))  # build the environments, warm up
        # From the last policy call of the warm-up to the last one of the final round: whole episodes.
        workers_cpu, main_cpu = dict(policy.cpu), time.process_time()
        runner.stats = RunnerStats(workers)
        start, steps, rounds = time.perf_counter(), 0, 0
        while time.perf_counter() - start < seconds:  # rounds of per_worker * workers episodes until time is up
            rounds += 1
            specs = episode_specs([task], per_worker * workers, rounds)
            steps += sum(r.steps for r in runner.run(specs, policy))
        wall = time.perf_counter() - start
        cpu = time.process_time() - main_cpu + sum(policy.cpu[pid] - t for pid, t in workers_cpu.items())
    return steps / wall, 1000 * cpu / steps, runner.stats.summary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="lift")
    parser.add_argument("--workers", type=int, nargs="+", default=list(range(1, (os.cpu_count() or 1) + 1)))
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 128], help="camera px; 0 = no cameras")
    parser.add_argument("--seconds", type=float, default=15.0, help="measuring time per configuration")
    parser.add_argument("--repeats", type=int, default=2, help="alternate raw/runner this often; keep the best")
    parser.add_argument("--per-worker", type=int, default=3, help="episodes per worker in a round of the runner")
    parser.add_argument("--no-async", action="store_true", help="measure the lockstep runner only")
    parser.add_argument("--pin-cpus", action="store_true", help="pin raw process / runner worker i to CPU i")
    parser.add_argument("--spin-ms", type=float, default=0.0,
                        help="runner.spin_ms: workers poll their pipe this long before blocking")  # fmt: skip
    parser.add_argument("--raw-simenv", action="store_true",
                        help="also W processes stepping SimEnv without the runner (raw_simenv_*): is a gap to raw "
                             "in SimEnv or in the runner's workers?")  # fmt: skip
    parser.add_argument("--label", default="CPU machine, Mesa llvmpipe EGL")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sim_throughput.json"))
    args = parser.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")
    if args.pin_cpus and not hasattr(os, "sched_getaffinity"):
        parser.error("--pin-cpus needs Linux (os.sched_setaffinity)")

    rows = []
    for size in args.sizes:
        for workers in args.workers:
            raw, runner, free, raw_sim = [], [], [], []
            for _ in range(args.repeats):  # best of: other processes only ever slow a measurement down
                raw.append(measure_raw(args.task, size, workers, args.seconds, args.pin_cpus))
                if args.raw_simenv:
                    raw_sim.append(measure_raw(args.task, size, workers, args.seconds, args.pin_cpus, simenv=True))
                runner.append(measure_runner(args.task, size, workers, args.seconds, True, args.per_worker,
                                             args.pin_cpus, args.spin_ms))  # fmt: skip
                if not args.no_async and workers > 1:
                    free.append(measure_runner(args.task, size, workers, args.seconds, False, args.per_worker,
                                               args.pin_cpus, args.spin_ms))  # fmt: skip
            (raw_rate, _), (runner_rate, _, stats) = max(raw), max(runner, key=lambda r: r[0])
            raw_cpu, runner_cpu = min(c for _, c in raw), min(c for _, c, _ in runner)
            row = {
                "image_size": size, "workers": workers,
                "raw_steps_per_s": round(raw_rate, 1), "runner_steps_per_s": round(runner_rate, 1),
                "runner_over_raw": round(runner_rate / raw_rate, 3),
                "raw_cpu_ms_per_step": round(raw_cpu, 2), "runner_cpu_ms_per_step": round(runner_cpu, 2),
                "cpu_ratio": round(raw_cpu / runner_cpu, 3),
                "runner_stats": {k: round(v, 3) for k, v in stats.items()},
            }  # fmt: skip
            line = (f"{size:4d} px {workers:2d} workers: raw {raw_rate:6.1f}, runner {runner_rate:6.1f} steps/s "
                    f"({runner_rate / raw_rate:.0%}); CPU ms/step raw {raw_cpu:.1f}, runner {runner_cpu:.1f} "
                    f"({raw_cpu / runner_cpu:.0%}), of it in env.step {stats['env_cpu_ms_per_step']:.1f}; "
                    f"workers busy {stats['env_busy']:.0%}")  # fmt: skip
            if free:  # the runner with lockstep=false
                (free_rate, _, free_stats), free_cpu = max(free, key=lambda r: r[0]), min(c for _, c, _ in free)
                row.update({"runner_async_steps_per_s": round(free_rate, 1),
                            "runner_async_over_raw": round(free_rate / raw_rate, 3),
                            "runner_async_cpu_ms_per_step": round(free_cpu, 2),
                            "runner_async_stats": {k: round(v, 3) for k, v in free_stats.items()}})  # fmt: skip
                line += f"; lockstep=false {free_rate:6.1f} steps/s ({free_rate / raw_rate:.0%})"
            if raw_sim:  # W processes stepping SimEnv, no runner
                (sim_rate, _), sim_cpu = max(raw_sim), min(c for _, c in raw_sim)
                row.update({"raw_simenv_steps_per_s": round(sim_rate, 1),
                            "raw_simenv_over_raw": round(sim_rate / raw_rate, 3),
                            "raw_simenv_cpu_ms_per_step": round(sim_cpu, 2)})  # fmt: skip
                line += f"; SimEnv alone {sim_rate:6.1f} steps/s ({sim_rate / raw_rate:.0%}), CPU {sim_cpu:.1f} ms"
            rows.append(row)
            print(f"{line}; load {os.getloadavg()[0]:.1f}", flush=True)
    report = {
        "benchmark": "sim_throughput",
        "label": args.label,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "mujoco_gl": os.environ.get("MUJOCO_GL"), "load_average_end": os.getloadavg()},
        "config": {"task": args.task, "seconds": args.seconds, "repeats": args.repeats, "per_worker": args.per_worker,
                   "pin_cpus": args.pin_cpus, "raw_simenv": args.raw_simenv, "spin_ms": args.spin_ms,
                   "goal_runner_over_raw": 0.8},
        "results": rows,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
