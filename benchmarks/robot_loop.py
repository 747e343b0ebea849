"""Control-loop timing on loopback: the 5 Hz loop against the simulated WidowX service.

    python benchmarks/robot_loop.py --steps 200 --out benchmarks/results/robot_loop.json
    python benchmarks/robot_loop.py --policy-ms 0 75     # also with a policy that takes 75 ms per step
    python benchmarks/robot_loop.py --policy-ms 0 --policy policy=flow policy.checkpoint=<run> \
        steer=true steering.critic=<train_value run> steering.k=10     # a real steered policy

The simulated service runs in its own process (`python -m real_robot.sim_service`), as the real one
runs on the robot computer; the loop runs here with the in-project `random` policy built by
`make_policy`, or with `--policy <eval_sim.py overrides>` any policy eval_sim.py builds (a trained
policy steered by a trained critic, say), optionally wrapped to spend `--policy-ms` per call (a stand-in for a steered
generalist: V-GPS reports ~75 ms/step for Octo-small). Observations are the real layout at
256 px (one camera, ~0.8 MB float32 + a 640x480 JPEG per step). For each run the JSON holds the
step period (mean, std, min, max, percentiles), the jitter (std and worst deviation, in % of the
period), the share of periods within +-5%, and where the time goes (observation round trip,
policy, step_action round trip). Goal: 5 Hz +- 5%.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class TimedPolicy:
    """Wraps a Policy so that every `act` takes at least `seconds` (busy model inference stand-in)."""

    def __init__(self, base, seconds: float) -> None:
        self.base, self.seconds = base, seconds

    def reset(self, instruction: str) -> None:
        self.base.reset(instruction)

    def act(self, obs: dict) -> np.ndarray:
        start = time.perf_counter()
        out = self.base.act(obs)
        while time.perf_counter() - start < self.seconds:
            time.sleep(0.0005)
        return out


def stats(values: np.ndarray, scale: float = 1e3) -> dict[str, float]:
    values = np.asarray(values, np.float64) * scale
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max()), "p01": float(np.percentile(values, 1)),
            "p99": float(np.percentile(values, 99))}  # fmt: skip


def build_policy(overrides: list[str] | None):
    """The in-project random policy, or the policy (steered or not) of eval_sim.py's config with `overrides`."""
    from omegaconf import OmegaConf

    from policies.base import make_policy

    if not overrides:
        return make_policy(OmegaConf.create({"name": "random", "translation": 0.02, "rotation": 0.1, "chunk": 1,
                                             "seed": 0}))  # fmt: skip
    from hydra import compose, initialize_config_dir

    from configs import CONFIG_DIR
    from configs.schema import register
    from sim.evaluate import build_policy as build_eval_policy

    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return build_eval_policy(compose("eval_sim", overrides=overrides))


def run_once(port: int, steps: int, policy_ms: float, image_size: int, overrides: list[str] | None = None) -> dict:
    from real_robot.client import WidowXClient
    from real_robot.loop import ControlLoop
    from real_robot.protocol import DEFAULT_ENV_PARAMS
    from real_robot.safety import SafetyConfig, resolve_limits

    policy = build_policy(overrides)
    if policy_ms > 0:
        policy = TimedPolicy(policy, policy_ms / 1e3)
    limits = resolve_limits(SafetyConfig(), DEFAULT_ENV_PARAMS)
    with WidowXClient("127.0.0.1", port) as client:
        client.init(DEFAULT_ENV_PARAMS, image_size)
        episode = ControlLoop(client, policy, limits).run_episode("benchmark", steps)
    period = 1.0 / limits.control_hz
    periods = episode.periods
    deviation = np.abs(periods - period) / period
    sends = [t for t in episode.trace if t.sent_at is not None]
    return {
        "policy": " ".join(overrides) if overrides else "random",
        "policy_ms": policy_ms,
        "steps": len(episode.actions),
        "stop_reason": episode.stop_reason,
        "interventions": dict(episode.counts),
        "target_period_ms": period * 1e3,
        "period_ms": stats(periods),
        "jitter_std_pct": float(periods.std() / period * 100),
        "worst_deviation_pct": float(deviation.max() * 100),
        "within_5pct": float((deviation <= 0.05).mean()),
        "rate_hz": float(1.0 / periods.mean()),
        "obs_round_trip_ms": stats([t.obs_stamp - t.tick for t in episode.trace]),
        "policy_ms_measured": stats([t.policy_s for t in episode.trace]),
        "step_action_round_trip_ms": stats([t.answered_at - t.sent_at for t in sends]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--policy-ms", type=float, nargs="+", default=[0.0, 75.0])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--policy", nargs="+", default=None, help="eval_sim.py overrides naming the policy")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "robot_loop.json"))
    args = parser.parse_args()
    from real_robot.sim_service import free_port_pair

    port = free_port_pair()
    service = subprocess.Popen([sys.executable, "-m", "real_robot.sim_service", "--port", str(port)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        runs = [run_once(port, args.steps, ms, args.image_size, args.policy) for ms in args.policy_ms]
    finally:
        service.terminate()
        service.wait(10)
    result = {
        "benchmark": "robot_loop",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": _cpus()},
        "transport": "ZMQ REQ/REP on loopback, simulated service in its own process",
        "image_size": args.image_size,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for run in runs:
        p = run["period_ms"]
        print(f"{run['policy']}, padded to {run['policy_ms']:.0f} ms: {run['steps']} steps at {run['rate_hz']:.3f} Hz, "
              f"period "
              f"{p['mean']:.2f} +- {p['std']:.2f} ms (min {p['min']:.2f}, max {p['max']:.2f}), worst deviation "
              f"{run['worst_deviation_pct']:.2f}%, {run['within_5pct']:.1%} within +-5%")  # fmt: skip
    print(f"wrote {out}")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    main()
