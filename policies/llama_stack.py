"""G Llama causal LMs of one shape decoded as one: every layer a single batched matmul over the G weight sets.

Q-SFT's action selection decodes two models in lockstep, pi_phi and p_theta (policies/qsft/qsft.py), and
its ratio critic scores with both. At the sizes a robot policy runs at, a decode step costs kernel
launches and Python dispatch, not arithmetic, so two models' steps cost about twice one model's. Run
as one stack, each layer of the two models is one `bmm` over a (G, in, out) weight, and a decode step
costs about what one model's does. With G = 1 the same code is the VLA's own fast decoder.

    stack = LlamaStack([pi.lm, q.lm], columns=slice(first, last))
    state, logits = stack.prefill(embeds (G, N, P, H), mask (N, P), k)    # logits (G, N * k, C)
    logits = stack.extend(state, ids (G, M, n))                           # (G, M, n, C)

- The math is transformers' `LlamaForCausalLM` (RMSNorm in float32, rotary embeddings from the
  model's own `rotary_emb`, grouped-query attention, gated MLP), with the KV cache in preallocated
  tensors. Prompts padded inside the sequence work as in policies/vla.py: padded keys are masked and
  positions come from the caller. Tests compare the logits with transformers' forward.
- Only the logits of `columns` are computed (the action ids, and Q-SFT's dummy id before them).
- For G > 1 the stacked weights are a copy of the G models' LM weights (the extra memory of one
  model per model), made on first use and again whenever a parameter changes (each tensor's
  version counter), so an optimiser step or a load is seen. For G = 1 they are views: no copy.
  Under autocast, when the weights are of another dtype than autocast's (float32 weights, bf16
  autocast), the matrices are kept cast to the autocast dtype (and fused, also for G = 1), so no
  decode step casts them again; the numbers are those of the per-call cast autocast would make.
- `LlamaStack.unsupported(lms)` names why a set of models cannot be stacked (not Llama, different
  shapes, biases, adapters or quantised layers, dropout while training); callers then decode each
  model with transformers.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from policies.kv_cache import positions

_LLAMA = "llama"


@dataclass
class StackState:
    """KV cache of G stacked models: keys / values (layers, G, M, kv_heads, capacity, d), `length` filled.

    mask (M, capacity) bool marks the keys a query may read (False: padding); position (M, 1) is the
    position id of the last token written.
    """

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    position: torch.Tensor
    length: int
    weights: dict[str, list[torch.Tensor]]  # the stacked weights the prefill used: one decode, one set


class LlamaStack:
    """G same-shaped transformers Llama causal LMs (module docstring); `columns` selects the logits kept."""

    def __init__(self, lms: Sequence[nn.Module], columns: slice) -> None:
        reason = self.unsupported(lms)
        if reason:
            raise ValueError(f"cannot stack these language models: {reason}")
        self.lms, self.columns = list(lms), columns
        config = lms[0].config
        self.heads, self.kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.eps = float(config.rms_norm_eps)
        self.act = _activation(config.hidden_act)
        self.rotary = lms[0].model.rotary_emb
        self._key: tuple | None = None
        self._weights: dict[str, list[torch.Tensor]] = {}

    @staticmethod
    def unsupported(lms: Sequence[nn.Module]) -> str | None:
        """Why these models cannot run as one stack, or None when they can."""
        if not lms:
            return "no models"
        configs = [getattr(lm, "config", None) for lm in lms]
        if any(getattr(c, "model_type", None) != _LLAMA for c in configs) or any(
            not hasattr(getattr(lm, "model", None), "rotary_emb") for lm in lms
        ):
            return "only transformers' LlamaForCausalLM is supported"
        shapes = {tuple((n, tuple(p.shape), p.dtype, p.device) for n, p in lm.named_parameters()) for lm in lms}
        if len(shapes) > 1:
            return "the models differ in parameter names, shapes, dtypes or devices"
        for lm in lms:
            for layer in lm.model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj]
                if any(type(m) is not nn.Linear for m in [*linears, mlp.down_proj, lm.get_output_embeddings()]):
                    return "layers that are not plain nn.Linear (LoRA adapters not merged, quantised weights)"
        c = configs[0]
        if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
            return "attention or MLP biases"
        if getattr(c, "pretraining_tp", 1) not in (1, None):
            return "pretraining_tp > 1"
        if _dropout(lms):
            return "attention dropout in training mode"
        return None

    # --- weights ---------------------------------------------------------------------------------

    def weights(self) -> dict[str, list[torch.Tensor]]:
        """Stacked weights, per layer: qkv (G, H, (h + 2 kvh) d), o, gate_up, down (transposed), the norms."""
        params = [list(lm.parameters()) for lm in self.lms]
        weight = self.lms[0].get_output_embeddings().weight
        cast = torch.get_autocast_dtype(weight.device.type) if torch.is_autocast_enabled(weight.device.type) else None
        cast = cast if cast not in (None, weight.dtype) else None  # matrices kept in the dtype autocast casts to
        key = (cast, *((p.data_ptr(), p._version) for ps in params for p in ps))
        if key != self._key:
            self._weights, self._key = {}, None  # free the old copy before making the new one
            self._weights = self._stack(cast)
            self._key = key
        return self._weights

    @torch.no_grad()
    def _stack(self, cast: torch.dtype | None) -> dict[str, list]:
        """(G, in, out) copies of the matrices, q/k/v and gate/up fused, in dtype `cast` if given; G = 1 and
        no cast: views of the model's own weights, no copy. Norms and embeddings keep their dtype."""
        views = len(self.lms) == 1 and cast is None

        def stacked(tensors: list[torch.Tensor], transpose: bool = True) -> torch.Tensor:
            if views:
                return tensors[0].T[None] if transpose else tensors[0][None, None, None]
            if not transpose:
                return torch.stack(tensors)[:, None, None].contiguous()
            out = torch.stack(tensors).transpose(-1, -2)
            return out.to(cast, memory_format=torch.contiguous_format) if cast else out.contiguous()

        def fused(parts: list[list[torch.Tensor]]) -> list[torch.Tensor]:
            """Projections whose outputs are concatenated: one fused weight, or (views) one view each."""
            if views:
                return [stacked(p) for p in parts]
            return [stacked([torch.cat(ws) for ws in zip(*parts, strict=True)])]

        w: dict[str, list] = {k: [] for k in ("qkv", "o", "gate_up", "down", "norm1", "norm2")}
        for layers in zip(*(lm.model.layers for lm in self.lms), strict=True):
            attn, mlp = [layer.self_attn for layer in layers], [layer.mlp for layer in layers]
            w["qkv"].append(fused([[getattr(a, n).weight for a in attn] for n in ("q_proj", "k_proj", "v_proj")]))
            w["o"].append(stacked([a.o_proj.weight for a in attn]))
            w["gate_up"].append(fused([[getattr(m, n).weight for m in mlp] for n in ("gate_proj", "up_proj")]))
            w["down"].append(stacked([m.down_proj.weight for m in mlp]))
            w["norm1"].append(stacked([layer.input_layernorm.weight for layer in layers], False))
            w["norm2"].append(stacked([layer.post_attention_layernorm.weight for layer in layers], False))
        w["final_norm"] = [stacked([lm.model.norm.weight for lm in self.lms], False)]
        embed = [lm.get_input_embeddings().weight for lm in self.lms]
        w["embed"] = [embed[0][None] if len(embed) == 1 else torch.stack(embed)]  # (G, V, H)
        w["head"] = [stacked([lm.get_output_embeddings().weight[self.columns] for lm in self.lms])]  # (G, H, C)
        return w

    # --- the forward -----------------------------------------------------------------------------

    def prefill(
        self, embeds: torch.Tensor, mask: torch.Tensor, k: int = 1, extra: int = 0
    ) -> tuple[StackState, torch.Tensor]:
        """Prefixes (G, N, P, H) with key mask (N, P) -> state of N * k rows and the next token's logits (G, N * k, C).

        Row n * k + j is copy j of prefix n; the cache has room for `extra` more tokens per row.
        """
        G, N, P, _ = embeds.shape
        position = positions(mask)
        causal = torch.ones(P, P, dtype=torch.bool, device=mask.device).tril()
        allowed = causal & (mask[:, None, :] | torch.eye(P, dtype=torch.bool, device=mask.device))  # (N, P, P)
        w = self.weights()
        layers = len(w["qkv"])
        dtype = self._dtype(embeds, w)
        keys = embeds.new_empty((layers, G, N * k, self.kv_heads, P + extra, self.head_dim), dtype=dtype)
        values = torch.empty_like(keys)
        cos_sin, mask4 = self._rotary(embeds, position), _expand_mask(allowed, G)
        hidden = embeds
        for i in range(layers):
            hidden = self._layer(hidden, w, i, cos_sin, mask4, keys, values, 0, k, read_cache=False)
        logits = self._head(hidden[:, :, -1:], w)[:, :, 0]  # (G, N, C)
        state = StackState(keys, values, F.pad(mask, (0, extra), value=False).repeat_interleave(k, 0),
                           position[:, -1:].repeat_interleave(k, 0), P, w)  # fmt: skip
        return state, logits.repeat_interleave(k, 1)

    def extend(self, state: StackState, ids: torch.Tensor) -> torch.Tensor:
        """Append token ids (G, M, n) (each model its own, or (M, n) for all) -> logits (G, M, n, C)."""
        w = state.weights
        G = w["embed"][0].shape[0]
        if ids.dim() == 2:
            ids = ids.expand(G, *ids.shape)
        n = ids.shape[2]
        start = state.length
        if start + n > state.keys.shape[-2]:
            raise ValueError(f"the cache holds {state.keys.shape[-2]} tokens; {start} + {n} do not fit")
        embeds = w["embed"][0][torch.arange(G, device=ids.device)[:, None, None], ids]  # (G, M, n, H)
        position = state.position + torch.arange(1, n + 1, device=ids.device)
        state.mask[:, start : start + n] = True
        causal = torch.ones(n, start + n, dtype=torch.bool, device=ids.device).tril(start)
        allowed = causal & state.mask[:, None, : start + n]  # (M, n, start + n)
        cos_sin, mask4 = self._rotary(embeds, position), _expand_mask(allowed, G)
        hidden = embeds
        for i in range(len(w["qkv"])):
            hidden = self._layer(hidden, w, i, cos_sin, mask4, state.keys, state.values, start)
        state.position, state.length = position[:, -1:], start + n
        return self._head(hidden, w)

    def _layer(
        self, x: torch.Tensor, w: dict, i: int, cos_sin: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
        keys: torch.Tensor, values: torch.Tensor, start: int, k: int = 1, read_cache: bool = True,
    ) -> torch.Tensor:  # fmt: skip
        """One decoder layer on x (G, B, T, H); writes its keys / values at [start, start + T) of the cache.

        mask (G * B, 1, T, L): which keys each query reads. read_cache=False (a prefill): the keys
        are written k times (rows b * k .. b * k + k - 1) and the queries read only the new tokens;
        else they read the cache up to start + T.
        """
        G, B, T, _ = x.shape
        h, kvh, d = self.heads, self.kv_heads, self.head_dim
        qkv = _project(self._norm(x, w["norm1"][i]), w["qkv"][i]).view(G, B, T, h + 2 * kvh, d)
        q, key, value = qkv.split([h, kvh, kvh], dim=3)
        # attention in the cache's dtype: under autocast SDPA would cast to it anyway
        q, key = _rope(q, cos_sin).to(keys.dtype), _rope(key, cos_sin).to(keys.dtype)
        key, value = key.transpose(2, 3), value.transpose(2, 3).to(keys.dtype)  # (G, B, kvh, T, d)
        keys[i, :, :, :, start : start + T] = key.repeat_interleave(k, 1) if k > 1 else key
        values[i, :, :, :, start : start + T] = value.repeat_interleave(k, 1) if k > 1 else value
        if read_cache:
            key, value = keys[i, :, :, :, : start + T], values[i, :, :, :, : start + T]
        L = key.shape[-2]
        q = q.transpose(2, 3).reshape(G * B, h, T, d)
        key = _repeat_heads(key.reshape(G * B, kvh, L, d), h // kvh)
        value = _repeat_heads(value.reshape(G * B, kvh, L, d), h // kvh)
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=d**-0.5)
        out = out.view(G, B, h, T, d).transpose(2, 3).reshape(G, B, T, h * d)
        x = x + _bmm(out, w["o"][i])
        gate, up = _project(self._norm(x, w["norm2"][i]), w["gate_up"][i]).chunk(2, dim=-1)
        return x + _bmm(self.act(gate) * up, w["down"][i])

    def _head(self, x: torch.Tensor, w: dict) -> torch.Tensor:
        return _bmm(self._norm(x, w["final_norm"][0]), w["head"][0]).float()

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """transformers' LlamaRMSNorm: float32 statistics, back to the input dtype, times the weight."""
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _rotary(self, x: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(x[0], position)  # (B, T, d): one set of positions for all G models
        return cos[None, :, :, None], sin[None, :, :, None]

    @staticmethod
    def _dtype(x: torch.Tensor, w: dict) -> torch.dtype:
        """The dtype the keys come out in: the autocast dtype when autocast is on, else the weights'."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return torch.promote_types(x.dtype, w["o"][0].dtype)


def _dropout(lms: Sequence[nn.Module]) -> bool:
    """Whether transformers would drop attention weights (training mode with attention_dropout > 0)."""
    return any(lm.training and float(getattr(lm.config, "attention_dropout", 0.0) or 0.0) > 0 for lm in lms)


def _bmm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (G, ..., in) @ weight (G, in, out) -> (G, ..., out): one batched matmul for the G models."""
    if not torch.is_autocast_enabled(x.device.type):  # under autocast bmm casts both operands itself
        weight = weight.to(x.dtype)
    return torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[-1])


def _expand_mask(allowed: torch.Tensor, g: int) -> torch.Tensor:
    """(B, T, L) bool -> SDPA's (g * B, 1, T, L): the same mask for each of the g models."""
    B, T, L = allowed.shape
    return allowed[None, :, None].expand(g, B, 1, T, L).reshape(g * B, 1, T, L)


def _project(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """x times each weight, outputs concatenated along the last axis (one weight: a single bmm)."""
    outs = [_bmm(x, weight) for weight in weights]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _rope(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotary embedding of x (G, B, T, heads, d) with cos / sin (1, B, T, 1, d) (transformers' rotate_half form)."""
    cos, sin = cos_sin
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _repeat_heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """Grouped-query attention: (B, kvh, L, d) -> (B, kvh * n, L, d), each key/value head serving n query heads."""
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def _activation(name: str):
    from transformers.activations import ACT2FN

    return ACT2FN[name]


_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # owner -> {models and columns: LlamaStack}


def cached_stack(owner: object, lms: Sequence[nn.Module], columns: slice) -> LlamaStack | None:
    """`owner`'s LlamaStack of these models (made once and kept while the owner lives), or None when they cannot be
    stacked. The cache sits beside the owner, not in it, so copies and checkpoints of the owner never carry it."""
    stacks = _STACKS.setdefault(owner, {})
    key = (tuple(id(lm) for lm in lms), columns.start, columns.stop)
    stack = stacks.get(key)
    if stack is not None and all(a is b for a, b in zip(stack.lms, lms, strict=True)):
        return None if _dropout(lms) else stack  # the structure was checked when the stack was made
    if LlamaStack.unsupported(lms):
        return None
    stack = stacks[key] = LlamaStack(lms, columns)
    return stack
