"""What every entry point does around its job: Hydra, logging, run directories, seeding.

Entry points write nothing before their inputs are validated: Hydra is told to create no output
directory and no log file (see the `hydra:` block of each primary yaml); the job creates its run
directory itself once it knows it can run, and only then adds a log file there.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import sys
import types
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from configs import CONFIG_DIR
from configs.errors import exit_on_user_error
from configs.registry import Registry

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
LOG_DATEFMT = "%H:%M:%S"


class _TqdmHandler(logging.StreamHandler):
    """Console handler that prints through tqdm, so log lines do not break progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> None:
    """Readable console logs for robosteer's loggers (idempotent)."""
    root = logging.getLogger()
    if any(isinstance(h, _TqdmHandler) for h in root.handlers):
        return
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("absl", "matplotlib", "PIL", "h5py", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def log_file(run_dir: Path, name: str = "log.txt") -> Iterator[Path]:
    """Also write INFO logs to `run_dir/name` while the block runs (call once the directory exists)."""
    path = Path(run_dir) / name
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()


def new_run_dir(root: str | Path, job: str, name: str | None = None) -> Path:
    """`<root>/<job>/<name or timestamp>`, created; an existing directory is reused (resume)."""
    run_dir = Path(root) / job / (name or datetime.now().strftime("%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def save_config(cfg: Any, run_dir: Path, name: str = "config.yaml") -> Path:
    """Write the resolved config next to the run's outputs."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / name
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and (if imported) torch."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    if "torch" in sys.modules:
        import torch

        torch.manual_seed(seed)


def hydra_main(config_name: str) -> Callable[[Callable[[Any], Any]], Callable[[], Any]]:
    """Decorator for entry points: Hydra with the schemas registered, logging, clean user errors.

    ``@hydra_main("train_value")`` on ``def main(cfg)`` gives a ``main()`` that parses the command
    line (``data=bridge value.lr=1e-4``, ``--cfg job``), runs the job, and turns a `UserError` into
    its message and exit status 2.
    """
    import hydra

    from configs.schema import register

    def decorate(job: Callable[[Any], Any]) -> Callable[[], Any]:
        @functools.wraps(job)
        def task(cfg: Any) -> Any:
            from configs.distributed import end_distributed

            setup_logging()
            with exit_on_user_error():
                result = job(cfg)
            end_distributed()  # a torchrun job closes its process group once every rank is done
            return result

        register()
        hydra_task = hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base=None)(task)

        @functools.wraps(job)
        def entry() -> Any:
            with exit_on_user_error():
                check_group_choices(sys.argv[1:])
            return hydra_task()

        return entry

    return decorate


def check_group_choices(overrides: list[str]) -> None:
    """Fail early, with the known options and a suggestion, on `group=unknown` overrides.

    Hydra would also refuse them, but without a suggestion; this only looks at the yaml groups.
    """
    for arg in overrides:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        group_dir = CONFIG_DIR / key
        if not sep or "." in key or not group_dir.is_dir() or value in ("", "null"):
            continue
        options = Registry[str](f"option of config group {key!r}")
        for yaml in group_dir.glob("*.yaml"):
            options.register(yaml.stem)(yaml.stem)
        options.get(value)


def tensorboard_writer(run_dir: Path) -> Any:
    """A TensorBoard SummaryWriter on `<run_dir>/tb`.

    tensorboard imports TensorFlow whenever it is installed (the `rlds` extra), and TensorFlow in a
    process breaks MuJoCo's OpenGL rendering in it later (a segfault when a renderer is created).
    The marker module `tensorboard.compat.notf` makes tensorboard use its own TF-free stub instead,
    which is all that writing scalars needs.
    """
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(Path(run_dir) / "tb"))
