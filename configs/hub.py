"""Hugging Face hub ids or local directories, resolved to a local directory before any model loads.

`from_pretrained(<hub id>)` without a network retries every file it looks for, for minutes, before it
fails. Resolving the id once with `snapshot_download` (the local cache first, then one attempt at the
hub) fails within seconds instead, with a message that says how to get the files.
"""

from __future__ import annotations

from pathlib import Path

from configs.errors import UserError, first_line

# Files of other frameworks that a PyTorch load never reads.
OTHER_FRAMEWORKS = ["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.tflite", "onnx/*", "openvino/*", "coreml/*",
                    "tf_model*", "flax_model*", "rust_model*"]  # fmt: skip


def download_help(source: str, option: str) -> str:
    return (f"Download it on a machine with network access: `hf download {source} --local-dir <dir>` (older "
            f"huggingface_hub: `huggingface-cli download ...`), then pass {option}=<dir>.")  # fmt: skip


def local_snapshot(source: str, what: str, option: str, allow_patterns: list[str] | None = None,
                   example: str = "<owner/name>") -> Path:  # fmt: skip
    """The directory `source` names, or the hub snapshot of the hub id `source` (cached, else fetched).

    `what` names the model in messages ("sentence encoder"), `option` the setting that takes a
    directory instead (`value.language.model`), and `example` the hub id that the download help
    shows when `source` is a missing directory rather than a hub id.
    """
    local = Path(source).expanduser()
    if local.is_dir():
        return local
    if not source or local.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1:
        raise UserError(f"No {what} directory at {source!r} (and it is not a hub id, owner/name). "
                        f"{download_help(example, option)}")  # fmt: skip
    from huggingface_hub import snapshot_download

    kwargs = {"allow_patterns": allow_patterns} if allow_patterns else {"ignore_patterns": OTHER_FRAMEWORKS}
    try:
        return Path(snapshot_download(source, local_files_only=True, **kwargs))
    except Exception:  # not in the cache: one attempt at the hub below
        pass
    try:
        return Path(snapshot_download(source, **kwargs))
    except Exception as err:  # offline, gated, unknown repo: all need the same fix
        raise UserError(f"Cannot fetch the {what} {source!r} ({type(err).__name__}: {first_line(err)}). "
                        f"{download_help(source, option)}") from None  # fmt: skip
