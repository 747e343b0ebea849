"""Record robot episodes as training data: staged .npz during a session, RLDS at the end.

    recorder = Recorder(run_dir, image_size=256)
    recorder.save(episode, success=True)      # run_dir/staging/ep0000.npz + a line in episodes.jsonl
    recorder.write()                          # run_dir/rlds/robosteer_widowx/1.0.0 (TensorFlow subprocess)

Episodes use robosteer's canonical RLDS format (`data.features.sim_dataset_spec`, built by
`data.synthetic.sim_episode`): JPEG `image_primary` (and `image_wrist`), state, the actions as
sent after the safety layer, the instruction, and the operator's success label in
`episode_metadata/success` (reward 1 and is_terminal on the last step of a success). `data.prepare`
reads them with the `robosteer_sim` standardisation. The staged files also keep the policy's raw
actions (`steps/policy_action`, not written to RLDS) and every episode's summary (stop reason,
interventions, timing) is in `episodes.jsonl`.

The dataset can be written later, e.g. on a machine with TensorFlow:

    python -m real_robot.recorder runs/deploy_robot/<session> [--data-dir D] [--name N] [--version V]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from configs.errors import UserError
from real_robot.loop import Episode

log = logging.getLogger(__name__)

DATASET_NAME = "robosteer_widowx"
TASK = "widowx"


class Recorder:
    """Stages one session's episodes under `run_dir` and writes them as one RLDS dataset."""

    def __init__(self, run_dir: str | Path, image_size: int, wrist: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.staging = self.run_dir / "staging"
        self.image_size, self.wrist = int(image_size), wrist
        self.session = self.run_dir.name
        self.summaries = self.run_dir / "episodes.jsonl"
        meta = self.run_dir / "recording.json"
        if not meta.exists():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            meta.write_text(json.dumps({"image_size": self.image_size, "wrist": wrist}))

    def next_id(self) -> int:
        return len(list(self.staging.glob("ep*.npz"))) if self.staging.exists() else 0

    def save(self, episode: Episode, success: bool | None, episode_id: int | None = None) -> Path | None:
        """Stage `episode` (atomically) and log its summary; `success` None is stored as a failure, unlabelled."""
        from data.rlds_writer import stage_episode

        if len(episode.images) < 2 or not episode.actions:
            log.warning("episode has %d frame(s) and %d action(s): nothing to record", len(episode.images),
                        len(episode.actions))  # fmt: skip
            return None
        episode_id = self.next_id() if episode_id is None else episode_id
        path = stage_episode(self.staging, f"ep{episode_id:04d}", self.to_rlds(episode, bool(success), episode_id))
        summary = {"episode_id": episode_id, "file": path.name, "success": success, "labelled": success is not None,
                   **episode.summary()}  # fmt: skip
        with self.summaries.open("a") as f:
            f.write(json.dumps(summary) + "\n")
        log.info("recorded episode %d (%d frames, success=%s) in %s", episode_id, len(episode.images), success, path)
        return path

    def to_rlds(self, episode: Episode, success: bool, episode_id: int) -> dict[str, Any]:
        """The flat episode dict of `data.rlds_writer.stage_episode` (T frames, T - 1 actions)."""
        from data import images as imagelib
        from data.synthetic import sim_episode

        frames = len(episode.images)
        if len(episode.actions) != frames - 1:
            raise ValueError(f"episode with {frames} frames needs {frames - 1} actions, has {len(episode.actions)}")
        wrist = [imagelib.encode_jpeg(im) for im in episode.wrist_images] if self.wrist else None
        out = sim_episode(
            [imagelib.encode_jpeg(im) for im in episode.images], np.stack(episode.states), np.stack(episode.actions),
            episode.instruction, success, TASK, episode_id, episode_id, wrist_images=wrist,
        )  # fmt: skip
        out["episode_metadata/file_path"] = f"robot/{self.session}/ep{episode_id:04d}"  # unique episode key
        out["steps/policy_action"] = np.concatenate([np.stack(episode.policy_actions), np.zeros((1, 7))]).astype(
            np.float32
        )
        return out

    def write(self, data_dir: str | Path | None = None, name: str = DATASET_NAME, version: str = "1.0.0") -> Path:
        """Write every staged episode as `<data_dir>/<name>/<version>` (default data_dir: run_dir/rlds)."""
        return write_session(self.run_dir, data_dir, name, version)


def write_session(run_dir: str | Path, data_dir: str | Path | None = None, name: str = DATASET_NAME,
                  version: str = "1.0.0") -> Path:  # fmt: skip
    """Write a session's staged episodes as RLDS; raises `UserError` (staging kept) on failure."""
    from data.features import sim_dataset_spec
    from data.rlds_writer import staged_keys, write_rlds

    run_dir = Path(run_dir)
    meta_path = run_dir / "recording.json"
    if not meta_path.exists():
        raise UserError(f"{run_dir} is not a deploy_robot session directory (no recording.json)")
    meta = json.loads(meta_path.read_text())
    if not staged_keys(run_dir / "staging"):
        raise UserError(f"{run_dir / 'staging'} holds no recorded episodes")
    data_dir = Path(data_dir) if data_dir else run_dir / "rlds"
    spec = sim_dataset_spec(meta["image_size"], wrist=meta.get("wrist", False))
    root = write_rlds(run_dir / "staging", data_dir, name, version, spec)
    log.info("wrote %s; train on it with data=sim data.datasets.sim.tfds_name=%s data.datasets.sim.data_dir=%s",
             root, name, data_dir)  # fmt: skip
    return root


def ask_success(prompt: Callable[[str], str] | None = None) -> bool | None:
    """Ask the operator whether the episode succeeded; None if no answer can be had (no terminal)."""
    prompt = prompt or input
    while True:
        try:
            answer = prompt("Was the episode successful? [y/n] ").strip().lower()
        except (EOFError, KeyboardInterrupt):
            log.warning("no success label given; the episode is recorded as a failure and marked unlabelled "
                        "in episodes.jsonl (pass success=true|false to label on the command line)")  # fmt: skip
            return None
        if answer in ("y", "yes"):
            return True
        if answer in ("n", "no"):
            return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a deploy_robot session's recorded episodes as RLDS.")
    parser.add_argument("run_dir", help="the session directory (runs/deploy_robot/<name>)")
    parser.add_argument("--data-dir", help="where the dataset goes (default: <run_dir>/rlds)")
    parser.add_argument("--name", default=DATASET_NAME)
    parser.add_argument("--version", default="1.0.0")
    args = parser.parse_args(argv)
    root = write_session(args.run_dir, args.data_dir, args.name, args.version)
    print(root, file=sys.stderr)


if __name__ == "__main__":
    from configs.errors import exit_on_user_error
    from configs.run import setup_logging

    setup_logging()
    with exit_on_user_error():
        main()
