"""Stand-ins for OpenVLA-7B that need no download: the real architecture with random weights, and tiny checkpoints.

    real_arch()                                  OpenVLA-7B's architecture (config.json's fields), for
                                                 random-weight benchmarks and meta-device checks
    write_tiny_checkpoint(directory, seed=0)     a tiny random checkpoint in the PUBLISHED layout
                                                 (sharded safetensors + index, config.json,
                                                 dataset_statistics.json, preprocessor_config.json,
                                                 a Llama-style tokenizer), loaded by the real path

The tiny configuration keeps every structural feature of the real one: a DINOv2-like ViT (class +
4 register tokens, LayerScale) and a SigLIP-like ViT (no class token, MAP head) of 3 blocks at 56 px
(16 patches each), the fused 3-layer projector, a 2-layer Llama (hidden 64) with Llama-2's vocabulary
size (32000 + 64 padding rows, so the action ids are 31744..31999, <PAD> is 32000 and the empty
piece "▁" is 29871), and a byte-fallback BPE tokenizer built offline with Llama-2's conventions
(ids 3..258 are the bytes, so "\\n" is 13). Its statistics are invented, Bridge-like numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from policies.openvla.checkpoint import save_openvla
from policies.openvla.model import IMAGENET_MEAN, IMAGENET_STD, OpenVLA, OpenVLAArch
from policies.openvla.processing import EMPTY_PIECE

# config.json of openvla/openvla-7b, less norm_stats (read from configuration_prismatic.py and the
# conversion script vla-scripts/extern/convert_openvla_weights_to_hf.py).
REAL_CONFIG: dict[str, Any] = {
    "architectures": ["OpenVLAForActionPrediction"],
    "model_type": "openvla",
    "vision_backbone_id": "dinosiglip-vit-so-224px",
    "llm_backbone_id": "llama2-7b-pure",
    "arch_specifier": "no-align+fused-gelu-mlp",
    "use_fused_vision_backbone": True,
    "image_resize_strategy": "resize-naive",
    "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
    "timm_override_act_layers": [None, None],
    "image_sizes": [224, 224],
    "llm_max_length": 2048,
    "pad_token_id": 32000,
    "pad_to_multiple_of": 64,
    "n_action_bins": 256,
    "text_config": {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": "bfloat16", "vocab_size": 32064},
    "torch_dtype": "bfloat16",
}
TINY_CONFIG: dict[str, Any] = {
    **REAL_CONFIG,
    "timm_model_ids": ["tiny_dinov2_reg4", "tiny_siglip"],
    "image_sizes": [56, 56],
    "text_config": {
        "model_type": "llama", "vocab_size": 32064, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "pad_token_id": 32000, "torch_dtype": "float32",
    },
    "torch_dtype": "float32",
}  # fmt: skip


def _stats(q01: list[float], q99: list[float]) -> dict[str, Any]:
    action = {"q01": q01, "q99": q99, "mask": [True] * 6 + [False], "min": [2 * v for v in q01[:6]] + [0.0],
              "max": [2 * v for v in q99[:6]] + [1.0]}  # fmt: skip
    return {"action": action, "num_transitions": 1000, "num_trajectories": 10}


TINY_STATS: dict[str, Any] = {
    "bridge_orig": _stats([-0.029, -0.042, -0.026, -0.081, -0.092, -0.153, 0.0],
                          [0.029, 0.041, 0.04, 0.078, 0.077, 0.146, 1.0]),
    "fractal20220817_data": _stats([-0.22, -0.14, -0.22, -0.35, -0.41, -0.44, 0.0],
                                   [0.18, 0.14, 0.21, 0.35, 0.28, 0.41, 1.0]),
}  # fmt: skip
TINY_PREPROCESSOR: dict[str, Any] = {
    "image_processor_type": "PrismaticImageProcessor",
    "image_resize_strategy": "resize-naive",
    "input_sizes": [[3, 56, 56], [3, 56, 56]],
    "interpolations": ["bicubic", "bicubic"],
    "means": [list(IMAGENET_MEAN), [0.5, 0.5, 0.5]],
    "stds": [list(IMAGENET_STD), [0.5, 0.5, 0.5]],
    "use_fused_vision_backbone": True,
}
# Whole words of the tiny vocabulary ("▁" marks a preceding space); anything else falls back to
# characters and bytes.
WORDS = [
    "▁In", "▁What", "▁action", "▁should", "▁the", "▁robot", "▁take", "▁to", "Out", "▁put", "▁pick", "▁up", "▁on",
    "▁spoon", "▁towel", "▁carrot", "▁plate", "▁reach", "▁forward", "▁go", "▁cup",
]  # fmt: skip
EMPTY_ID, TEXT_VOCAB = 29871, 32000  # "▁" as in Llama-2; <PAD> is added after the vocabulary: 32000


def real_arch() -> OpenVLAArch:
    """OpenVLA-7B's architecture (7.5 B parameters)."""
    return OpenVLAArch.from_hf_config(REAL_CONFIG)


def tiny_model(seed: int = 0, logit_scale: float = 10.0, action_scale: float = 1.0) -> OpenVLA:
    """The tiny configuration with random weights; LayerScales ~U(0.5, 1.5) and lm_head x logit_scale so that
    every block matters and the action distributions are far from uniform. The action ids' lm_head rows
    are scaled by action_scale as well (> 1: greedy decoding over the whole vocabulary picks action ids;
    at 1 the random model prefers the 31808 other ids)."""
    torch.manual_seed(seed)
    model = OpenVLA(OpenVLAArch.from_hf_config(TINY_CONFIG))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("scale_factor"):
                param.uniform_(0.5, 1.5)
        model.language_model.lm_head.weight.mul_(logit_scale)
        model.language_model.lm_head.weight[model.tokens.first_id : model.tokens.vocab_size].mul_(action_scale)
    return model.eval()


def write_tiny_checkpoint(
    directory: Path, seed: int = 0, dtype: torch.dtype = torch.float32, action_scale: float = 1.0
) -> Path:
    """A tiny random checkpoint in the published layout (several weight shards), ready for `policy.path=<directory>`."""
    model = tiny_model(seed, action_scale=action_scale).to(dtype)
    config = {**TINY_CONFIG, "torch_dtype": str(dtype).removeprefix("torch.")}
    save_openvla(model, Path(directory), config, TINY_STATS, TINY_PREPROCESSOR, max_shard_bytes=6 * 2**20)
    write_tiny_tokenizer(Path(directory))
    return Path(directory)


def write_tiny_tokenizer(directory: Path) -> None:
    """A Llama-2-style tokenizer (tokenizer.json + tokenizer_config.json) with a 32000-id vocabulary + <PAD>."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    pieces = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:?.,'-!") - {EMPTY_PIECE})
    merges = []
    for word in WORDS:  # each word is built left to right from its first character
        for i in range(1, len(word)):
            if word[: i + 1] not in pieces:
                merges.append((word[:i], word[i]))
                pieces.append(word[: i + 1])
    filler = (f"<unused{i}>" for i in range(TEXT_VOCAB))
    for piece in pieces:
        vocab[piece] = len(vocab)
    while len(vocab) < TEXT_VOCAB:
        vocab[EMPTY_PIECE if len(vocab) == EMPTY_ID else next(filler)] = len(vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # Llama-2's tokenizer.json: a "▁" prepended, spaces replaced by "▁", BOS added; decoded back.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(EMPTY_PIECE), normalizers.Replace(" ", EMPTY_PIECE)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.decoder = decoders.Sequence([decoders.Replace(EMPTY_PIECE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])  # fmt: skip
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>", "<PAD>")])
    data = json.loads(tok.to_str())
    data["model"]["merges"] = [" ".join(pair) for pair in data["model"]["merges"]]  # the format tokenizers 0.19 reads
    (directory / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<PAD>"}
    config = {**special, "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "legacy": False, "model_max_length": 2048,
              "padding_side": "right", "use_default_system_prompt": False}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
