"""Collect an RLDS dataset of sim rollouts (default: the scripted experts with their corruption).

    python collect_sim.py task=lift episodes=200    ->  datasets/robosteer_sim_lift/1.0.0
    python collect_sim.py task=suite episodes=50    ->  datasets/robosteer_sim_suite/1.0.0 (every task)

Episodes run in the runner's worker processes; each finished episode is staged at once as an .npz
(`data.rlds_writer.stage_episode`, atomic) under `<data_dir>/<name>-<version>.staging/`. When every
episode is staged, the TensorFlow writer process turns them into the RLDS dataset (this process
never renders and never imports TensorFlow). Episode i of task t always has the same seed, so an
interrupted collection rerun with the same command collects exactly the missing episodes; staged
episodes are kept, none is duplicated. Episodes lost to a worker crash or hang are not staged:
the run ends with an error and the rerun collects them.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from tqdm import tqdm

from configs.errors import UserError
from data.features import sim_dataset_spec
from data.images import encode_jpeg
from data.rlds_writer import stage_episode, staged_keys, write_rlds
from data.synthetic import sim_episode
from policies.base import make_policy
from sim.env import make_sim_env
from sim.runner import EpisodeResult, EpisodeSpec, Runner, episode_specs
from sim.tasks import task_names

log = logging.getLogger(__name__)
MANIFEST = "collection.json"


def collect(cfg: Any) -> Path:
    """Collect, stage and write the dataset described by a CollectSimConfig; returns its directory."""
    selection = cfg.task or cfg.sim.task
    tasks = task_names(selection)
    _check(cfg)
    name = cfg.name or f"robosteer_sim_{selection.replace('+', '_')}"
    root = Path(cfg.data_dir) / name / cfg.version
    if (root / "dataset_info.json").exists():
        raise UserError(f"{root} already holds a dataset; remove it, or set name=<another name>.")
    sim_cfg = OmegaConf.to_object(cfg.sim)
    sim_cfg.task = selection
    policy = make_policy(cfg.policy)  # unknown policies fail before anything is written
    staging = Path(cfg.data_dir) / f"{name}-{cfg.version}.staging"
    _check_manifest(staging, _settings(cfg, sim_cfg, tasks))
    specs = episode_specs(tasks, cfg.episodes, cfg.seed, record=lambda i: True)
    done = set(staged_keys(staging))
    todo = [s for s in specs if episode_key(s) not in done]
    log.info(
        "%s: %d tasks x %d episodes = %d; %d already staged, collecting %d with %d workers",
        name, len(tasks), cfg.episodes, len(specs), len(specs) - len(todo), len(todo), cfg.runner.workers,
    )  # fmt: skip
    failures = _run(todo, policy, sim_cfg, cfg, staging, _staged_successes(staging, specs, done))
    if failures:
        raise UserError(
            f"{failures} episodes could not be collected (see the warnings above); the {len(specs) - failures} "
            f"others are staged in {staging}. Run the same command again to collect the missing ones."
        )
    return _write(staging, root, name, cfg, specs)


def episode_key(spec: EpisodeSpec) -> str:
    """Staging key of an episode: its position in the collection, then its task."""
    return f"{spec.index:06d}_{spec.task}"


def to_rlds_episode(result: EpisodeResult) -> dict[str, Any]:
    """A finished, recorded episode as a raw robosteer-sim RLDS episode (JPEG frames)."""
    traj = result.trajectory
    if traj is None or traj.images.shape[1] == 0:
        raise ValueError(f"episode {result.index} has no recorded images (record=True and sim.render=true needed)")
    wrist = [encode_jpeg(f) for f in traj.wrist] if traj.wrist is not None else None
    return sim_episode(
        [encode_jpeg(f) for f in traj.images], traj.state, traj.action, result.instruction, result.success,
        result.task, result.seed, result.index, wrist_images=wrist,
    )  # fmt: skip


def _check(cfg: Any) -> None:
    if cfg.episodes < 1:
        raise UserError(f"episodes={cfg.episodes}: collect at least one episode per task.")
    if cfg.runner.workers < 1:
        raise UserError(f"runner.workers={cfg.runner.workers}: use at least one worker process.")
    if cfg.runner.spin_ms < 0:
        raise UserError(f"runner.spin_ms={cfg.runner.spin_ms}: use 0 (workers block while they wait) or more.")
    if not cfg.sim.render or cfg.sim.image_size < 8:
        raise UserError("A dataset needs images: set sim.render=true and sim.image_size >= 8 (e.g. 128).")


def _settings(cfg: Any, sim_cfg: Any, tasks: list[str]) -> dict[str, Any]:
    """What staged episodes depend on; a resumed collection must use the same (episodes may grow)."""
    sim = {k: v for k, v in OmegaConf.to_container(OmegaConf.structured(sim_cfg)).items() if k != "task"}
    return {"tasks": tasks, "seed": cfg.seed, "sim": sim, "policy": OmegaConf.to_container(cfg.policy)}


def _check_manifest(staging: Path, settings: dict[str, Any]) -> None:
    path = staging / MANIFEST
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = sorted(k for k in settings if _canonical(previous.get(k)) != _canonical(settings[k]))
        if changed:
            raise UserError(
                f"{staging} holds episodes collected with other settings ({', '.join(changed)} differ). "
                f"Rerun with the same settings to resume, or remove {staging} to start over."
            )
        return
    try:
        staging.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1))
    except OSError as err:  # read-only or full disk, permissions
        raise UserError(f"Cannot write to {staging} ({err.strerror or err}); choose a writable data_dir=.") from None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _staged_successes(staging: Path, specs: list[EpisodeSpec], done: set[str]) -> Counter:
    """Success counts of the already staged episodes of this collection (for the progress bar)."""
    counts: Counter = Counter()
    for spec in specs:
        key = episode_key(spec)
        if key in done:
            with np.load(staging / f"{key}.npz") as z:
                counts[bool(z["episode_metadata/success"])] += 1
    return counts


def _run(todo: list[EpisodeSpec], policy: Any, sim_cfg: Any, cfg: Any, staging: Path, counts: Counter) -> int:
    """Roll out and stage the episodes; returns how many were lost to errors."""
    failures = 0
    make_env = functools.partial(make_sim_env, sim_cfg)
    total = len(todo) + sum(counts.values())
    with (
        Runner.from_config(make_env, cfg.runner) as runner,
        tqdm(total=total, initial=total - len(todo), desc="collect", unit="episode", dynamic_ncols=True) as bar,
    ):
        for result in runner.run(todo, policy):
            if result.error is not None:
                failures += 1
            else:
                spec = EpisodeSpec(result.task, result.seed, result.index)
                stage_episode(staging, episode_key(spec), to_rlds_episode(result))
                counts[result.success] += 1
            bar.set_postfix(success=f"{counts[True] / max(sum(counts.values()), 1):.0%}", lost=failures)
            bar.update()
        log.info("runner: %s", runner.stats.line())
    return failures


def _write(staging: Path, root: Path, name: str, cfg: Any, specs: list[EpisodeSpec]) -> Path:
    """Write the RLDS dataset from the staged episodes, with a per-task success summary beside it."""
    keys = [episode_key(s) for s in specs]
    log.info("writing %d episodes as RLDS to %s (TensorFlow writer process)", len(keys), root)
    write_rlds(staging, cfg.data_dir, name, cfg.version, sim_dataset_spec(cfg.sim.image_size, cfg.sim.wrist),
               splits={"train": keys})  # fmt: skip
    per_task: dict[str, Counter] = {}
    for spec, key in zip(specs, keys, strict=True):
        with np.load(staging / f"{key}.npz") as z:
            per_task.setdefault(spec.task, Counter())[bool(z["episode_metadata/success"])] += 1
    summary = {t: {"episodes": sum(c.values()), "successes": c[True]} for t, c in per_task.items()}
    manifest = {**json.loads((staging / MANIFEST).read_text()), "summary": summary}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for task, s in summary.items():
        rate = s["successes"] / s["episodes"]
        log.info("%s: %d episodes, %d successful (%.0f%%)", task, s["episodes"], s["successes"], 100 * rate)
    if not cfg.keep_staging:
        shutil.rmtree(staging)
    return root
