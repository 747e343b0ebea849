"""policies/kv_cache.py: the KV-cache keyword of old and new transformers; no deprecation warning in use."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch

from policies.kv_cache import cache_kwargs, output_cache


class NewStyle:
    def forward(self, input_ids=None, cache=None, use_cache=None): ...


class OldStyle:
    def forward(self, input_ids=None, past_key_values=None, use_cache=None): ...


def test_keyword_and_output_follow_the_installed_api() -> None:
    assert cache_kwargs(NewStyle(), "kv") == {"cache": "kv"}
    assert cache_kwargs(OldStyle(), "kv") == {"past_key_values": "kv"}
    assert output_cache(SimpleNamespace(cache="new")) == "new"
    assert output_cache(SimpleNamespace(past_key_values="old")) == "old"


def test_cached_decoding_of_a_llama_raises_no_deprecation_warning() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.tensor([[1, 5, 7]])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        out = model(input_ids=ids, use_cache=True)
        step = model(input_ids=torch.tensor([[9]]), **cache_kwargs(model, output_cache(out)), use_cache=True)
        full = model(input_ids=torch.tensor([[1, 5, 7, 9]]), use_cache=False)
    torch.testing.assert_close(step.logits[0, -1], full.logits[0, -1], rtol=1e-4, atol=1e-5)
