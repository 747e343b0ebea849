"""KV-cached decoding with a transformers causal LM, across transformers versions.

    logits, dec = prefill(lm, mask (N, P), k, inputs_embeds=...)   # last logits (N, V); dec: N * k rows
    logits = extend(lm, dec, ids (N * k, n))                       # (N * k, n, V)

transformers 5.2x renamed the forward's `past_key_values` argument and output field to `cache`; the
old names still work there with a warning and go in 5.40, while 4.x knows only the old ones.
`cache_kwargs` and `output_cache` use whichever the installed model understands. `prefill` / `extend`
are the cached decoding that the VLA's and Q-SFT's transformers paths share (policies/llama_stack.py
is the fused one).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, L) that skip padding inside the sequence: the number of real tokens before each one."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class Decoding:
    """KV-cached decoding of M rows: cache, mask (M, L) bool, position of the last token (M, 1), and the
    next-token logits as the caller keeps them (e.g. only the action ids' columns)."""

    cache: Any
    mask: torch.Tensor
    position: torch.Tensor
    logits: torch.Tensor | None = None


def prefill(model: Any, mask: torch.Tensor, k: int = 1, own_positions: bool = False, **inputs: Any):
    """One cached forward over N padded prefixes (`inputs`, `mask` (N, P) bool) -> (the last position's
    logits (N, V), a Decoding of N * k rows: row n * k + j is copy j of prefix n). `own_positions`:
    the model computes its positions from the mask (multimodal RoPE), so none are passed."""
    position = positions(mask)
    out = model(attention_mask=mask.long(), position_ids=None if own_positions else position, **inputs,
                use_cache=True, logits_to_keep=1)  # fmt: skip
    cache = output_cache(out)
    if k > 1:
        cache.batch_repeat_interleave(k)
    return out.logits[:, -1], Decoding(cache, mask.repeat_interleave(k, 0), position[:, -1:].repeat_interleave(k, 0))


def extend(model: Any, dec: Decoding, ids: torch.Tensor, own_positions: bool = False) -> torch.Tensor:
    """Append token ids (M, n) to every row -> logits (M, n, V): row j predicts the token after ids[:, j]."""
    n = ids.shape[1]
    dec.mask = F.pad(dec.mask, (0, n), value=True)
    position = dec.position + torch.arange(1, n + 1, device=ids.device)
    out = model(input_ids=ids, attention_mask=dec.mask.long(), position_ids=None if own_positions else position,
                **cache_kwargs(model, dec.cache), use_cache=True)  # fmt: skip
    dec.position = position[:, -1:]
    return out.logits


@functools.cache
def _keyword(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """{keyword: cache} for `model(...)`: `cache` where the model's forward takes it, else `past_key_values`."""
    return {_keyword(type(model)): cache}


def output_cache(output: Any) -> Any:
    """The KV cache a forward with use_cache=True returned (`output.cache`, or `output.past_key_values`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
