"""What every entry point does around its job: Hydra, logging, run directories, seeding.

Entry points write nothing before their inputs are validated: Hydra is told to create no output
directory and no log file (see the `hydra:` block of each primary yaml); the job creates its run
directory itself once it knows it can run, and only then adds a log file there.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import random
import sys
import types
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from configs import CONFIG_DIR
from configs.errors import UserError, exit_on_user_error
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
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # read-only or full disk, permissions
        raise UserError(f"Cannot create the run directory {run_dir} ({err.strerror or err}); choose a writable "
                        "run_root=<dir>.") from None  # fmt: skip
    return run_dir


# Top-level options that only say how long a run goes on or how often it reports: changing them on a
# resume is routine.
ROUTINE_CHANGES = frozenset(
    {"steps", "episodes", "val_every", "val_batches", "ckpt_every", "keep_checkpoints", "log_every", "videos"}
)


def save_config(cfg: Any, run_dir: Path, name: str = "config.yaml") -> Path:
    """Write the resolved config next to the run's outputs.

    A rerun into an existing run directory (same name=, a resume) whose options differ from the saved
    ones logs each difference, as a warning unless only `ROUTINE_CHANGES` differ, and keeps the saved
    file as `config.<time>.yaml`: the steps taken so far used those options, and a default changed
    between two versions (data.reward.failure_return once) would otherwise switch a resumed run silently.
    """
    from omegaconf import OmegaConf

    path = Path(run_dir) / name
    if path.is_file() and (changes := config_changes(OmegaConf.load(path), cfg)):
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        kept = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
        for i in itertools.count(1):  # two reruns within a second keep both
            if not kept.exists():
                break
            kept = path.with_name(f"{path.stem}.{stamp}-{i}{path.suffix}")
        path.rename(kept)
        routine = all(key.split(".", 1)[0] in ROUTINE_CHANGES for key, _, _ in changes)
        shown = "; ".join(f"{key}: {old} -> {new}" for key, old, new in changes[:12])
        more = f"; and {len(changes) - 12} more" if len(changes) > 12 else ""
        logging.getLogger(__name__).log(
            logging.INFO if routine else logging.WARNING,
            "%s was run before with other options (%s%s). Earlier steps used the old ones (kept in %s)%s",
            run_dir, shown, more, kept.name,
            "." if routine else "; to continue exactly, rerun with them, or choose another name= for a new run.",
        )  # fmt: skip
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def config_changes(before: Any, after: Any) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs between two configs (missing: None).

    Both are compared in their written (yaml) form, so a live config's enums and paths equal what a saved
    `config.yaml` reads back as.
    """
    from omegaconf import OmegaConf

    def written(cfg: Any) -> Any:
        return OmegaConf.to_container(OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True)))

    def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict) and node:
            return {k: v for key, value in node.items() for k, v in leaves(value, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    return dict_changes(leaves(written(before)), leaves(written(after)))


def dict_changes(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every key whose value differs between two flat dicts (missing: None)."""
    return [(key, a.get(key), b.get(key)) for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key)]


ENVIRONMENT_FILE = "environment.json"


def numerics(device: Any, world: int = 1) -> dict[str, Any]:
    """What sets a training run's float arithmetic besides its options and seed: the torch release, the
    device, and on the CPU its vector instructions and thread count (float sums are split over the
    threads: one thread and two give different weights after the first steps), and the number of ranks."""
    import torch

    env: dict[str, Any] = {"torch": torch.__version__, "world_size": int(world)}
    if torch.device(device).type == "cuda":
        env.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())  # fmt: skip
    else:
        env.update(device=str(device), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                   threads=torch.get_num_threads())  # fmt: skip
    return env


def record_environment(run_dir: Path, step: int, device: Any, world: int = 1) -> dict[str, Any]:
    """Append this start's `numerics` to `run_dir/environment.json` (one entry per start, with its step).

    A resume whose numerics differ from the last start's warns: the run goes on correctly, but the steps
    from here will not repeat an uninterrupted run bit for bit. Returns this start's entry.
    """
    path = Path(run_dir) / ENVIRONMENT_FILE
    try:
        history = json.loads(path.read_text()) if path.is_file() else []
    except ValueError:  # an unreadable record is replaced, never a reason to stop training
        logging.getLogger(__name__).warning("%s is not JSON; starting a new record", path)
        history = []
    entry = {"step": int(step), "time": datetime.now().isoformat(timespec="seconds"), **numerics(device, world)}
    if step > 0 and history:
        numbers = ("step", "time")  # what every start differs in
        before = {k: v for k, v in history[-1].items() if k not in numbers}
        if changes := dict_changes(before, {k: v for k, v in entry.items() if k not in numbers}):
            logging.getLogger(__name__).warning(
                "%s ran up to step %d with other numerics than this process (%s). Float sums depend on them, "
                "so the steps from here will not repeat an uninterrupted run bit for bit (training itself is "
                "unaffected). To resume exactly, run where it ran (OMP_NUM_THREADS=<n> sets the CPU threads).",
                run_dir, step, "; ".join(f"{k}: {old} -> {new}" for k, old, new in changes),
            )  # fmt: skip
    path.write_text(json.dumps([*history, entry], indent=1) + "\n")
    return entry


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
            setup_logging()
            with exit_on_user_error():
                result = job(cfg)
            if "torch.distributed" in sys.modules:  # a torchrun job closes its process group when every rank is done
                from configs.distributed import end_distributed  # (torch-free jobs, e.g. serving, never import it)

                end_distributed()
            return result

        register()
        hydra_task = hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base=None)(task)

        @functools.wraps(job)
        def entry() -> Any:
            with exit_on_user_error():
                check_group_choices(sys.argv[1:])
                check_overrides(config_name, sys.argv[1:])
            try:
                return hydra_task()
            except KeyboardInterrupt:  # Ctrl-C: a line, not the traceback of wherever the job was
                print(f"\ninterrupted: {config_name}.py stopped. What it finished is kept (checkpoints, recorded "
                      "episodes, staged data); the same command (same name=) continues from there.",
                      file=sys.stderr, flush=True)  # fmt: skip
                raise SystemExit(130) from None

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


def check_overrides(config_name: str, args: list[str]) -> None:
    """Compose the job's config with the command line's overrides once, before Hydra runs the job, and
    turn what Hydra would report as a composition error into a `UserError` that names the option and
    the fix: an unknown option (with the nearest known ones), a value of the wrong type, an experiment
    written for another entry point. `+name=value` may add a group (`+experiment=debug`), never an
    option the schema lacks (Hydra would store it and nothing would read it)."""
    overrides = [a for a in args if "=" in a and not a.startswith("-") and not a.lstrip("+~").startswith("hydra")]
    if not overrides:
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    script = f"{config_name}.py"
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose(config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(_override_message(script, err)) from None
    for arg in overrides:
        key = arg.partition("=")[0]
        if key.startswith("+") and not (CONFIG_DIR / key.lstrip("+")).is_dir():
            parent, _, leaf = key.lstrip("+").rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            known = _fields(OmegaConf.get_type(node)) if OmegaConf.is_config(node) else None
            if known is not None and leaf not in known:
                raise UserError(f"{key.lstrip('+')} is not an option of {script}{_nearest(key.lstrip('+'), known)}. "
                                f"`python {script} --cfg job` prints every option.")  # fmt: skip


def _fields(kind: Any) -> list[str] | None:
    """The option names of a dataclass schema (None: not a schema, e.g. an open dict node)."""
    import dataclasses

    return [f.name for f in dataclasses.fields(kind)] if kind and dataclasses.is_dataclass(kind) else None


def _nearest(key: str, known: list[str]) -> str:
    """' (did you mean <parent>.<close name>?)' for the option names nearest to the last part of `key`."""
    import difflib

    parent, _, name = key.rpartition(".")
    close = [f"{parent}.{c}" if parent else c for c in difflib.get_close_matches(name, known, n=3)]
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _override_message(script: str, err: Exception) -> str:
    """What Hydra's composition error means for the user of `script`, from the OmegaConf error under it."""
    import re

    from hydra.errors import OverrideParseException
    from omegaconf.errors import ValidationError

    cause, text = err.__cause__, str(err)
    if isinstance(err, OverrideParseException):  # the command line itself does not parse
        key, _, value = err.override.partition("=")
        hint = (f"Hydra does not expand `~`: write {key}=$HOME{value.lstrip('~')} (the shell expands $HOME), "
                f"or quote the value: \"{key}='{value}'\"." if value.startswith("~") else
                f"If the value holds characters Hydra's grammar reserves (~ = , [ ] {{ }} ( ) and "
                f"quotes), quote it: \"{key}='{value}'\".")  # fmt: skip
        return f"{err.override} is not a valid override ({text.splitlines()[0].split(':')[0]}). {hint}"
    if isinstance(cause, ValidationError):  # a value of the wrong type
        first = str(cause).splitlines()[0]
        return f"{cause.full_key}: {first}. `python {script} --cfg job` prints every option with its type."
    unknown = re.search(r"Key '([^']+)' not in '", str(cause) if cause else text)
    if unknown is None:
        return text.split("\nConfig search path:")[0].strip()
    key = str(getattr(cause, "full_key", "") or unknown.group(1))
    if text.startswith("In 'experiment/"):  # the error sits in an experiment yaml, not on the command line
        experiment = text.split("'")[1]
        return (f"+{experiment.replace('/', '=')} does not fit {script}: it sets {key}, which is not an option "
                f"here (configs/{experiment}.yaml is written for another entry point).")  # fmt: skip
    known = _fields(getattr(cause, "object_type", None)) or []
    return f"{key} is not an option of {script}{_nearest(key, known)}. `python {script} --cfg job` prints every option."


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
