"""Evaluate a policy (optionally value-steered) on sim tasks: episodes, summary, plot, videos.

    python eval_sim.py policy=scripted sim=suite episodes=20
    python eval_sim.py policy=random sim=lift episodes=50 name=random_lift
    python eval_sim.py policy=flow policy.checkpoint=<dir> steer=true steering.critic=<train_value run dir>

Writes, under `<run_root>/eval_sim/<name or timestamp>/`: `config.yaml`, `log.txt`, one JSON line
per episode in `episodes.jsonl` (task, seed, success, steps, return, instruction, error),
`summary.md` / `summary.json` (success rate and 95% Wilson interval per task), `success.png`, and
`videos/<task>_seed<seed>.mp4` of the first `videos` episodes of each task; a steered run
(`steer=true steering.critic=<run dir of train_value.py>`, docs/steering.md) also writes
`steering.json` (K, beta, critic, mean Q spread) and adds them to `summary.md`. Seeds depend only on
(seed, task, episode number), so runs with the same `seed` see the same initial states; compare
them with `python -m sim.report RUN_A RUN_B`, or give `compare_to=RUN_A` to the second run, which
then writes `comparison.md/.json/.png` (sim.report) itself. Rerunning with the same `name` after an
interruption evaluates only the episodes that are missing.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from tqdm import tqdm

from configs.errors import UserError
from configs.run import config_changes, log_file, new_run_dir, save_config
from policies.base import Policy, make_policy
from policies.steering import ValueSteeredPolicy, build_steered_policy
from sim.env import make_sim_env
from sim.report import EPISODES_FILE, compare_runs, format_table, load_records, plot_success, summarize
from sim.runner import EpisodeResult, EpisodeSpec, Runner, episode_specs
from sim.tasks import task_names

log = logging.getLogger(__name__)
STEERING_FILE = "steering.json"


def build_policy(cfg: Any) -> Policy:
    """The policy to evaluate: `cfg.policy`, wrapped in value steering (V-GPS) if `cfg.steer`.

    This is the one place where eval_sim wires steering (policies/steering.py); the steering options
    (`cfg.steering`) are checked before the policy loads.
    """
    return build_steered_policy(cfg.policy, cfg.steering) if cfg.steer else make_policy(cfg.policy)


def evaluate(cfg: Any) -> Path:
    """Run an EvalSimConfig; returns the run directory."""
    tasks = task_names(cfg.sim.task)
    if cfg.episodes < 1 or cfg.runner.workers < 1 or cfg.videos < 0 or cfg.runner.spin_ms < 0:
        raise UserError("episodes and runner.workers must be >= 1, videos and runner.spin_ms >= 0.")
    if cfg.videos > 0 and not cfg.sim.render:
        raise UserError("videos need rendered images: set sim.render=true, or videos=0.")
    if cfg.sim.render and cfg.sim.image_size < 8:
        raise UserError(f"sim.image_size={cfg.sim.image_size}: render at least 8 px (e.g. 128, or the size the "
                        "policy was trained at).")  # fmt: skip
    reference = _reference_run(cfg, tasks)
    policy = build_policy(cfg)  # fails before anything is written
    run_dir = new_run_dir(cfg.run_root, "eval_sim", cfg.name)
    _check_same_run(run_dir, cfg)
    with log_file(run_dir):
        save_config(cfg, run_dir)  # inside: a changed-options warning reaches log.txt too
        specs = episode_specs(tasks, cfg.episodes, cfg.seed, record=lambda i: i < cfg.videos)
        done = {(r["task"], r["seed"]) for r in _existing_without_errors(run_dir)}
        todo = [s for s in specs if (s.task, s.seed) not in done]
        what = cfg.policy.name + (f" steered (K={policy.k}, beta={policy.beta:g}, critic {policy.critic_name})"
                                  if isinstance(policy, ValueSteeredPolicy) else "")  # fmt: skip
        log.info("evaluating %s on %s: %d episodes (%d already done) -> %s",
                 what, ", ".join(tasks), len(specs), len(specs) - len(todo), run_dir)  # fmt: skip
        try:
            _rollouts(todo, policy, cfg, run_dir)
        finally:
            policy.close()
        _report(run_dir, {(s.task, s.seed) for s in specs}, _steering_summary(policy, run_dir))
        if reference is not None:
            log.info("compared with %s (comparison.md):\n%s", reference, compare_runs([reference, run_dir], run_dir))
    return run_dir


def _reference_run(cfg: Any, tasks: list[str]) -> Path | None:
    """`compare_to`: an eval_sim run directory evaluated with the same seed and on at least one of the
    same tasks, so that episodes pair up."""
    if cfg.compare_to is None:
        return None
    reference = Path(cfg.compare_to).expanduser()
    if not (reference / EPISODES_FILE).is_file():
        raise UserError(f"compare_to={cfg.compare_to} is not an eval_sim run directory (it has no {EPISODES_FILE}); "
                        "give the directory of an earlier evaluation, e.g. runs/eval_sim/<name>.")  # fmt: skip
    saved = reference / "config.yaml"
    seed = OmegaConf.load(saved).get("seed") if saved.is_file() else None
    if seed is not None and seed != cfg.seed:
        raise UserError(f"compare_to={cfg.compare_to} was evaluated with seed={seed}, this run with seed={cfg.seed}: "
                        f"no episode would pair up. Run with seed={seed}.")  # fmt: skip
    theirs = sorted({r["task"] for r in load_records(reference)})
    if theirs and not set(theirs) & set(tasks):
        raise UserError(f"compare_to={cfg.compare_to} evaluated {', '.join(theirs)}, this run {', '.join(tasks)}: "
                        f"no episode would pair up. Run with sim={theirs[0]} (or sim=suite).")  # fmt: skip
    return reference


def _existing(run_dir: Path) -> list[dict[str, Any]]:
    return load_records(run_dir) if (run_dir / EPISODES_FILE).is_file() else []


def _existing_without_errors(run_dir: Path) -> list[dict[str, Any]]:
    """The episodes a rerun keeps. One that ended in an error (a crashed or hung worker, an environment
    exception) says nothing about the policy: its record is dropped, so the rerun runs it again."""
    records = _existing(run_dir)
    kept = [r for r in records if r.get("error") is None]
    if len(kept) < len(records):
        log.info("running again %d episodes that ended in an error last time", len(records) - len(kept))
        (run_dir / EPISODES_FILE).write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _check_same_run(run_dir: Path, cfg: Any) -> None:
    """A reused run directory (same name) must hold results of the same policy, tasks and seeds."""
    saved = run_dir / "config.yaml"
    if not saved.is_file() or not (run_dir / EPISODES_FILE).is_file():
        return
    keys = ("policy", "steer", "sim", "seed", *(("steering",) if cfg.steer else ()))
    differ = {key.split(".", 1)[0] for key, _, _ in config_changes(OmegaConf.load(saved), cfg)}
    changed = [k for k in keys if k in differ]
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
        Runner.from_config(make_env, cfg.runner) as runner,
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
        log.info("runner: %s", runner.stats.line())


def _video(run_dir: Path, result: EpisodeResult, fps: int) -> Path:
    """An MP4 (H.264, imageio-ffmpeg) of the episode's primary camera."""
    import imageio.v2 as imageio

    path = run_dir / "videos" / f"{result.task}_seed{result.seed}.mp4"
    path.parent.mkdir(exist_ok=True)
    imageio.mimwrite(path, list(result.trajectory.images), fps=fps)
    return path


def _steering_summary(policy: Policy, run_dir: Path) -> dict[str, Any] | None:
    """K, beta, critic and mean Q spread of a steered run, also written to steering.json; None if not steered."""
    if not isinstance(policy, ValueSteeredPolicy):
        return None
    out = policy.summary()
    (run_dir / STEERING_FILE).write_text(json.dumps(out, indent=1))
    return out


def _steering_line(s: dict[str, Any]) -> str:
    """One line for summary.md; the Q statistics cover the steps of this invocation (not resumed-over ones)."""
    return (
        f"steered: K={s['k']}, beta={s['beta']:g}, critic {s['critic']}; over {s['steps']} steps: mean Q spread "
        f"(max - min over K) {s['mean_q_spread']:.4f}, mean Q std {s['mean_q_std']:.4f}, "
        f"mean chosen Q - mean Q {s['mean_chosen_advantage']:.4f}"
    )


def _report(run_dir: Path, keep: set[tuple[str, int]], steering: dict[str, Any] | None = None) -> None:
    """summary.md / summary.json / success.png from episodes.jsonl (the episodes of this config)."""
    records = [r for r in _existing(run_dir) if (r["task"], r["seed"]) in keep]
    rows = summarize(records)
    table = format_table(rows)
    if steering is not None:
        table += "\n\n" + _steering_line(steering)
    (run_dir / "summary.md").write_text(table + "\n")
    (run_dir / "summary.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    plot_success({run_dir.name: rows}, run_dir / "success.png", title=f"success rate: {run_dir.name}")
    log.info("results (%d episodes):\n%s", len(records), table)
