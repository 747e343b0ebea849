"""Checkpoint directories, shared by every trainer.

    <run_dir>/checkpoints/step_000001000/
        model.safetensors      every tensor of the model's state dict (networks, targets)
        trainer_state.pt       the rest: optimiser, scheduler, step, loader position, ...
        meta.json              step, time, and whatever the trainer records (metrics, identities)
        <name>                 extra text files: config.yaml, dataset_statistics.json, ...

A checkpoint is written to a temporary directory and renamed into place, so a run killed while
saving never leaves a half checkpoint that resume would pick up.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from configs.errors import UserError, first_line

MODEL_FILE, STATE_FILE, META_FILE = "model.safetensors", "trainer_state.pt", "meta.json"


def split_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A state dict -> (tensors for safetensors, everything else)."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return tensors, {k: v for k, v in state.items() if k not in tensors}


def save_checkpoint(
    run_dir: str | Path, step: int, state: dict[str, Any], meta: dict[str, Any], files: dict[str, str] | None = None
) -> Path:
    """Write `state` (a state dict; tensors go to safetensors) as checkpoint `step` of the run."""
    from safetensors.torch import save_file

    final = Path(run_dir) / "checkpoints" / f"step_{step:09d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors, rest = split_state(state)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / MODEL_FILE))
    torch.save(rest, tmp / STATE_FILE)
    (tmp / META_FILE).write_text(json.dumps({"step": step, "time": time.time(), **meta}, indent=1, default=str))
    for name, text in (files or {}).items():
        (tmp / name).write_text(text)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")) if root.is_dir() else []


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint); clear error otherwise."""
    path = Path(path).expanduser()
    if (path / MODEL_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise UserError(
            f"No checkpoint at {path}: expected a checkpoint directory with {MODEL_FILE} or a run directory."
        )
    return latest


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """-> (state dict: tensors + the rest, meta)."""
    from safetensors.torch import load_file

    path = resolve_checkpoint(path)
    try:
        state: dict[str, Any] = dict(load_file(str(path / MODEL_FILE), device=str(device)))
        if (path / STATE_FILE).is_file():
            state.update(torch.load(path / STATE_FILE, map_location=device, weights_only=False))
        meta = json.loads((path / META_FILE).read_text())
    except Exception as err:  # safetensors, pickle, JSON and OS errors of a damaged or partial copy
        raise UserError(
            f"Cannot read the checkpoint {path} ({type(err).__name__}: {first_line(err)}): the files are damaged or "
            "incomplete. Copy it again, or move that checkpoint directory away to resume from the one before it."
        ) from None
    return state, meta


@contextlib.contextmanager
def resuming(ckpt: Path) -> Iterator[None]:
    """Around loading a run's checkpoint into the model this command built: a checkpoint that does not
    fit (the same name= rerun with another algorithm, architecture or size) is a user error that says
    so, not a state-dict traceback."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(
            f"{ckpt} does not fit the model this command builds ({first_line(err)}). Its run was started with other "
            f"options (see {Path(ckpt).parent.parent / 'config.yaml'}): rerun with those, or choose another name=."
        ) from None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the `keep` most recent checkpoints."""
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
