"""policy.quantization=8bit / 4bit on the CPU: which layers are replaced, how they are stored, agreement with float32.

The tiny checkpoint (2-layer Llama, hidden 64) through `load_openvla(..., quantization=...)`, against the same
checkpoint in float32 (the `loaded` fixture). Skipped without bitsandbytes >= BNB_CPU_SINCE, except the errors.

Bounds, from measurements with bitsandbytes 0.50.2 (torch 2.14.1 CPU) on tiny checkpoints of seeds 0, 1, 2,
weights and compute in float32 and bfloat16, 4bit through both of bitsandbytes' CPU paths (AVX512-BF16 or not):
    one layer on random inputs (one outlier column), relative error   8bit <= 0.010   4bit <= 0.111
    first action token's logits, correlation with float32            8bit >= 0.99994 4bit >= 0.9935
                                 max |difference| / max |logit|      8bit <= 0.011   4bit <= 0.12
The bounds below leave 2-8x room. A layer multiplying another layer's weights has relative error 1.4.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from configs.errors import UserError
from policies.base import make_policy
from policies.openvla import checkpoint as ckpt
from policies.openvla.processing import prompt_ids
from tests.openvla.helpers import observation, openvla_config

LAYER_ERROR = {"8bit": 0.02, "4bit": 0.2}
MIN_CORRELATION = {"8bit": 0.9995, "4bit": 0.98}
MAX_RELATIVE = {"8bit": 0.03, "4bit": 0.25}
SEEDS = range(4)


def bitsandbytes() -> Any:
    return pytest.importorskip("bitsandbytes", minversion=ckpt.BNB_CPU_SINCE)


@pytest.fixture(scope="module", params=["8bit-float32", "4bit-float32", "8bit-bfloat16", "4bit-bfloat16"])
def quantized(request: pytest.FixtureRequest, tiny_dir: Path) -> tuple[str, str, Any]:
    """(bits, dtype, the tiny checkpoint loaded with that quantization and dtype on the CPU)."""
    bitsandbytes()
    bits, dtype = request.param.split("-")
    return bits, dtype, ckpt.load_openvla(str(tiny_dir), dtype, "cpu", bits)


def decoder_linears(loaded: Any) -> dict[str, nn.Module]:
    """The decoder's linear layers by name, float (nn.Linear) or bitsandbytes (subclasses of it)."""
    layers = loaded.model.language_model.model.layers
    return {f"language_model.model.layers.{n}": m for n, m in layers.named_modules() if isinstance(m, nn.Linear)}


def inputs(loaded: Any, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    pixel_values = loaded.processor(observation(seed)["image_primary"])[None]
    return pixel_values, torch.tensor([prompt_ids(loaded.tokenizer, "put the spoon on the towel")])


@torch.no_grad()
def first_logits(loaded: Any, seed: int) -> torch.Tensor:
    """Logits (V,) of the first action token, in the model's dtype, from one full forward."""
    model = loaded.model
    return model.language_model(inputs_embeds=model.embed_prefix(*inputs(loaded, seed))).logits[0, -1]


def test_only_the_decoder_linears_are_replaced(quantized: tuple[str, str, Any], loaded: Any) -> None:
    bits, dtype, model = quantized[0], ckpt.DTYPES[quantized[1]], quantized[2].model
    bnb = bitsandbytes()
    expected = {n: type(m) for n, m in loaded.model.named_modules()}
    replaced = set(decoder_linears(loaded))
    assert len(replaced) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    expected.update(dict.fromkeys(replaced, bnb.nn.Linear8bitLt if bits == "8bit" else bnb.nn.Linear4bit))
    assert {n: type(m) for n, m in model.named_modules()} == expected
    assert type(model.language_model.lm_head) is nn.Linear  # next_logits slices its weight
    from policies.llama_stack import LlamaStack

    assert "not plain nn.Linear" in LlamaStack.unsupported([model.language_model])  # decoded by transformers
    assert LlamaStack.unsupported([loaded.model.language_model]) is None  # unquantised: fused
    weights = {f"{n}.weight" for n in replaced}
    others = {n: p.dtype for n, p in model.named_parameters() if n not in weights}
    assert set(others.values()) == {dtype}  # embeddings, norms, lm_head, ViTs, projector (Llama has no biases)
    if bits == "4bit":
        assert {m.compute_dtype for m in decoder_linears(quantized[2]).values()} == {dtype}


def stored_bytes(bits: str, layer: nn.Module) -> tuple[int, int]:
    """(weight bytes, scale bytes) of a bitsandbytes layer, before or after its first forward (which moves the
    8-bit scales into `state` and may repack a 4-bit weight for the CPU kernel, un-nesting its absmax)."""
    if bits == "8bit":
        scales = [layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB]
    else:
        state = layer.weight.quant_state
        scales = [state.absmax] + ([state.state2.absmax] if state.nested else [])
    return layer.weight.numel() * layer.weight.element_size(), sum(t.numel() * t.element_size() for t in scales)


def test_weights_are_stored_quantised(quantized: tuple[str, str, Any], loaded: Any) -> None:
    bits = quantized[0]
    floats = decoder_linears(loaded)
    float_bytes = weight_bytes = scale_bytes = 0
    for name, layer in decoder_linears(quantized[2]).items():
        out_features, in_features = floats[name].weight.shape
        weights, scales = stored_bytes(bits, layer)
        float_bytes, weight_bytes, scale_bytes = float_bytes + 4 * out_features * in_features, \
            weight_bytes + weights, scale_bytes + scales  # fmt: skip
        if bits == "8bit":  # int8 rows, one float32 absmax scale per output row
            assert layer.weight.dtype == torch.int8 and layer.weight.shape == (out_features, in_features)
            assert scales == 4 * out_features
        else:  # NF4: two 4-bit codes per byte, one absmax per 64 weights
            state = layer.weight.quant_state
            assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == out_features * in_features // 2
            assert (state.quant_type, state.blocksize) == ("nf4", 64)
            assert state.absmax.numel() == out_features * in_features // 64
    # float32 -> int8 / NF4: 4x / 8x smaller (2x / 4x against bfloat16) ...
    assert weight_bytes * (4 if bits == "8bit" else 8) == float_bytes
    # ... plus the scales: 4 bytes per row of >= 64 weights (8bit); 1 byte (nested, + 4 per 256 absmaxes) or
    # 2 (bfloat16, repacked for the CPU kernel) per 64 weights (4bit). OpenVLA-7B's rows have 4096 or 11008.
    assert 16 * scale_bytes <= weight_bytes


def test_each_layer_multiplies_by_its_own_weights(quantized: tuple[str, str, Any], loaded: Any) -> None:
    bits, dtype = quantized[0], ckpt.DTYPES[quantized[1]]
    floats, generator = decoder_linears(loaded), torch.Generator().manual_seed(0)
    for name, layer in decoder_linears(quantized[2]).items():
        weight = floats[name].weight
        x = torch.randn(9, weight.shape[1], generator=generator)
        x[:, 5] *= 25  # an outlier column: LLM.int8() multiplies it apart, in the model dtype
        with torch.no_grad():
            expected, got = x @ weight.T, layer(x.to(dtype))
        assert got.dtype == dtype and got.shape == expected.shape
        error = float((got.float() - expected).norm() / expected.norm())
        assert 0 < error < LAYER_ERROR[bits], name


def test_first_action_logits_agree_with_float32(quantized: tuple[str, str, Any], loaded: Any) -> None:
    bits, dtype, model = quantized
    for seed in SEEDS:
        reference, logits = first_logits(loaded, seed), first_logits(model, seed)
        assert logits.dtype == ckpt.DTYPES[dtype] and not torch.equal(logits.float(), reference)
        correlation = float(torch.corrcoef(torch.stack([reference, logits.float()]))[0, 1])
        relative = float((logits.float() - reference).abs().max() / reference.abs().max())
        assert correlation > MIN_CORRELATION[bits] and relative < MAX_RELATIVE[bits], (seed, correlation, relative)
    if bits == "8bit":
        # masked greedy decoding (7 tokens) gave float32's tokens on 5 or 6 of these 6 observations (the random
        # model's top two action logits can be 0.02 apart); 4bit gave them on 0 or 1, not checked
        greedy = [(m.model.sample(*inputs(m, seed), 1, 0.0)[0] for m in (loaded, model)) for seed in range(6)]
        assert sum(torch.equal(*pair) for pair in greedy) >= 4


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_the_policy_returns_valid_canonical_actions(tiny_dir: Path, bits: str) -> None:
    bitsandbytes()
    policy = make_policy(openvla_config(tiny_dir, f"policy.quantization={bits}", "policy.dtype=bfloat16"))
    obs = observation(3)
    ids, logp = policy.model.sample(*policy.inputs(obs), 8, generator=torch.Generator().manual_seed(0))
    assert bool(policy.model.tokens.is_action(ids).all()) and bool((logp < 0).all())
    for actions in (policy.sample_actions(obs, 8), policy.act(obs)[None]):
        assert actions.dtype == np.float32 and actions.shape[1:] == (1, 7) and np.isfinite(actions).all()
        assert ((actions[..., 6] >= 0) & (actions[..., 6] <= 1)).all()
    assert len(np.unique(policy.sample_actions(obs, 8)[:, 0, 0])) > 1


def test_errors_name_the_fix(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match=r"policy\.quantization='3bit'; choose null, 8bit or 4bit"):
        ckpt.load_openvla(str(tiny_dir), "float32", "cpu", "3bit")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(UserError, match=r"quantization=8bit needs bitsandbytes: `pip install 'bitsandbytes>=0\.48'`"):
        ckpt.load_openvla(str(tiny_dir), "float32", "cpu", "8bit")
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(__version__="0.45.5"))
    with pytest.raises(UserError, match=r"4bit on the CPU needs bitsandbytes >= 0\.48 \(installed: 0\.45\.5\)"):
        ckpt.load_openvla(str(tiny_dir), "float32", "cpu", "4bit")
    with pytest.raises(UserError, match=r"runs on cuda or cpu, not mps"):
        ckpt.import_bitsandbytes("8bit", torch.device("mps"))
    ckpt.import_bitsandbytes("8bit", torch.device("cuda"))  # older releases run on CUDA
