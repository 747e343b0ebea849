"""OpenVLA's architecture from timm and transformers parts, named as the published checkpoint names it.

Read from `prismatic/extern/hf/modeling_prismatic.py` (openvla/openvla; reimplemented, not copied):

    vision_backbone.featurizer        DINOv2 ViT-L/14 with 4 registers (timm VisionTransformer), 224 px
    vision_backbone.fused_featurizer  SigLIP So400m/14 (timm VisionTransformer), 224 px
        each gives the patch tokens of its SECOND-TO-LAST block (no final norm, class/register tokens
        dropped); the two are concatenated along channels: (B, 256, 1024 + 1152 = 2176)
    projector.fc1 -> GELU -> fc2 -> GELU -> fc3      the fused MLP: 2176 -> 8704 -> 4096 -> 4096
    language_model                    Llama-2-7B (transformers LlamaForCausalLM), 32000 + 64 padding ids

    sequence = [BOS] [256 projected patches] [prompt tokens ... 29871]  ->  7 action tokens

`pixel_values` is (B, 6, 224, 224): the image normalised once per backbone, stacked along channels
(policies/openvla/processing.py). The action tokens are the last 256 ids of the 32000-token
vocabulary (policies/action_tokens.py): `vocab_size = text_config.vocab_size - pad_to_multiple_of`.

Deliberate differences from the published module, none of which changes a number:
- timm's LayerScale parameter `gamma` is called `scale_factor` here, as in the published checkpoint
  (the published code patches timm's modules after construction because transformers renames
  parameters called `gamma` when loading); timm-style `gamma` keys are mapped on load.
- The ViTs stop after the second-to-last block (the published code also runs the last one and
  throws its output away).
- The ViT architectures are pinned here (timm 0.9.10's definitions, which OpenVLA was trained and
  released with) instead of being looked up by name in whatever timm is installed.
- Llama's config is built from `text_config` over transformers 4.40.1's `LlamaConfig` defaults,
  which is what the published code gets (its `text_config` lists only the fields that differ).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from timm.layers import LayerScale as TimmLayerScale
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn import functional as F

from configs.errors import UserError
from policies.action_tokens import ActionTokenizer
from policies.base import ACTION_DIM
from policies.kv_cache import cache_kwargs, output_cache
from policies.llama_stack import cached_stack
from policies.vla import choose

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ViTArch:
    """A timm VisionTransformer's constructor arguments and its image normalisation (timm data config)."""

    kwargs: dict[str, Any]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"


# timm ids (without the pretrained tag) -> architecture. The real ones are timm 0.9.10's definitions
# (unchanged in timm 1.0.31); the tiny ones keep their structure at test size (policies/openvla/tiny.py).
VIT_ARCHS: dict[str, ViTArch] = {
    "vit_large_patch14_reg4_dinov2": ViTArch(
        dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5, reg_tokens=4,
             no_embed_class=True), IMAGENET_MEAN, IMAGENET_STD),
    "vit_so400m_patch14_siglip_224": ViTArch(
        dict(patch_size=14, embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362, class_token=False,
             global_pool="map"), HALF, HALF),
    "tiny_dinov2_reg4": ViTArch(
        dict(patch_size=14, embed_dim=32, depth=3, num_heads=2, init_values=1e-5, reg_tokens=4, no_embed_class=True),
        IMAGENET_MEAN, IMAGENET_STD),
    "tiny_siglip": ViTArch(
        dict(patch_size=14, embed_dim=48, depth=3, num_heads=2, mlp_ratio=3.7362, class_token=False,
             global_pool="map"), HALF, HALF),
}  # fmt: skip

# configuration_prismatic.py: vision_backbone_id -> (timm ids, image sizes) for the ids OpenVLA uses.
VISION_BACKBONES: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    "dinosiglip-vit-so-224px": (("vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"), (224, 224)),
    "dinov2-vit-l": (("vit_large_patch14_reg4_dinov2.lvd142m",), (224,)),
    "siglip-vit-so400m": (("vit_so400m_patch14_siglip_224",), (224,)),
}

# transformers 4.40.1 LlamaConfig defaults: what the published code's `CONFIG_MAPPING["llama"](**text_config)`
# fills in for the fields OpenVLA's config.json leaves out (later transformers may change defaults).
LLAMA_DEFAULTS: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02,
    rms_norm_eps=1e-6, pad_token_id=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    rope_theta=10000.0, rope_scaling=None, attention_bias=False, attention_dropout=0.0,
)  # fmt: skip
_CONFIG_METADATA = ("model_type", "torch_dtype", "dtype", "architectures", "transformers_version", "_name_or_path")
_LLAMA_BACKBONES = ("llama2-", "vicuna-")


def vit_arch(timm_id: str) -> ViTArch:
    """The architecture of a timm id such as `vit_large_patch14_reg4_dinov2.lvd142m`."""
    name = timm_id.split(".")[0]
    if name not in VIT_ARCHS:
        raise UserError(f"Unknown OpenVLA vision backbone {timm_id!r}; known: {', '.join(sorted(VIT_ARCHS))}.")
    return VIT_ARCHS[name]


@dataclass
class OpenVLAArch:
    """What config.json says about the architecture (OpenVLAConfig's fields that shape the model)."""

    timm_model_ids: tuple[str, ...]
    image_sizes: tuple[int, ...]
    act_layers: tuple[str | None, ...]
    # LlamaConfig keyword arguments: text_config over LLAMA_DEFAULTS.
    text: dict[str, Any] = field(default_factory=dict)
    pad_to_multiple_of: int = 64
    n_action_bins: int = 256
    llm_backbone_id: str = "llama2-7b-pure"

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> OpenVLAArch:
        """Parse an OpenVLA config.json (explicit `timm_model_ids` / `image_sizes` win over `vision_backbone_id`)."""
        backbone = config.get("vision_backbone_id", "dinosiglip-vit-so-224px")
        ids, sizes = config.get("timm_model_ids"), config.get("image_sizes")
        if ids is None or sizes is None:
            if backbone not in VISION_BACKBONES:
                raise UserError(f"Unknown vision_backbone_id {backbone!r}; known: {', '.join(VISION_BACKBONES)}.")
            ids, sizes = ids or VISION_BACKBONES[backbone][0], sizes or VISION_BACKBONES[backbone][1]
        fused = config.get("use_fused_vision_backbone")
        if fused is not None and bool(fused) != (len(ids) == 2):
            raise UserError(f"config.json: use_fused_vision_backbone={fused} but {len(ids)} vision backbone(s).")
        llm = config.get("llm_backbone_id", "llama2-7b-pure")
        text = dict(config.get("text_config") or {})
        if not llm.startswith(_LLAMA_BACKBONES) or text.get("model_type", "llama") != "llama":
            raise UserError(f"Only Llama-2-based OpenVLA checkpoints are supported, not llm_backbone_id={llm!r}.")
        text = {**LLAMA_DEFAULTS, **{k: v for k, v in text.items() if k not in _CONFIG_METADATA}}
        acts = config.get("timm_override_act_layers") or [None] * len(ids)
        return cls(tuple(ids), tuple(int(s) for s in sizes), tuple(acts), text,
                   int(config.get("pad_to_multiple_of", 64)), int(config.get("n_action_bins", 256)), llm)  # fmt: skip

    @property
    def fused(self) -> bool:
        return len(self.timm_model_ids) == 2

    @property
    def vocab_size(self) -> int:
        """The text vocabulary without the padding rows: action ids are its last 256 (32000 for Llama-2)."""
        return int(self.text["vocab_size"]) - self.pad_to_multiple_of

    def llama_config(self) -> Any:
        from transformers import LlamaConfig

        return LlamaConfig(**self.text)


class LayerScale(nn.Module):
    """timm's LayerScale (x * per-channel scale) with the parameter named as the published checkpoint names it."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.scale_factor = nn.Parameter(scale.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


def build_vit(timm_id: str, image_size: int, act_layer: str | None) -> VisionTransformer:
    """A timm ViT as the published `timm.create_model(id, num_classes=0, img_size=..., act_layer=...)` builds it."""
    vit = VisionTransformer(img_size=image_size, num_classes=0, act_layer=act_layer, **vit_arch(timm_id).kwargs)
    for module in list(vit.modules()):
        for name, child in module.named_children():
            if isinstance(child, TimmLayerScale):
                setattr(module, name, LayerScale(child.gamma))
    return vit


def second_to_last_patches(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, patches, dim): tokens after block depth - 2, without final norm or prefix tokens."""
    (patches,) = vit.forward_intermediates(
        images, indices=[len(vit.blocks) - 2], norm=False, stop_early=True, intermediates_only=True,
        output_fmt="NLC",
    )  # fmt: skip
    return patches


class VisionBackbone(nn.Module):
    """One or two (fused) timm ViTs over channel-stacked images: (B, 3 * n, H, W) -> (B, patches, sum of dims)."""

    def __init__(self, arch: OpenVLAArch) -> None:
        super().__init__()
        self.featurizer = build_vit(arch.timm_model_ids[0], arch.image_sizes[0], arch.act_layers[0])
        self.embed_dim = int(self.featurizer.embed_dim)
        self.fused_featurizer: VisionTransformer | None = None
        if arch.fused:
            self.fused_featurizer = build_vit(arch.timm_model_ids[1], arch.image_sizes[1], arch.act_layers[1])
            self.embed_dim += int(self.fused_featurizer.embed_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.fused_featurizer is None:
            return second_to_last_patches(self.featurizer, pixel_values)
        image, image_fused = torch.split(pixel_values, [3, 3], dim=1)  # one normalisation per backbone
        patches = second_to_last_patches(self.featurizer, image)
        return torch.cat([patches, second_to_last_patches(self.fused_featurizer, image_fused)], dim=2)


class Projector(nn.Module):
    """Patch features -> LLM embeddings: fused fc1 -> GELU -> fc2 -> GELU -> fc3 (4x width), else fc1 -> GELU -> fc2."""

    def __init__(self, fused: bool, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fused = fused
        width = 4 * vision_dim if fused else llm_dim
        self.fc1 = nn.Linear(vision_dim, width)
        self.fc2 = nn.Linear(width, llm_dim)
        self.act_fn1 = nn.GELU()
        if fused:
            self.act_fn2 = nn.GELU()
            self.fc3 = nn.Linear(llm_dim, llm_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.fc2(self.act_fn1(self.fc1(patches)))
        return self.fc3(self.act_fn2(x)) if self.fused else x


class OpenVLA(nn.Module):
    """OpenVLA-7B (or a smaller configuration of it): an ordinary nn.Module with the published parameter names."""

    def __init__(self, arch: OpenVLAArch) -> None:
        super().__init__()
        from transformers import LlamaForCausalLM

        self.arch = arch
        self.vision_backbone = VisionBackbone(arch)
        self.language_model = LlamaForCausalLM(arch.llama_config())
        self.projector = Projector(arch.fused, self.vision_backbone.embed_dim, int(arch.text["hidden_size"]))
        self.tokens = ActionTokenizer(arch.vocab_size, arch.n_action_bins)

    def embed_prefix(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, 3 * n, H, W) + (B, L) ids starting with BOS -> (B, L + patches, hidden): patches right after BOS."""
        embed = self.language_model.get_input_embeddings()
        text = embed(input_ids)
        patches = self.projector(self.vision_backbone(pixel_values.to(text.dtype)))
        return torch.cat([text[:, :1], patches.to(text.dtype), text[:, 1:]], dim=1)

    @torch.no_grad()
    def sample(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, k: int, temperature: float = 1.0, top_k: int = 0,
        restrict: bool = True, generator: torch.Generator | None = None, fused: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """K action-token sequences for ONE observation: ids (K, 7) and their log-probabilities (K,) at T = 1.

        1. one forward over the prefix (pixel_values (1, 3 * n, H, W), input_ids (1, L)) with the KV cache;
        2. the cache repeated K times (DynamicCache.batch_repeat_interleave) and the last hidden state expanded;
        3. 7 steps: logits -> softmax(logits / temperature) sample (0 = argmax) -> one-token forward of K rows.
        `restrict` masks every non-action id (sampling only among the 256 action ids); without it the
        whole vocabulary competes, as in OpenVLA's predict_action (where a non-action id decodes to a
        clipped bin). Log-probabilities are over the same support (action ids, or the vocabulary).
        `fused`: Llama-2 decodes through policies/llama_stack.py (preallocated cache, only the logits
        sampled from; same numbers), unless its layers are quantised; else transformers' forward.
        """
        if input_ids.shape[0] != 1:
            raise ValueError(f"sample draws K actions for one observation, got a batch of {input_ids.shape[0]}")
        if temperature <= 0 and k > 1:  # greedy: every row would be the same
            ids, logp = self.sample(pixel_values, input_ids, 1, 0.0, top_k, restrict, generator, fused)
            return ids.expand(k, -1).clone(), logp.expand(k).clone()
        prefix = self.embed_prefix(pixel_values, input_ids)
        columns = self.tokens.columns if restrict else slice(None)
        stack = cached_stack(self, [self.language_model], columns) if fused else None
        if stack is not None:
            mask = torch.ones(prefix.shape[:2], dtype=torch.bool, device=prefix.device)
            state, scores = stack.prefill(prefix[None], mask, k, extra=ACTION_DIM - 1)
            scores, advance = scores[0], lambda ids: stack.extend(state, ids[:, None])[0, :, -1]
        else:
            scores, advance = self._hf_decoding(prefix, k, restrict)
        chosen, logp = [], torch.zeros(k, device=prefix.device)
        for step in range(ACTION_DIM):  # scores: (K, 256) or (K, V) float logits
            index = choose(scores, temperature, top_k, generator)
            logp += scores.log_softmax(-1).gather(1, index[:, None])[:, 0]
            ids = self.tokens.index_to_id(index) if restrict else index
            chosen.append(ids)
            if step < ACTION_DIM - 1:
                scores = advance(ids)
        return torch.stack(chosen, dim=1), logp

    def _hf_decoding(self, prefix: torch.Tensor, k: int, restrict: bool) -> tuple[torch.Tensor, Any]:
        """transformers' cached forward: the first logits (k, C) and a function ids (k,) -> the next logits."""
        decoder = self.language_model.model
        out = decoder(inputs_embeds=prefix, use_cache=True)
        cache, hidden = output_cache(out), out.last_hidden_state[:, -1]  # hidden (1, d)
        if k > 1:
            cache.batch_repeat_interleave(k)  # (1, ...) -> (K, ...): one cache row per sample

        def step(ids: torch.Tensor) -> torch.Tensor:
            out = decoder(input_ids=ids[:, None], **cache_kwargs(decoder, cache), use_cache=True)
            return self.next_logits(out.last_hidden_state[:, -1], restrict)

        return self.next_logits(hidden.expand(k, -1), restrict), step

    def next_logits(self, hidden: torch.Tensor, restrict: bool) -> torch.Tensor:
        """Final hidden states (M, d) -> float logits over the 256 action ids (restrict; index i = id first_id + i)
        or the whole vocabulary (M, V). Restricted, only the 256 action rows of lm_head are multiplied."""
        weight = self.language_model.lm_head.weight
        if restrict:
            weight = weight[self.tokens.columns]
        return F.linear(hidden, weight).float()
