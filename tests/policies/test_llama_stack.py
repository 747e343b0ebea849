"""policies/llama_stack.py against transformers' LlamaForCausalLM: logits, KV cache, padding, weight updates."""

from __future__ import annotations

import pytest
import torch

from policies.llama_stack import LlamaStack, cached_stack

COLUMNS = slice(20, 40)


def llama(seed: int, **overrides) -> torch.nn.Module:
    """A random tiny Llama with grouped-query attention and sharpened attention (so positions matter)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    lm = LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).eval()
    with torch.no_grad():
        for layer in lm.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    return lm


def prefixes(g: int, hidden: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeds (g, 2, 6, hidden) and a key mask whose second row pads two slots inside the sequence."""
    embeds = torch.randn(g, 2, 6, hidden, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 1:3] = False
    return embeds, mask


@torch.no_grad()
def reference(lm: torch.nn.Module, embeds: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """transformers' uncached forward over the prefix and then ids (B, n): logits (B, n + 1, C) of the last n + 1."""
    full = torch.cat([embeds, lm.get_input_embeddings()(ids)], dim=1)
    mask = torch.cat([mask, torch.ones(ids.shape, dtype=torch.bool, device=ids.device)], dim=1)
    position = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = lm(inputs_embeds=full, attention_mask=mask.long(), position_ids=position).logits
    return out[:, -ids.shape[1] - 1 :, COLUMNS]


@pytest.mark.parametrize("g", [1, 2])
@torch.no_grad()
def test_stack_equals_each_model_through_prefill_repeat_and_extend(g: int) -> None:
    lms = [llama(i) for i in range(g)]
    stack = LlamaStack(lms, COLUMNS)
    embeds, mask = prefixes(g)
    k = 3
    state, first = stack.prefill(embeds, mask, k, extra=4)
    ids = torch.randint(0, 40, (g, 2 * k, 3), generator=torch.Generator().manual_seed(2))
    one = stack.extend(state, ids[:, :, :1])  # a decode step
    two = stack.extend(state, ids[:, :, 1:])  # two tokens at once
    assert first.shape == (g, 2 * k, 20) and one.shape == (g, 2 * k, 1, 20) and two.shape == (g, 2 * k, 2, 20)
    for m, lm in enumerate(lms):
        ref = reference(lm, embeds[m].repeat_interleave(k, 0), mask.repeat_interleave(k, 0), ids[m])
        torch.testing.assert_close(first[m], ref[:, 0], rtol=0, atol=2e-5)
        torch.testing.assert_close(one[m, :, 0], ref[:, 1], rtol=0, atol=2e-5)
        torch.testing.assert_close(two[m], ref[:, 2:], rtol=0, atol=2e-5)
    if g == 2:
        assert not torch.allclose(first[0], first[1], atol=1e-2)  # two different models, not one twice
    else:  # one model: its own weights, not a copy
        assert stack.weights()["o"][0].data_ptr() == lms[0].model.layers[0].self_attn.o_proj.weight.data_ptr()
    with pytest.raises(ValueError, match="cache holds 10 tokens"):
        stack.extend(state, ids[:, :, :2])


@torch.no_grad()
def test_shared_ids_and_bf16_autocast_match_transformers() -> None:
    lms = [llama(0), llama(1)]
    embeds, mask = prefixes(2)
    ids = torch.randint(0, 40, (2, 2), generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", torch.bfloat16):
        stack = LlamaStack(lms, COLUMNS)
        state, _ = stack.prefill(embeds, mask, extra=2)
        out = stack.extend(state, ids)  # (M, n): the same tokens for both models
        refs = [reference(lm, embeds[g], mask, ids)[:, 1:] for g, lm in enumerate(lms)]
    for g in range(2):
        exact = reference(lms[g], embeds[g], mask, ids)[:, 1:]
        assert (out[g] - refs[g]).abs().max() <= 2 * (refs[g] - exact).abs().max() + 1e-2


@torch.no_grad()
def test_autocast_keeps_the_matrices_cast_once() -> None:
    """Under bf16 autocast float32 matrices are cast (and fused) once, not at every step, also for one model;
    the logits stay as close to transformers' own autocast forward as the two-model test demands."""
    lm = llama(0)
    embeds, mask = prefixes(1)
    ids = torch.randint(0, 40, (2, 2), generator=torch.Generator().manual_seed(4))
    stack = LlamaStack([lm], COLUMNS)
    with torch.autocast("cpu", torch.bfloat16):
        w = stack.weights()
        assert stack.weights() is w and len(w["qkv"][0]) == 1 and w["qkv"][0][0].dtype == torch.bfloat16
        assert w["norm1"][0].dtype == torch.float32  # norms keep the model's dtype, as transformers' RMSNorm
        state, _ = stack.prefill(embeds, mask, extra=2)
        out = stack.extend(state, ids)[0]
        ref = reference(lm, embeds[0], mask, ids)[:, 1:]
    exact = reference(lm, embeds[0], mask, ids)[:, 1:]
    assert (out - ref).abs().max() <= 2 * (ref - exact).abs().max() + 1e-2
    views = stack.weights()  # outside autocast: the model's own weights again
    assert views["o"][0].data_ptr() == lm.model.layers[0].self_attn.o_proj.weight.data_ptr()


@torch.no_grad()
def test_stacked_weights_follow_in_place_updates() -> None:
    lms = [llama(0), llama(1)]
    stack = LlamaStack(lms, COLUMNS)
    embeds, mask = prefixes(2)
    before = stack.prefill(embeds, mask)[1]
    lms[1].model.layers[0].mlp.down_proj.weight.add_(0.5)  # as an optimiser step or load_state_dict does
    lms[1].lm_head.weight.mul_(2)
    after = stack.prefill(embeds, mask)[1]
    torch.testing.assert_close(after[0], before[0])
    torch.testing.assert_close(after[1], reference(lms[1], embeds[1], mask, torch.empty(2, 0, dtype=torch.long))[:, 0],
                               rtol=0, atol=2e-5)  # fmt: skip
    assert not torch.allclose(after[1], before[1], atol=1e-3)


def test_unsupported_models_are_named() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    assert LlamaStack.unsupported([llama(0), llama(1)]) is None
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=2))
    assert "LlamaForCausalLM" in LlamaStack.unsupported([gpt2])
    assert "differ" in LlamaStack.unsupported([llama(0), llama(1, num_hidden_layers=3)])
    assert "biases" in LlamaStack.unsupported([llama(0, attention_bias=True)])
    assert "dropout" in LlamaStack.unsupported([llama(0, attention_dropout=0.1).train()])
    assert LlamaStack.unsupported([llama(0, attention_dropout=0.1)]) is None  # eval mode: no dropout
    with pytest.raises(ValueError, match="cannot stack"):
        LlamaStack([gpt2], COLUMNS)
    owner = type("Owner", (), {})()
    assert cached_stack(owner, [gpt2], COLUMNS) is None
    lms = [llama(0)]
    assert cached_stack(owner, lms, COLUMNS) is cached_stack(owner, lms, COLUMNS)
    dropping = [llama(0, attention_dropout=0.1)]
    assert cached_stack(owner, dropping, COLUMNS) is not None
    dropping[0].train()  # a cached stack is not used once dropout would apply
    assert cached_stack(owner, dropping, COLUMNS) is None
