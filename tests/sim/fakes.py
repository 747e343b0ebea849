"""A tiny deterministic environment for testing the runner without a simulator.

Episode `seed` lasts `3 + seed % 4` steps and succeeds iff the seed is even; observations carry the
step number. Chosen seeds misbehave at step 2: `crash_seed` kills the worker process, `hang_seed`
sleeps, `error_seed` raises; every step of `slow_seed` takes `slow_s` seconds. With
`varied_instructions`, episodes' instructions differ in length (by seed).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np


class FakeEnv:
    def __init__(
        self, task: str, crash_seed: int = -1, hang_seed: int = -1, error_seed: int = -1, slow_seed: int = -1,
        slow_s: float = 0.0, varied_instructions: bool = False,
    ) -> None:  # fmt: skip
        self.task, self.crash_seed, self.hang_seed, self.error_seed = task, crash_seed, hang_seed, error_seed
        self.slow_seed, self.slow_s, self.varied = slow_seed, slow_s, varied_instructions
        self.seed, self.t = -1, 0

    def reset(self, seed: int) -> dict[str, Any]:
        self.seed, self.t = seed, 0
        return self._obs()

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, dict[str, Any]]:
        self.t += 1
        if self.seed == self.slow_seed:
            time.sleep(self.slow_s)
        if self.t == 2 and self.seed == self.crash_seed:
            os._exit(3)
        if self.t == 2 and self.seed == self.hang_seed:
            time.sleep(3600)
        if self.t == 2 and self.seed == self.error_seed:
            raise RuntimeError("the fake environment broke")
        done = self.t >= 3 + self.seed % 4
        success = done and self.seed % 2 == 0
        return self._obs(), float(action[0]), done, {"success": success, "step": self.t}

    def close(self) -> None:
        pass

    def _obs(self) -> dict[str, Any]:
        return {
            "image_primary": np.full((8, 8, 3), self.t, np.uint8),
            "state": np.full(7, self.t, np.float32),
            "instruction": f"fake {self.task}" + " and then some more" * (self.seed % 3 if self.varied else 0),
            "privileged": {"task": self.task, "seed": self.seed},
            "cpus": sorted(os.sched_getaffinity(0)),  # where the worker may run (runner pin_cpus)
            "cpu_s": time.process_time(),  # the worker's CPU time so far (runner spin_ms)
        }


def make_fake_env(task: str, **misbehaviour: float) -> FakeEnv:
    return FakeEnv(task, **misbehaviour)
