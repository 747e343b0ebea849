"""Config schemas of the robot group (`configs/robot/*.yaml`) and of `deploy_robot.py`.

Every field is documented where it is declared; yaml files only choose values. The safety limits'
schema is `real_robot.safety.SafetyConfig` (kept there so that the safety layer imports light).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from policies.config import SteerConfig
from real_robot.protocol import CLIENT_TIMEOUT_MS, DEFAULT_ENV_PARAMS, DEFAULT_PORT
from real_robot.safety import SafetyConfig


@dataclass
class RobotConfig:
    """A WidowX running bridge_data_robot's `widowx_env_service --server`, and how to drive it safely."""

    # Address of the robot computer (or 127.0.0.1 for `python -m real_robot.sim_service`).
    host: str = "localhost"
    # REP port of the service (its config hash depends on it; the unused PUB port is port + 1).
    port: int = DEFAULT_PORT
    # Side of the square `image` the service sends (and the policy sees), pixels; sent with `init`.
    image_size: int = 256
    # Per-request reply timeout, milliseconds (edgeml's client: 800).
    timeout_ms: int = CLIENT_TIMEOUT_MS
    # How long to retry the config handshake before giving up, seconds.
    connect_timeout_s: float = 5.0
    # Deadline for `init` (the first one takes ~10 s on the robot) and `reset`, seconds.
    init_timeout_s: float = 60.0
    reset_timeout_s: float = 30.0
    # Largest decompressed message accepted from the service, MiB.
    max_message_mb: int = 32
    # Index of a wrist camera among the service's `camera_topics`, given to the policy as image_wrist.
    wrist_camera: int | None = None
    # Sent with `init` (WidowXConfigs.DefaultEnvParams). The service re-initialises only when these
    # differ from its previous init's, so keep them identical across sessions for a fast start.
    env_params: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_ENV_PARAMS))
    safety: SafetyConfig = field(default_factory=SafetyConfig)


@dataclass
class RecordConfig:
    """Recording episodes as RLDS training data (real_robot/recorder.py)."""

    # Stage every (non-dry-run) episode with its success label.
    enabled: bool = True
    # Write the RLDS dataset when the session ends (needs TensorFlow: pip install -e '.[rlds]');
    # otherwise, or if that fails, run `python -m real_robot.recorder <run_dir>` later.
    write_at_end: bool = True
    # Root of the written dataset; null = <run_dir>/rlds.
    data_dir: str | None = None
    dataset_name: str = "robosteer_widowx"
    version: str = "1.0.0"


@dataclass
class DeployRobotConfig:
    """`python deploy_robot.py policy=<name> instruction="..." robot.host=<ip> [steer=true] [dry_run=true]`."""

    robot: RobotConfig = MISSING
    # The policy config (configs/policy/<name>.yaml; schema in policies/config.py).
    policy: Any = MISSING
    # Steer the policy with a learned value (V-GPS; policies/steering.py).
    steer: bool = False
    # Steering options, e.g. steering.critic=<run dir of train_value.py> steering.k=10 steering.beta=0.
    steering: SteerConfig = field(default_factory=SteerConfig)
    # The task instruction given to the policy (required).
    instruction: str = MISSING
    # Only read observations and print the actions that would be sent: no init, reset, step or move.
    dry_run: bool = False
    # Episodes in this session; the robot is reset before each one.
    episodes: int = 1
    # Control steps per episode (OpenVLA's Bridge eval: 60; Octo's example: 120).
    max_steps: int = 60
    # Success label of every episode; null = ask the operator after each episode.
    success: bool | None = None
    record: RecordConfig = field(default_factory=RecordConfig)
    # Sessions go to <run_root>/deploy_robot/<name or timestamp>/ (log, config, staged episodes).
    run_root: str = "runs"
    name: str | None = None


def register(cs: Any) -> None:
    """Register this package's schemas in Hydra's ConfigStore."""
    cs.store(group="robot", name="schema", node=RobotConfig)
    cs.store(name="deploy_robot_schema", node=DeployRobotConfig)
