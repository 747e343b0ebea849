"""The project's tokenized VLA: OpenVLA's recipe at small scale (reference/policies.md).

    tokens = [bos] [image tokens] [prompt tokens] [7 action tokens]
    image tokens = MLP projector(timm encoder(image))           (B, T_img, hidden)

A transformers causal LM (a small Llama built from `LlamaConfig`, or any pretrained causal LM by
hub id / directory) reads the sequence through `inputs_embeds`. Each normalised action dimension is
one of OpenVLA's 256 action tokens on the last 256 ids of the vocabulary (policies/action_tokens.py),
and the model is trained with cross-entropy on the 7 action tokens (SFT). Deliberate deviation from
OpenVLA: the softmax of the loss runs over the 256 action ids only (OpenVLA: the whole vocabulary),
so the trained distribution is exactly the one sampled from with the non-action ids masked.

Prompts have different lengths; a batch pads each prompt on the left *inside* the sequence
([bos, image, pads, prompt]), masks the pads out of attention and numbers positions by the
cumulative mask, so padding changes nothing and every row's action tokens sit at the same columns.

`action_logits(prefix, action_ids)` gives the action-token logits of a whole (prefix, actions) batch
in one pass: what SFT trains and what Q-SFT reuses. `sample` draws K actions per observation with
one prefix forward, the KV cache expanded K times and 7 decode steps (module `sample` docstring),
a Llama LM through policies/llama_stack.py (`policy.fused`, default true; same numbers).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from configs.errors import UserError
from configs.hub import local_snapshot
from policies.action_tokens import NUM_ACTION_TOKENS, ActionTokenizer
from policies.base import ACTION_DIM, POLICIES, Policy
from policies.config import LMConfig, VLAModelConfig
from policies.kv_cache import extend, positions, prefill
from policies.learned import MODELS, LearnedPolicy, load_policy_model, resolve_device
from policies.llama_stack import cached_stack
from policies.text import ByteTokenizer, TextTokenizer, load_text_tokenizer, make_text_tokenizer, pad_ids
from policies.vision import VisionEncoder

LM_CONFIG_FILE, TOKENIZER_FILE = "lm_config.json", "text_tokenizer.json"


@dataclass
class Prefix:
    """The embedded prefix of a batch: embeds (B, P, hidden), mask (B, P) bool (False = padding)."""

    embeds: torch.Tensor
    mask: torch.Tensor


def build_lm(cfg: LMConfig, vocab_size: int) -> nn.Module:
    """A causal LM: pretrained from `cfg.pretrained` (hub id or directory), else a random Llama."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if cfg.pretrained:
        source = local_snapshot(cfg.pretrained, "language model", "policy.model.lm.pretrained")  # fails fast offline
        try:
            return AutoModelForCausalLM.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise UserError(f"Cannot load the language model {cfg.pretrained!r}: {err}") from None
    inter = cfg.intermediate_size or 64 * math.ceil(8 * cfg.hidden_size / 3 / 64)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=inter,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads or cfg.heads,
        max_position_embeddings=cfg.max_positions, attention_dropout=cfg.attention_dropout,
        tie_word_embeddings=False, bos_token_id=ByteTokenizer.bos_id, eos_token_id=ByteTokenizer.eos_id,
        pad_token_id=ByteTokenizer.pad_id,
    )  # fmt: skip
    return LlamaForCausalLM(config)


class VLAModel(nn.Module):
    """Vision encoder + projector + causal LM over [bos, image, prompt, action tokens]."""

    chunk = 1
    #: instructions padded to this many tokens; None: to the batch's longest (policies/text.py `fix_text_length`)
    text_length: int | None = None

    def __init__(self, cfg: VLAModelConfig, text: TextTokenizer, lm: nn.Module, image_size: int) -> None:
        super().__init__()
        self.cfg, self.text, self.max_text_tokens = cfg, text, int(cfg.max_text_tokens)
        self.vision = VisionEncoder(cfg.vision, cfg.vision.image_size or image_size)
        self.image_size = int(image_size)  # size of the training images; observations are resized to it
        self.lm = lm
        hidden = int(lm.config.hidden_size)
        self.projector = nn.Sequential(nn.Linear(self.vision.dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        # bytes: the action ids follow the 259 text ids; hf: they are the tokenizer's last 256 ids
        vocab = text.vocab_size + NUM_ACTION_TOKENS if isinstance(text, ByteTokenizer) else text.vocab_size
        self.tokens = ActionTokenizer(vocab)
        rows = lm.get_input_embeddings().num_embeddings
        if rows < vocab:
            raise UserError(f"The language model has {rows} token embeddings, fewer than the {vocab}-id vocabulary.")
        self._prompts: dict[str, list[int]] = {}

    # --- construction ----------------------------------------------------------------------------

    @classmethod
    def create(cls, cfg: VLAModelConfig, image_size: int) -> VLAModel:
        """For training: a pretrained LM and its tokenizer if `cfg.lm.pretrained`, else a random Llama + bytes."""
        if cfg.lm.pretrained:
            text = make_text_tokenizer("hf", cfg.lm.pretrained)
            return cls(cfg, text, build_lm(cfg.lm, text.vocab_size), image_size)
        text = ByteTokenizer()
        return cls(cfg, text, build_lm(cfg.lm, text.vocab_size + NUM_ACTION_TOKENS), image_size)

    @classmethod
    def rebuild(cls, cfg: Any, image_size: int, path: Path) -> VLAModel:
        """The architecture of a checkpoint (no download; weights are loaded by the caller)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        text = load_text_tokenizer(json.loads((path / TOKENIZER_FILE).read_text()), path)
        lm_config = json.loads((path / LM_CONFIG_FILE).read_text())
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(lm_config.pop("model_type"), **lm_config))
        return cls(_vision_without_download(cfg), text, lm, image_size)

    def files(self) -> dict[str, str]:
        """Text files a checkpoint needs to rebuild this model: tokenizer and LM config."""
        return {
            TOKENIZER_FILE: json.dumps(self.text.identity()),
            LM_CONFIG_FILE: self.lm.config.to_json_string(),
            **self.text.files(),
        }

    # --- the sequence ----------------------------------------------------------------------------

    def prompt_ids(self, instructions: Sequence[str]) -> list[list[int]]:
        """Token ids of each instruction's prompt (cached per instruction), cut to max_text_tokens."""
        for text in set(instructions) - set(self._prompts):
            prompt = self.cfg.prompt.format(instruction=text.lower())
            self._prompts[text] = self.text.encode([prompt])[0][: self.max_text_tokens]
        return [self._prompts[t] for t in instructions]

    def embed_prefix(self, images: torch.Tensor, instructions: Sequence[str]) -> Prefix:
        """uint8 images (B, H, W, 3) + B instructions -> Prefix over [bos, image tokens, padded prompt]."""
        embed = self.lm.get_input_embeddings()
        image = self.projector(self.vision(images))  # (B, T_img, hidden)
        B, device = image.shape[0], image.device
        ids, mask = pad_ids(self.prompt_ids(instructions), self.text.pad_id, length=self.text_length)
        ids, mask = ids.to(device), mask.to(device)
        parts, masks = (
            [image, embed(ids).to(image.dtype)],
            [torch.ones(image.shape[:2], dtype=torch.bool, device=device), mask],
        )
        if self.text.bos_id is not None:
            bos = torch.full((B, 1), self.text.bos_id, dtype=torch.long, device=device)
            parts.insert(0, embed(bos).to(image.dtype))
            masks.insert(0, torch.ones((B, 1), dtype=torch.bool, device=device))
        return Prefix(torch.cat(parts, dim=1), torch.cat(masks, dim=1))

    def action_logits(self, prefix: Prefix, action_ids: torch.Tensor) -> torch.Tensor:
        """Logits over the 256 action ids given the prefix and n action tokens: (B, n) -> (B, n + 1, 256).

        Row j is the distribution of action token j given the prefix and tokens < j (row n: the
        token after the given ones). Index i of the last axis is id `tokens.first_id + i`.
        """
        B, n = action_ids.shape
        embeds = torch.cat([prefix.embeds, self.lm.get_input_embeddings()(action_ids).to(prefix.embeds.dtype)], 1)
        mask = torch.cat([prefix.mask, torch.ones((B, n), dtype=torch.bool, device=action_ids.device)], 1)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=positions(mask),
                      use_cache=False, logits_to_keep=n + 1)  # fmt: skip
        return self.tokens.action_logits(out.logits.float())

    # --- training --------------------------------------------------------------------------------

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """Cross-entropy of the 7 action tokens of `batch["action"]` (B, 7) normalised."""
        target = self.tokens.encode(batch["action"])  # (B, 7) ids
        prefix = self.embed_prefix(batch["image"], batch["instruction"])
        logits = self.action_logits(prefix, target[:, :-1])  # (B, 7, 256): token j given tokens < j
        index = self.tokens.id_to_index(target)
        loss = F.cross_entropy(logits.reshape(-1, NUM_ACTION_TOKENS), index.reshape(-1))
        with torch.no_grad():
            greedy = logits.argmax(-1)
            l1 = (self.tokens.decode(self.tokens.index_to_id(greedy)) - batch["action"].float()).abs().mean()
            metrics = {
                "loss": loss.detach(),
                "token_accuracy": (greedy == index).float().mean(),
                "teacher_forced_l1": l1,
            }
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Loss metrics plus the L1 error of the greedy action (normalised units)."""
        _, metrics = self.loss(batch)
        ids, _ = self.sample(batch["image"], batch["instruction"], 1, temperature=0.0, generator=generator)
        metrics["greedy_l1"] = (self.tokens.decode(ids[:, 0]) - batch["action"].float()).abs().mean()
        return metrics

    # --- sampling --------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self, images: torch.Tensor, instructions: Sequence[str], k: int, temperature: float = 1.0, top_k: int = 0,
        generator: torch.Generator | None = None, fused: bool = True, uniform: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """K actions per observation: ids (N, K, 7) and their log-probabilities (N, K) under the model (T = 1).

        1. one forward over the N prefixes, with the KV cache;
        2. the cache and the last logits repeated K times per row (rows n*K .. n*K + K-1 = obs n);
        3. 7 steps: logits restricted to the 256 action ids -> a sample at `temperature` (`choose`,
           with the row's number of `uniform` (N * K, 7), else drawn from `generator`; 0 = greedy:
           all K identical, so it decodes once and repeats) -> one-token forward.

        `fused`: a Llama LM decodes through policies/llama_stack.py (preallocated cache, only the
        action ids' logits), else and for other LMs through transformers' forward; same numbers.
        """
        if temperature <= 0 and k > 1:
            ids, logp = self.sample(images, instructions, 1, 0.0, top_k, generator, fused)
            return ids.expand(-1, k, -1).clone(), logp.expand(-1, k).clone()
        uniform = token_uniforms(uniform, images.shape[0] * k, temperature, generator, images.device)
        prefix = self.embed_prefix(images, instructions)
        stack = cached_stack(self, [self.lm], self.tokens.columns) if fused else None
        if stack is not None:
            state, scores = stack.prefill(prefix.embeds[None], prefix.mask, k, extra=ACTION_DIM - 1)
            scores, advance = scores[0], lambda ids: stack.extend(state, ids[:, None])[0, :, -1]
        else:
            scores, advance = self._hf_decoding(prefix, k)
        N = prefix.mask.shape[0]
        chosen, logp = [], torch.zeros(N * k, device=prefix.mask.device)
        for step in range(ACTION_DIM):  # scores: (N * K, 256) float logits of the action ids
            index = choose(scores, temperature, top_k, uniform=None if uniform is None else uniform[:, step])
            logp += scores.log_softmax(-1).gather(1, index[:, None])[:, 0]
            chosen.append(index)
            if step < ACTION_DIM - 1:
                scores = advance(self.tokens.index_to_id(index))
        ids = self.tokens.index_to_id(torch.stack(chosen, dim=1))
        return ids.view(N, k, ACTION_DIM), logp.view(N, k)  # (N * K, ...) -> (N, K, ...)

    def _hf_decoding(self, prefix: Prefix, k: int) -> tuple[torch.Tensor, Any]:
        """transformers' cached forward: the first action logits (N * k, 256) and a function ids (M,) -> the next."""
        logits, dec = prefill(self.lm, prefix.mask, k, inputs_embeds=prefix.embeds)
        step = lambda ids: self.tokens.action_logits(extend(self.lm, dec, ids[:, None])[:, -1].float())  # noqa: E731
        return self.tokens.action_logits(logits.float()).repeat_interleave(k, dim=0), step


def choose(
    scores: torch.Tensor, temperature: float, top_k: int = 0, generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Indices (M,) drawn from softmax(scores / temperature) over (M, C) scores; temperature 0 = argmax.

    Inverse-CDF sampling: row m takes the first index whose cumulative probability reaches
    (1 - uniform[m]) of the row's total, with `uniform` (M,) in [0, 1) (drawn from `generator` when
    not given). One number per row and action token: a caller that draws each row's numbers from
    that row's own generator (policies.learned.LearnedPolicy.draw) gets samples that do not depend
    on the other rows. A zero-probability index (masked by `top_k`) is never taken.
    """
    if temperature <= 0:
        return scores.argmax(-1)
    scores = scores.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if uniform is None:
        uniform = torch.rand(scores.shape[0], generator=generator, device=scores.device)
    cdf = scores.softmax(-1).cumsum(-1)
    target = (1.0 - uniform.to(cdf.dtype)) * cdf[:, -1]  # in (0, total]: never before the first mass
    return torch.searchsorted(cdf, target[:, None])[:, 0].clamp(max=scores.shape[-1] - 1)


def token_uniforms(
    uniform: torch.Tensor | None, rows: int, temperature: float, generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor | None:  # fmt: skip
    """The (rows, 7) numbers `choose` samples the 7 action tokens with (None when greedy)."""
    if temperature <= 0:
        return None
    if uniform is None:
        return torch.rand((rows, ACTION_DIM), generator=generator, device=device)
    if uniform.shape != (rows, ACTION_DIM):
        raise ValueError(f"uniform numbers of shape {tuple(uniform.shape)}, expected {(rows, ACTION_DIM)}")
    return uniform


def _vision_without_download(cfg: Any) -> Any:
    """A copy of the model config whose vision encoder is not fetched from the hub (weights follow)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.vision.pretrained = False
    return cfg


MODELS.register("vla")(VLAModel)


class VLAPolicy(LearnedPolicy):
    """The trained VLA behind the Policy contract: (K, 1, 7) canonical actions per observation."""

    def __init__(self, loaded: Any, cfg: Any, device: torch.device) -> None:
        super().__init__(loaded, cfg, device)
        self.temperature, self.top_k, self.fused = float(cfg.temperature), int(cfg.top_k), bool(cfg.fused)

    def _sample(self, images: torch.Tensor, instructions: list[str], k: int, slots: list[int | None]) -> torch.Tensor:
        uniform = self.draw(slots, (k, ACTION_DIM)) if self.temperature > 0 else None
        ids, _ = self.model.sample(images, instructions, k, self.temperature, self.top_k, fused=self.fused,
                                   uniform=uniform)  # fmt: skip
        return self.model.tokens.decode(ids)[:, :, None]  # (N, K, 7) -> (N, K, chunk=1, 7)


@POLICIES.register("vla")
def _vla(cfg: Any) -> Policy:
    if not cfg.get("checkpoint"):
        raise UserError("policy=vla needs policy.checkpoint=<dir>; train one with `python train_policy.py policy=vla`.")
    device = resolve_device(cfg.device)
    return VLAPolicy(load_policy_model(cfg.checkpoint, "vla", device), cfg, device)
