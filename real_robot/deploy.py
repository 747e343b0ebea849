"""What `deploy_robot.py` does: build the policy, connect, run and record episodes, write RLDS.

Order (nothing is written before the inputs are checked): validate the config, build the policy,
connect to the service and check its config hash, then create the session directory
`<run_root>/deploy_robot/<name>` (config.yaml, log.txt, staging/, episodes.jsonl), `init` the
robot (not in a dry run), run the episodes, ask each one's success label (unless `success=` was
given), stage it, and finally write the RLDS dataset (`record.write_at_end`).

A robot that stops answering, an unsafe action, Ctrl-C or a policy error ends the episode with a
safe stop (real_robot/loop.py); its data is staged before anything is re-raised.
"""

from __future__ import annotations

import logging
from typing import Any

from configs.errors import UserError
from policies.base import Policy, make_policy
from real_robot.client import WidowXClient
from real_robot.loop import ControlLoop, Episode
from real_robot.protocol import DEFAULT_PORT
from real_robot.recorder import Recorder, ask_success
from real_robot.safety import SafetyConfig, resolve_limits

log = logging.getLogger(__name__)


def build_policy(cfg: Any) -> Policy:
    """The policy of `cfg.policy`, wrapped by V-GPS steering if `cfg.steer` (the one place steering is wired).

    The steering options (`cfg.steering`, policies/config.py SteerConfig) are checked before the
    policy loads, so a missing critic fails fast.
    """
    if not cfg.steer:
        return make_policy(cfg.policy)
    from policies.steering import build_steered_policy

    return build_steered_policy(cfg.policy, cfg.steering)


def check_config(cfg: Any) -> SafetyConfig:
    """Validate what the user chose; returns the resolved safety limits."""
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(cfg, "instruction") or not str(cfg.instruction).strip():
        raise UserError('instruction is empty: pass instruction="put the spoon on the towel" (the task to do).')
    if cfg.episodes < 1 or cfg.max_steps < 1:
        raise UserError(f"episodes and max_steps must be >= 1, got {cfg.episodes} and {cfg.max_steps}")
    if not 1 <= cfg.robot.port <= 65534:  # the service also uses port + 1
        raise UserError(f"robot.port={cfg.robot.port}: the service's REP port is 1..65534 (default {DEFAULT_PORT}).")
    if cfg.robot.image_size < 8:
        raise UserError(f"robot.image_size={cfg.robot.image_size} is too small (the service resizes to it)")
    limits = OmegaConf.to_object(cfg.robot.safety)
    return resolve_limits(limits, env_params(cfg))


def env_params(cfg: Any) -> dict[str, Any]:
    """robot.env_params as plain Python data (the service unpickles it without omegaconf)."""
    return _plain(cfg.robot.env_params)


def _plain(node: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def connect(cfg: Any) -> WidowXClient:
    robot = cfg.robot
    return WidowXClient(robot.host, robot.port, robot.timeout_ms, robot.connect_timeout_s,
                        robot.max_message_mb * 1024 * 1024)  # fmt: skip


def deploy(cfg: Any) -> list[dict[str, Any]]:
    """Run a deploy_robot session; returns the episodes' summaries."""
    from configs.run import log_file, new_run_dir, save_config

    limits = check_config(cfg)
    if cfg.steer:
        from policies.steering import check_steering

        check_steering(cfg.steering)  # a missing critic fails before connecting
    client = connect(cfg)
    try:
        policy = build_policy(cfg)
    except BaseException:
        client.stop()
        raise
    run_dir = new_run_dir(cfg.run_root, "deploy_robot", cfg.name)
    with log_file(run_dir):
        save_config(cfg, run_dir)  # inside: a changed-options warning reaches log.txt too
        log.info("session %s: policy %s%s, %s", run_dir, cfg.policy.name, " (steered)" if cfg.steer else "",
                 "DRY RUN (observations only)" if cfg.dry_run else f"robot {client.address}")  # fmt: skip
        try:
            return _session(cfg, client, policy, limits, run_dir)
        finally:
            client.stop()
            policy.close()


def _session(cfg: Any, client: WidowXClient, policy: Policy, limits: SafetyConfig, run_dir: Any) -> list[dict]:
    robot = cfg.robot
    if cfg.dry_run:
        client.image_size = robot.image_size
        client.wait_for_observation(robot.connect_timeout_s, "connecting (dry run: init is not sent)")
    else:
        client.init(env_params(cfg), robot.image_size, robot.init_timeout_s)
    loop = ControlLoop(client, policy, limits, cfg.dry_run, robot.wrist_camera, robot.reset_timeout_s)
    recorder = Recorder(run_dir, robot.image_size, wrist=robot.wrist_camera is not None)
    summaries = []
    try:
        for index in range(cfg.episodes):
            log.info("episode %d/%d: %r", index + 1, cfg.episodes, cfg.instruction)
            episode = loop.run_episode(cfg.instruction, cfg.max_steps)
            summaries.append(_close_episode(cfg, episode, recorder))
            if episode.error is not None:
                raise episode.error
            if episode.counts["safe_stop_failed"]:  # the service no longer takes commands: no next episode
                raise UserError(
                    f"The WidowX service stopped answering in episode {index + 1} ({episode.stop_reason}); the "
                    f"session ends here and nothing more is sent. Check the robot (its e-stop if it moves) and the "
                    f"service on {robot.host}:{robot.port}, then start a new session."
                )
            if episode.interrupted:
                log.warning("session ended by the operator")
                break
    finally:  # the episodes recorded so far become the dataset even when the session ends on an error
        if cfg.record.enabled and not cfg.dry_run and cfg.record.write_at_end and recorder.next_id() > 0:
            _write(cfg, recorder)
    return summaries


def _close_episode(cfg: Any, episode: Episode, recorder: Recorder) -> dict[str, Any]:
    summary = episode.summary()
    log.info("episode summary: %d actions, stop: %s, interventions: %s, period %s", summary["actions"],
             summary["stop_reason"], summary["interventions"] or "none", _timing(summary["period_s"]))  # fmt: skip
    if cfg.dry_run or not cfg.record.enabled or not episode.actions:
        return summary
    success = cfg.success if cfg.success is not None else ask_success()
    recorder.save(episode, success)
    return {**summary, "success": success}


def _write(cfg: Any, recorder: Recorder) -> None:
    try:
        recorder.write(cfg.record.data_dir, cfg.record.dataset_name, cfg.record.version)
    except UserError as err:
        log.error("the RLDS dataset was not written (%s). The episodes are kept in %s; write them later with "
                  "`python -m real_robot.recorder %s`.", err, recorder.staging, recorder.run_dir)  # fmt: skip


def _timing(period: dict[str, float]) -> str:
    if not period:
        return "n/a"
    return f"{period['mean'] * 1e3:.1f} +- {period['std'] * 1e3:.1f} ms"
