"""The environment side of the runner: one process, one environment per task, a pipe to the runner.

Messages from the runner and the replies (sim/runner.py sends them):

    ("reset", EpisodeSpec)  -> ("obs", observation, timing)
    ("step", action (7,))   -> ("step", observation, reward, done, info, Trajectory | None, timing)
    ("close",)              -> the process exits
    an exception in the environment -> ("error", traceback text)

The trajectory of an episode whose spec asks for `record` comes with its last step. `timing` is
(wall s, CPU s) the worker spent in the environment for that request (the runner's RunnerStats).
This module never imports TensorFlow (MuJoCo rendering and TF crash in one process, DESIGN.md).
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np


@dataclass
class Trajectory:
    """The frames of an episode: T observations and the T - 1 actions between them."""

    images: np.ndarray  # (T, H, W, 3) uint8 image_primary; (T, 0, 0, 3) if not rendered
    wrist: np.ndarray | None  # (T, H, W, 3) uint8 image_wrist, if rendered
    state: np.ndarray  # (T, 7) float32
    action: np.ndarray  # (T - 1, 7) float32, the executed canonical actions


class Recorder:
    """Collects one episode's observations and actions."""

    def __init__(self, obs: dict[str, Any]) -> None:
        self.observations, self.actions = [obs], []

    def add(self, action: np.ndarray, obs: dict[str, Any]) -> None:
        self.actions.append(np.asarray(action, dtype=np.float32))
        self.observations.append(obs)

    def trajectory(self) -> Trajectory:
        first = self.observations[0]
        images = [o["image_primary"] for o in self.observations] if "image_primary" in first else None
        wrist = [o["image_wrist"] for o in self.observations] if "image_wrist" in first else None
        return Trajectory(
            images=np.stack(images) if images else np.zeros((len(self.observations), 0, 0, 3), np.uint8),
            wrist=np.stack(wrist) if wrist else None,
            state=np.stack([o["state"] for o in self.observations]).astype(np.float32),
            action=np.stack(self.actions).reshape(-1, 7),
        )


def worker_main(conn: Connection, make_env: Callable[[str], Any], cpu: int | None = None, spin_s: float = 0.0) -> None:
    """Serve reset/step requests until told to close (or the runner goes away); on CPU `cpu` only, if given.
    Between requests, poll the pipe for up to `spin_s` seconds before blocking (runner.spin_ms)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the runner's to handle
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    envs: dict[str, Any] = {}
    env, recorder = None, None
    try:
        while True:
            if spin_s > 0:  # keep this core busy (and its caches warm) while the next request is close
                deadline = time.perf_counter() + spin_s
                while time.perf_counter() < deadline and not conn.poll():
                    pass
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return  # the runner is gone
            if message[0] == "close":
                return
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                if message[0] == "reset":
                    spec = message[1]
                    env = envs.get(spec.task) or envs.setdefault(spec.task, make_env(spec.task))
                    obs = env.reset(spec.seed)
                    recorder = Recorder(obs) if spec.record else None
                    conn.send(("obs", obs, (time.perf_counter() - start, time.process_time() - cpu_start)))
                else:  # "step"
                    obs, reward, done, info = env.step(message[1])
                    if recorder is not None:
                        recorder.add(message[1], obs)
                    trajectory = recorder.trajectory() if done and recorder is not None else None
                    timing = (time.perf_counter() - start, time.process_time() - cpu_start)
                    conn.send(("step", obs, reward, done, info, trajectory, timing))
            except (BrokenPipeError, ConnectionResetError):
                return  # the runner is gone (killed while this step ran): nothing to report it to
            except Exception:
                try:
                    conn.send(("error", traceback.format_exc()))
                except (BrokenPipeError, ConnectionResetError):
                    return
    finally:
        for e in envs.values():
            e.close()
