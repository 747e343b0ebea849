"""Config schemas of the sim group (`configs/sim/*.yaml`), the scripted policy, collect_sim and eval_sim.

Every field is documented where it is declared; yaml files only choose values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from policies.config import PolicyConfig, SteerConfig


@dataclass
class SimConfig:
    """Which tasks run and how their environments are built."""

    # A task registry name (sim/tasks.py), several joined by "+" (lift+stack), or "suite" for every
    # registered task.
    task: str = MISSING
    # Side of the square camera images (64 for fast tests, 128 default, 256 to match Bridge).
    image_size: int = 128
    # Primary camera; null = the task's own (agentview for every built-in task).
    camera: str | None = None
    # Also render the wrist camera (robot0_eye_in_hand) as `image_wrist`.
    wrist: bool = False
    # Episode limit in control steps; null = the task's horizon_s * control_freq.
    horizon: int | None = None
    # Control steps per second. 5 Hz is Bridge's rate; the OSC controller then achieves ~70% of a
    # commanded delta within the step (~25% at robosuite's usual 20 Hz), see docs/sim.md.
    control_freq: int = 5
    # Render cameras at all; false gives observations without images (physics-only tests, benchmarks).
    render: bool = True
    # Render without reflections and multisampling: ~3x faster on CPU (Mesa), slightly plainer images.
    fast_render: bool = True
    # End an episode at the first step where the task succeeds.
    terminate_on_success: bool = True


@dataclass
class CorruptionConfig:
    """How the scripted experts fail, to make mixed-quality data (sim/experts.py).

    Each episode draws its failure modes once, from its own seed; `scale` multiplies every
    probability and the noise (0 = a clean expert, 1 = the default mix). A wrong target or an early
    release fails an episode (nearly always, on every task); hesitation and noise slow successes
    down. So the default success rate is ~(1 - wrong_target) * (1 - early_release) = 45.5% on every
    task (measured: benchmarks/results/expert_rates.json, docs/sim.md).
    """

    scale: float = 1.0
    # Std of Gaussian noise added to every commanded translation (metres per step); rotation noise
    # is this times 5 (radians per step).
    action_noise: float = 0.004
    # Probability that an episode hesitates: 1-3 pauses of 3-12 steps in which the arm drifts.
    hesitation: float = 0.35
    # Probability that the expert goes for a wrong target: the other cube, another bin, or a grasp
    # point 3-6 cm off the object.
    wrong_target: float = 0.3
    # Probability that the gripper opens early: while closing on the object or carrying it, before
    # it is over its goal.
    early_release: float = 0.35


@dataclass
class ScriptedPolicyConfig(PolicyConfig):
    """The scripted experts as a Policy (`policy=scripted`); they need `privileged` observations."""

    name: str = "scripted"
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)
    # Mixed into every episode's corruption draws (episodes are otherwise seeded by the simulator).
    seed: int = 0
    # sample_actions(obs, k > 1): candidates 1..k-1 are the expert action plus this std of
    # Gaussian noise on the translation (metres; rotation x5 radians).
    candidate_noise: float = 0.01


@dataclass
class RunnerConfig:
    """The parallel rollout runner (sim/runner.py)."""

    # Environment worker processes (each steps one episode at a time).
    workers: int = 2
    # Seconds a worker may take to reset (the first reset of a task builds its environment).
    reset_timeout_s: float = 180.0
    # Seconds a worker may take for one step before it is declared hung and replaced.
    step_timeout_s: float = 60.0
    # false: the policy acts on the workers that have replied while the others step on (faster with
    # many workers); true: each policy call waits for every worker. Policies draw their noise per
    # episode, from its seed, in both modes; fixed_batch removes the batch size from their rounding.
    lockstep: bool = False
    # Every policy (and critic) forward runs on `workers` rows, padded, with instructions padded to a
    # fixed length: a neural policy's rounding depends on its batch's shape, which async batches vary,
    # and the simulation amplifies it into other episodes (docs/sim.md). Costs the padding rows'
    # compute; false: only the rows that are ready, text padded to the batch's longest.
    fixed_batch: bool = True
    # Pin worker i to CPU i (of the CPUs this process may use, round robin), so that a worker that
    # waits between steps wakes on the core whose caches hold its simulation. Off by default: it is
    # measured by benchmarks/sim_throughput.py --pin-cpus, not yet shown to help (docs/sim.md).
    pin_cpus: bool = False
    # A worker waiting for its next action polls its pipe for up to this many milliseconds before it
    # sleeps. A core that sleeps between steps can be slow to wake and come back with cold caches (on a
    # virtual machine's vCPUs above all); spinning keeps it busy instead, at the cost of that CPU time,
    # so use it only with a core per worker to spare. 0 (the default): block at once. Measured by
    # benchmarks/sim_throughput.py --spin-ms (docs/sim.md).
    spin_ms: float = 0.0


@dataclass
class CollectSimConfig:
    """`python collect_sim.py task=<task or suite> episodes=N`: an RLDS dataset of policy rollouts."""

    sim: SimConfig = MISSING
    # The policy that acts (default: the scripted experts with their default corruption).
    policy: Any = MISSING
    # Shorthand for sim.task (task=lift is sim.task=lift); null keeps the sim config's task.
    task: str | None = None
    # Episodes per task.
    episodes: int = 100
    # Base seed; episode i of task t gets a seed derived from (seed, t, i), so a rerun collects the
    # same episodes. Evaluation uses another base seed (held-out initial states).
    seed: int = 0
    # The dataset goes to <data_dir>/<name>/<version>; name null = robosteer_sim_<task or suite>.
    data_dir: str = "datasets"
    name: str | None = None
    version: str = "1.0.0"
    # Keep the staged .npz episodes after the dataset is written (they are removed by default).
    keep_staging: bool = False
    runner: RunnerConfig = field(default_factory=RunnerConfig)


@dataclass
class EvalSimConfig:
    """`python eval_sim.py policy=<name> steer=<bool> sim=<task or suite> episodes=N`."""

    sim: SimConfig = MISSING
    policy: Any = MISSING
    # Wrap the policy in value steering (V-GPS, policies/steering.py); options in `steering`.
    steer: bool = False
    # Steering options, e.g. steering.critic=<run dir of train_value.py> steering.k=10 steering.beta=0.
    steering: SteerConfig = field(default_factory=SteerConfig)
    # Episodes per task.
    episodes: int = 20
    # Base seed of the episodes; runs with the same seed, tasks and episodes see the same initial
    # states. Differs from collect_sim's default, so evaluation uses states the data never saw.
    seed: int = 1000
    # MP4 videos of the first this-many episodes of each task.
    videos: int = 2
    # Outputs go to <run_root>/eval_sim/<name or timestamp>/.
    run_root: str = "runs"
    name: str | None = None
    # An earlier eval_sim run on the same seed (e.g. the base policy): at the end, this run is compared
    # with it on the episodes both evaluated (sim.report: comparison.md/.json/.png in the run directory).
    compare_to: str | None = None
    runner: RunnerConfig = field(default_factory=RunnerConfig)


def register(cs: Any) -> None:
    """Register this package's schemas in Hydra's ConfigStore."""
    cs.store(group="sim", name="schema", node=SimConfig)
    cs.store(group="policy", name="scripted_schema", node=ScriptedPolicyConfig)
    cs.store(name="collect_sim_schema", node=CollectSimConfig)
    cs.store(name="eval_sim_schema", node=EvalSimConfig)
