"""Evaluate a policy (optionally value-steered) on sim tasks: episodes, summary, plot, videos.

    python eval_sim.py policy=scripted sim=suite episodes=20
    python eval_sim.py policy=random sim=lift episodes=50 name=random_lift

Writes, under `<runs_dir>/eval_sim/<name or timestamp>/`: `config.yaml`, `log.txt`, one JSON line
per episode in `episodes.jsonl` (task, seed, success, steps, return, instruction, error),
`summary.md` / `summary.json` (success rate and 95% Wilson interval per task), `success.png`, and
`videos/<task>_seed<seed>.mp4` of the first `videos` episodes of each task. Seeds depend only on
(seed, task, episode number), so runs with the same `seed` see the same initial states; compare
them with `python -m sim.report RUN_A RUN_B`. Rerunning with the same `name` after an
interruption evaluates only the episodes that are missing.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from tqdm import tqdm

from configs.errors import UserError
from configs.run import log_file, new_run_dir, save_config
from policies.base import Policy, make_policy
from sim.env import make_sim_env
from sim.report import EPISODES_FILE, format_table, load_records, plot_success, summarize
from sim.runner import EpisodeResult, EpisodeSpec, Runner, episode_specs
from sim.tasks import task_names

log = logging.getLogger(__name__)
STEERING_MODULE = "policies.steering"


def build_policy(cfg: Any) -> Policy:
    """The policy to evaluate: `cfg.policy`, wrapped in value steering if `cfg.steer`.

    This is the one place where eval_sim wires steering (V-GPS, policies/steering.py).
    """
    if cfg.steer and importlib.util.find_spec(STEERING_MODULE) is None:
        raise UserError(
            "steer=true needs the value-steering wrapper (policies/steering.py, V-GPS), which this checkout "
            "does not have yet. Run with steer=false."
        )
    if cfg.steer:
        raise UserError(
            "policies/steering.py exists but eval_sim does not wire it yet: connect it in "
            "sim/evaluate.py::build_policy. Run with steer=false meanwhile."
        )
    return make_policy(cfg.policy)


def evaluate(cfg: Any) -> Path:
    """Run an EvalSimConfig; returns the run directory."""
    tasks = task_names(cfg.sim.task)
    if cfg.episodes < 1 or cfg.runner.workers < 1 or cfg.videos < 0:
        raise UserError("episodes and runner.workers must be >= 1 and videos >= 0.")
    if cfg.videos > 0 and not cfg.sim.render:
        raise UserError("videos need rendered images: set sim.render=true, or videos=0.")
    policy = build_policy(cfg)  # fails before anything is written
    run_dir = new_run_dir(cfg.runs_dir, "eval_sim", cfg.name)
    _check_same_run(run_dir, cfg)
    save_config(cfg, run_dir)
    with log_file(run_dir):
        specs = episode_specs(tasks, cfg.episodes, cfg.seed, record=lambda i: i < cfg.videos)
        done = {(r["task"], r["seed"]) for r in _existing(run_dir)}
        todo = [s for s in specs if (s.task, s.seed) not in done]
        log.info("evaluating %s on %s: %d episodes (%d already done) -> %s",
                 cfg.policy.name, ", ".join(tasks), len(specs), len(specs) - len(todo), run_dir)  # fmt: skip
        try:
            _rollouts(todo, policy, cfg, run_dir)
        finally:
            policy.close()
        _report(run_dir, {(s.task, s.seed) for s in specs})
    return run_dir


def _existing(run_dir: Path) -> list[dict[str, Any]]:
    return load_records(run_dir) if (run_dir / EPISODES_FILE).is_file() else []


def _check_same_run(run_dir: Path, cfg: Any) -> None:
    """A reused run directory (same name) must hold results of the same policy, tasks and seeds."""
    saved = run_dir / "config.yaml"
    if not saved.is_file() or not (run_dir / EPISODES_FILE).is_file():
        return
    before = OmegaConf.load(saved)
    keys = ("policy", "steer", "sim", "seed")
    changed = [k for k in keys if OmegaConf.to_container(before.get(k)) != OmegaConf.to_container(cfg.get(k))]
    if changed:
        raise UserError(
            f"{run_dir} holds results of another evaluation ({', '.join(changed)} differ); choose another name=."
        )


def _rollouts(specs: list[EpisodeSpec], policy: Policy, cfg: Any, run_dir: Path) -> None:
    """Run the episodes; append each result to episodes.jsonl and write its video as it finishes."""
    sim_cfg = OmegaConf.to_object(cfg.sim)
    make_env = functools.partial(make_sim_env, sim_cfg)
    successes = finished = 0
    with (
        Runner(make_env, cfg.runner.workers, cfg.runner.reset_timeout_s, cfg.runner.step_timeout_s) as runner,
        open(run_dir / EPISODES_FILE, "a") as out,
        tqdm(total=len(specs), desc="eval", unit="episode", dynamic_ncols=True) as bar,
    ):
        for result in runner.run(specs, policy):
            out.write(json.dumps(result.record()) + "\n")
            out.flush()
            if result.trajectory is not None:
                _video(run_dir, result, cfg.sim.control_freq)
            finished, successes = finished + 1, successes + result.success
            bar.set_postfix(success=f"{successes / finished:.0%}")
            bar.update()


def _video(run_dir: Path, result: EpisodeResult, fps: int) -> Path:
    """An MP4 (H.264, imageio-ffmpeg) of the episode's primary camera."""
    import imageio.v2 as imageio

    path = run_dir / "videos" / f"{result.task}_seed{result.seed}.mp4"
    path.parent.mkdir(exist_ok=True)
    imageio.mimwrite(path, list(result.trajectory.images), fps=fps)
    return path


def _report(run_dir: Path, keep: set[tuple[str, int]]) -> None:
    """summary.md / summary.json / success.png from episodes.jsonl (the episodes of this config)."""
    records = [r for r in _existing(run_dir) if (r["task"], r["seed"]) in keep]
    rows = summarize(records)
    table = format_table(rows)
    (run_dir / "summary.md").write_text(table + "\n")
    (run_dir / "summary.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    plot_success({run_dir.name: rows}, run_dir / "success.png", title=f"success rate: {run_dir.name}")
    log.info("results (%d episodes):\n%s", len(records), table)
