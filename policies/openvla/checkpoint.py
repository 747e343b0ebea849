"""OpenVLA checkpoints in the published Hugging Face layout (`openvla/openvla-7b`), read and written.

    config.json                    OpenVLAConfig: vision_backbone_id, llm_backbone_id, image_sizes,
                                   image_resize_strategy, text_config, pad_to_multiple_of, n_action_bins,
                                   norm_stats, ... (timm_model_ids and use_fused_vision_backbone optional)
    model.safetensors.index.json   {"metadata": {"total_size"}, "weight_map": {key: shard file}}
    model-0000i-of-0000n.safetensors   the shards (or one model.safetensors)
    dataset_statistics.json        {unnorm_key: {"action": {q01, q99, mask, ...}}}; overrides norm_stats
    preprocessor_config.json       PrismaticImageProcessor: input_sizes, interpolations, means, stds
    tokenizer.json, tokenizer_config.json, ...   the Llama-2 tokenizer (+ <PAD> = 32000)

`load_openvla` builds the model on the meta device, assigns the shards strictly (every published key
must be used and every parameter filled; a missing file or key is an error naming it) and rebuilds
the rotary embedding in float32 on the target device, as transformers does. `save_openvla` writes
the same layout (tiny test checkpoints, fine-tuned models).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from configs.errors import UserError
from configs.hub import download_help, local_snapshot
from policies.openvla.model import OpenVLA, OpenVLAArch
from policies.openvla.processing import PROMPT, ImageProcessor

CONFIG, INDEX, SINGLE = "config.json", "model.safetensors.index.json", "model.safetensors"
STATS, PREPROCESSOR = "dataset_statistics.json", "preprocessor_config.json"
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
QUANTIZATIONS = (None, "8bit", "4bit")
# bitsandbytes' first release that lists CPUs as supported (int8 and NF4 kernels); tested with 0.50.2
BNB_CPU_SINCE = "0.48"
DEFAULT_ID = "openvla/openvla-7b"
_TIMM_KEY = re.compile(r"\.(ls[12])\.gamma$")  # timm LayerScale -> the published `scale_factor`


@dataclass
class LoadedOpenVLA:
    model: OpenVLA
    tokenizer: Any
    processor: ImageProcessor
    norm_stats: dict[str, Any]  # {unnorm_key: {"action": {...}, ...}}
    config: dict[str, Any]  # config.json
    path: Path


def fetch_help(path: str) -> str:
    return download_help(path, "policy.path")


def resolve_path(path: str) -> Path:
    """A local checkpoint directory, or the hub snapshot of `path` (from the local cache first)."""
    return local_snapshot(path, "OpenVLA checkpoint", "policy.path", allow_patterns=HUB_FILES, example=DEFAULT_ID)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"Cannot read {path}: {err}") from None


def norm_stats(directory: Path, config: dict[str, Any]) -> dict[str, Any]:
    """dataset_statistics.json if present (it overrides config.json's norm_stats), else norm_stats."""
    if (directory / STATS).is_file():
        return read_json(directory / STATS)
    if config.get("norm_stats"):
        return config["norm_stats"]
    raise UserError(f"{directory} has neither {STATS} nor norm_stats in {CONFIG}: actions cannot be un-normalised.")


def shard_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards of the index, or the single file."""
    if (directory / INDEX).is_file():
        names = sorted(set(read_json(directory / INDEX)["weight_map"].values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise UserError(f"{directory} lacks the shard(s) {missing} listed in {INDEX}; download them again.")
        return [directory / n for n in names]
    if (directory / SINGLE).is_file():
        return [directory / SINGLE]
    raise UserError(f"{directory} has no {INDEX} or {SINGLE}: not an OpenVLA checkpoint. {fetch_help(DEFAULT_ID)}")


def read_weights(directory: Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, floating ones cast to `dtype`, with timm `gamma` keys renamed."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in shard_files(directory):
        for key, value in load_file(str(file), device=str(device)).items():
            state[_TIMM_KEY.sub(r".\1.scale_factor", key)] = value.to(dtype) if value.is_floating_point() else value
    return state


def load_openvla(
    path: str, dtype: str = "bfloat16", device: str | torch.device = "cpu", quantization: str | None = None
) -> LoadedOpenVLA:
    """Model (eval mode), tokenizer, image processor and statistics of a checkpoint directory or hub id."""
    if dtype not in DTYPES:
        raise UserError(f"policy.dtype={dtype!r}; choose one of {', '.join(DTYPES)}.")
    if quantization not in QUANTIZATIONS:
        raise UserError(f"policy.quantization={quantization!r}; choose null, 8bit or 4bit.")
    device = torch.device(device)
    directory = resolve_path(path)
    if not (directory / CONFIG).is_file():
        raise UserError(f"{directory} has no {CONFIG}: not an OpenVLA checkpoint. {fetch_help(DEFAULT_ID)}")
    config = read_json(directory / CONFIG)
    arch = OpenVLAArch.from_hf_config(config)
    with torch.device("meta"):
        model = OpenVLA(arch)
    stage = torch.device("cpu") if quantization else device  # bitsandbytes quantises on the move from the CPU
    assign_weights(model, read_weights(directory, DTYPES[dtype], stage), stage, str(directory))
    if quantization:
        quantize_language_model(model, quantization, device, DTYPES[dtype])
        model.to(device)
    preprocessor = read_json(directory / PREPROCESSOR) if (directory / PREPROCESSOR).is_file() else None
    processor = ImageProcessor.create(arch, config.get("image_resize_strategy", "resize-naive"), preprocessor)
    tokenizer = load_tokenizer(directory, arch)
    return LoadedOpenVLA(model.eval(), tokenizer, processor, norm_stats(directory, config), config, directory)


def assign_weights(model: OpenVLA, state: dict[str, torch.Tensor], device: torch.device, source: str) -> None:
    """Strictly assign a published state dict to a meta-device model, then materialise what is not stored."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise UserError(f"{source}: the weights do not match the OpenVLA architecture of its config.json "
                        f"({len(missing)} missing, e.g. {missing[:4]}; {len(unexpected)} unexpected, "
                        f"e.g. {unexpected[:4]}).")  # fmt: skip
    lm = model.language_model
    # inv_freq is a non-persistent float32 buffer computed at construction: rebuild it for real.
    lm.model.rotary_emb = type(lm.model.rotary_emb)(lm.config).to(device)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise RuntimeError(f"tensors left unmaterialised after loading: {on_meta[:5]}")


def quantize_language_model(model: OpenVLA, bits: str, device: torch.device, compute_dtype: torch.dtype) -> None:
    """Replace the Llama decoder's nn.Linear layers (q/k/v/o, gate/up/down) by bitsandbytes ones, quantised on `device`.

    bitsandbytes (0.50, read from its sources) quantises a layer's float weight when the layer is moved with
    `.to(device)`, CPU included (an Int8Params only from the CPU, hence the CPU staging):
        8bit  LLM.int8(): int8 rows with one float32 absmax scale each (the weight cast to float16 first); at
              run time the activations are quantised per row to int8 through float16, except the columns
              holding a value of magnitude >= 6 (the outliers), multiplied in the model dtype.
        4bit  NF4: two 4-bit codes per uint8, one absmax per 64 weights, the absmaxes quantised to 8 bits again;
              dequantised and multiplied in `compute_dtype` (on a CPU with AVX512-BF16 bitsandbytes repacks the
              weight at the first eval forward and computes in bfloat16, whatever `compute_dtype`).
    lm_head stays in `compute_dtype`, as do the embeddings, ViTs and projector: `OpenVLA.next_logits` slices the
    256 action rows out of lm_head's weight, which a quantised weight cannot give, and transformers' bitsandbytes
    path also keeps the output head unquantised (it quantises the ViTs' and projector's linears as well).
    """
    bnb = import_bitsandbytes(bits, device)
    if bits == "8bit":
        _show_once(logging.getLogger("bitsandbytes.autograd._functions"), "MatMul8bitLt: inputs will be cast")
    for module in list(model.language_model.model.layers.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, _quantized(bnb, child, bits, compute_dtype).to(device))


def import_bitsandbytes(bits: str, device: torch.device) -> Any:
    """bitsandbytes if it is installed and runs on `device` (CUDA; the CPU from BNB_CPU_SINCE), else a UserError."""
    from packaging.version import Version

    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(f"policy.quantization={bits} needs bitsandbytes: `pip install 'bitsandbytes>={BNB_CPU_SINCE}'` "
                        "(CUDA or CPU), or set policy.quantization=null.") from None  # fmt: skip
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"policy.quantization={bits} runs on cuda or cpu, not {device}; set policy.device, "
                        "or policy.quantization=null.")  # fmt: skip
    if device.type == "cpu" and Version(bnb.__version__) < Version(BNB_CPU_SINCE):
        raise UserError(f"policy.quantization={bits} on the CPU needs bitsandbytes >= {BNB_CPU_SINCE} (installed: "
                        f"{bnb.__version__}): `pip install -U 'bitsandbytes>={BNB_CPU_SINCE}'`, run on CUDA, or set "
                        "policy.quantization=null.")  # fmt: skip
    return bnb


def _quantized(bnb: Any, linear: nn.Linear, bits: str, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s float weight on the CPU: its `.to(device)` quantises it."""
    shape = (linear.in_features, linear.out_features, linear.bias is not None)
    weight = linear.weight.data.cpu()
    # built on the meta device: the random initialisation of a full-size layer is wasted time
    if bits == "8bit":  # transformers' load_in_8bit defaults: frozen int8 weights, outlier threshold 6
        layer = bnb.nn.Linear8bitLt(*shape, has_fp16_weights=False, threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(*shape, compute_dtype=compute_dtype, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=64,
                                         compress_statistics=True, module=layer)  # fmt: skip
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.cpu(), requires_grad=False)
    return layer


class _Once(logging.Filter):
    """Let the first record starting with `prefix` through and drop the repeats."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        shown, self.seen = not self.seen, True
        return shown


def _show_once(logger: logging.Logger, prefix: str) -> None:
    """bitsandbytes logs the float16 cast of LLM.int8() (by design) at every 8-bit matmul: ~1,800 lines per action."""
    if not any(isinstance(f, _Once) and f.prefix == prefix for f in logger.filters):
        logger.addFilter(_Once(prefix))


def load_tokenizer(directory: Path, arch: OpenVLAArch) -> Any:
    """The checkpoint's tokenizer via AutoTokenizer (no remote code), checked against its own tokenizer.json.

    transformers 5 rebuilds Llama's pre-tokenizer (Metaspace) instead of reading tokenizer.json's
    normaliser; on OpenVLA's prompt both must give the ids the published (4.40.1) tokenizer gave.
    """
    from transformers import AutoTokenizer

    try:
        # the text config stands in for config.json, whose model_type ("openvla") transformers does not know
        tokenizer = AutoTokenizer.from_pretrained(str(directory), config=arch.llama_config())
    except (OSError, ValueError) as err:
        raise UserError(f"Cannot load the tokenizer of {directory}: {err}") from None
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        probe = PROMPT.format(instruction="put the spoon on the towel")
        published = Tokenizer.from_file(str(directory / "tokenizer.json")).encode(probe).ids
        if list(tokenizer(probe).input_ids) != published:
            raise UserError(f"The tokenizer of {directory} loaded by transformers tokenizes OpenVLA's prompt "
                            "differently from its tokenizer.json; report the transformers version.")  # fmt: skip
    return tokenizer


def save_openvla(
    model: OpenVLA, directory: Path, config: dict[str, Any], stats: dict[str, Any],
    preprocessor: dict[str, Any] | None = None, max_shard_bytes: int = 2**30,
) -> Path:  # fmt: skip
    """Write the model's weights (sharded, with an index), config.json (with norm_stats) and statistics.

    The tokenizer files are the caller's (policies/openvla/tiny.py writes a tiny one).
    """
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (directory / CONFIG).write_text(json.dumps({**config, "norm_stats": stats}, indent=2))  # both, as published
    (directory / STATS).write_text(json.dumps(stats, indent=2))
    if preprocessor is not None:
        (directory / PREPROCESSOR).write_text(json.dumps(preprocessor, indent=2))
    return directory
