"""Backbones of Q-SFT: the project's tokenized VLA and Hugging Face VLMs behind one small interface.

Q-SFT asks three things of a model (pi_phi, p_theta and the target are three copies of one):

    prefix(images, instructions) -> Prefix                    the observation part of the sequence
    action_logits(prefix, ids (B, n)) -> (B, n + 1, 257)       one forward over prefix + n action tokens
    prefill(prefix, k) -> Decoding; extend(dec, ids (M, n)) -> (M, n, 257)
                                                              KV-cached decoding, K rows per prefix

Logits are kept for 257 ids only: column 0 is the dummy token (id `tokens.first_id - 1`, used by
Q-SFT's dummy-action labels), columns 1..256 the 256 action ids (policies/action_tokens.py), so
every softmax of Q-SFT runs over the action vocabulary (|A| = 256) or it plus the dummy. Row j of
`action_logits` is the distribution of action token j given the prefix and tokens < j; row j of
`extend` is the distribution of the token after ids[:, j].

Both backbones pad prompts on the left and number positions by the cumulative attention mask, so
every row's action tokens sit at the same columns and padding changes nothing (policies/vla.py) up
to rounding. While batch rows are fixed (evaluation), both pad every prompt to a fixed length, so
that the rounding is the same too (policies/text.py `fix_text_length`).

`hf`: any `AutoModelForImageTextToText` with its `AutoProcessor`, loaded by hub id or directory;
the action tokens are the tokenizer's last 256 base-vocabulary ids, as OpenVLA does with Llama-2.
The prompt template carries the family's image placeholder. Tested on Idefics3 (SmolVLM) with a
tiny random config; families whose positions are not a plain 1-D cumulative count (Qwen2-VL's
multimodal RoPE) compute their own positions here (`position_ids` left out), untested.
`token_type_ids` (PaliGemma's bidirectional prefix) is dropped: the whole sequence is causal, as
in OpenVLA.
"""

from __future__ import annotations

import logging
import tempfile
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from configs.errors import UserError
from configs.hub import local_snapshot
from policies.action_tokens import ActionTokenizer
from policies.kv_cache import Decoding, extend, positions, prefill
from policies.qsft.config import HFVLMConfig, QSFTModelConfig

log = logging.getLogger(__name__)
HF_CONFIG_FILE = "config.json"
# model types whose processor wants one list of images per text
_NESTED_IMAGES = ("idefics2", "idefics3", "smolvlm")
DUMMY_COLUMNS = 1  # columns before the action ids in the logits of a Backbone
# model types that compute their own (multimodal RoPE) positions from the attention mask
_OWN_POSITIONS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@dataclass
class Prefix:
    """Model inputs of B prefixes (inputs_embeds, or input_ids + pixel tensors) and their mask (B, P) bool."""

    inputs: dict[str, torch.Tensor]
    mask: torch.Tensor


class Backbone(nn.Module):
    """A vision-language model over [prefix, action tokens]; subclasses build the prefix and join the actions."""

    tokens: ActionTokenizer
    image_size: int  # side of the training images; observations are resized to it

    @abstractmethod
    def prefix(self, images: torch.Tensor, instructions: Sequence[str]) -> Prefix:
        """uint8 images (B, H, W, 3) and B instructions -> the prefix of each sequence."""

    @abstractmethod
    def _joined(self, prefix: Prefix, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model inputs (without the mask) of the prefix followed by action ids (B, n)."""

    @abstractmethod
    def _model(self) -> nn.Module:
        """The module called with transformers' causal-LM signature (attention_mask, position_ids, cache, ...)."""

    @abstractmethod
    def files(self) -> dict[str, str]:
        """Text files a checkpoint needs to rebuild this backbone."""

    def stack_lm(self) -> nn.Module | None:
        """The causal LM reading `prefix().inputs["inputs_embeds"]`, for policies/llama_stack.py; None: none."""
        return None

    def gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass (transformers' activation checkpointing, non-reentrant)."""
        model, kwargs = self._model(), {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (..., V) -> float (..., 257): the dummy id, then the action ids ascending."""
        if logits.shape[-1] < self.tokens.vocab_size:
            raise ValueError(f"logits over {logits.shape[-1]} ids, but the vocabulary has {self.tokens.vocab_size}")
        # a copy, not a view of the full logits (FSDP warns about a forward method returning a view)
        return logits[..., self.tokens.first_id - DUMMY_COLUMNS : self.tokens.vocab_size].float().clone()

    def _own_positions(self) -> bool:
        return getattr(self._model().config, "model_type", "") in _OWN_POSITIONS

    def _call(self, mask: torch.Tensor, position: torch.Tensor, **inputs: Any) -> Any:
        own = self._own_positions()
        return self._model()(attention_mask=mask.long(), position_ids=None if own else position, **inputs)

    def action_logits(self, prefix: Prefix, ids: torch.Tensor) -> torch.Tensor:
        """Logits (dummy + action ids) of the prefix + n given tokens: (B, n) -> (B, n + 1, 257), one forward."""
        n = ids.shape[1]
        mask = F.pad(prefix.mask, (0, n), value=True)
        out = self._call(mask, positions(mask), **self._joined(prefix, ids), use_cache=False, logits_to_keep=n + 1)
        return self._logits(out.logits)

    def prefill(self, prefix: Prefix, k: int = 1) -> Decoding:
        """One cached forward over N prefixes, then the cache repeated K times (row n * K + j = copy j of prefix n)."""
        logits, dec = prefill(self._model(), prefix.mask, k, self._own_positions(), **prefix.inputs)
        dec.logits = self._logits(logits).repeat_interleave(k, dim=0)
        return dec

    def extend(self, dec: Decoding, ids: torch.Tensor) -> torch.Tensor:
        """Append action ids (M, n) to the decoding -> (M, n, 257): row j = the token after ids[:, j]."""
        logits = self._logits(extend(self._model(), dec, ids, self._own_positions()))
        dec.logits = logits[:, -1]
        return logits


class VLABackbone(Backbone):
    """The project's tokenized VLA (policies/vla.py): timm encoder -> projector -> causal LM."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.tokens, self.image_size = net.tokens, int(net.image_size)

    def prefix(self, images: torch.Tensor, instructions: Sequence[str]) -> Prefix:
        p = self.net.embed_prefix(images, instructions)
        return Prefix({"inputs_embeds": p.embeds}, p.mask)

    def _joined(self, prefix: Prefix, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        embeds = prefix.inputs["inputs_embeds"]
        actions = self.net.lm.get_input_embeddings()(ids).to(embeds.dtype)
        return {"inputs_embeds": torch.cat([embeds, actions], dim=1)}

    def _model(self) -> nn.Module:
        return self.net.lm

    def stack_lm(self) -> nn.Module:
        return self.net.lm

    def files(self) -> dict[str, str]:
        return self.net.files()


class HFVLMBackbone(Backbone):
    """A Hugging Face image-text-to-text model and its processor (module docstring)."""

    #: prompts left-padded to the empty-instruction prompt + this many tokens; None: to the batch's
    #: longest, as the processor pads (policies/text.py `fix_text_length`)
    text_length: int | None = None

    def __init__(
        self, model: nn.Module, processor: Any, prompt: str, image_size: int, max_text_tokens: int = 64
    ) -> None:
        super().__init__()
        self.model, self.processor, self.prompt = model, processor, prompt
        self.image_size, self.max_text_tokens = int(image_size), int(max_text_tokens)
        self._template_tokens: dict[tuple[int, ...], int] = {}  # by image shape
        tok = processor.tokenizer
        tok.padding_side = "left"  # every row's action tokens at the same columns
        self.tokens = ActionTokenizer(int(tok.vocab_size))
        rows = model.get_input_embeddings().num_embeddings
        if rows < tok.vocab_size:
            raise UserError(f"The VLM has {rows} token embeddings, fewer than its {tok.vocab_size}-id vocabulary.")
        self._nested = model.config.model_type in _NESTED_IMAGES

    @classmethod
    def load(cls, cfg: HFVLMConfig, image_size: int) -> HFVLMBackbone:
        """From the hub or a directory (training)."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not cfg.source:
            raise UserError(
                "policy.model.backbone=hf needs policy.model.hf.source=<hub id or directory> (or vlm=<name>)."
            )
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg.dtype)
        if dtype is None:
            raise UserError(f"policy.model.hf.dtype={cfg.dtype!r}; use float32 or bfloat16.")
        source = local_snapshot(cfg.source, "VLM", "policy.model.hf.source")  # fails fast when offline
        try:
            processor = AutoProcessor.from_pretrained(source)
            model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype)
        except (OSError, ValueError) as err:
            raise UserError(f"Cannot load the VLM {cfg.source!r} (hub id or directory): {err}") from None
        return cls(model, processor, cfg.prompt, image_size, cfg.max_text_tokens)

    @classmethod
    def rebuild(cls, cfg: HFVLMConfig, image_size: int, path: Path) -> HFVLMBackbone:
        """The architecture and processor of a checkpoint directory (no download; weights follow)."""
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        config = AutoConfig.from_pretrained(path)
        model = AutoModelForImageTextToText.from_config(config)
        limit = cfg.get("max_text_tokens", HFVLMConfig.max_text_tokens)  # absent from older checkpoints
        return cls(model, AutoProcessor.from_pretrained(path), cfg.prompt, image_size, limit)

    def files(self) -> dict[str, str]:
        """The processor's files and the model config, so that `rebuild` needs nothing else."""
        out = {}
        with tempfile.TemporaryDirectory() as tmp:
            self.processor.save_pretrained(tmp)
            for path in Path(tmp).iterdir():
                try:
                    out[path.name] = path.read_text()
                except UnicodeDecodeError:  # e.g. a sentencepiece model beside tokenizer.json
                    log.warning("checkpoint: skipping the binary processor file %s", path.name)
        return {**out, HF_CONFIG_FILE: self.model.config.to_json_string()}

    def prefix(self, images: torch.Tensor, instructions: Sequence[str]) -> Prefix:
        enc = self._encode(images, [self.prompt.format(instruction=t.lower()) for t in instructions])
        if self.text_length is not None:
            enc = self._pad_left(enc, self._template_length(images[:1]) + self.text_length, instructions)
        param = next(self.model.parameters())
        inputs = {
            k: v.to(param.device, param.dtype if v.is_floating_point() else v.dtype)
            for k, v in enc.items()
            if isinstance(v, torch.Tensor)
        }
        mask = inputs.pop("attention_mask").bool()
        return Prefix(inputs, mask)

    def _encode(self, images: torch.Tensor, texts: list[str]) -> dict[str, Any]:
        """The processor's tensors for N images and prompts, padded to the longest prompt."""
        pictures = list(images.cpu().numpy())
        if self._nested:
            pictures = [[p] for p in pictures]
        enc = dict(self.processor(text=texts, images=pictures, padding=True, return_tensors="pt"))
        enc.pop("token_type_ids", None)
        return enc

    def _template_length(self, image: torch.Tensor) -> int:
        """Tokens of the prompt of an empty instruction, its image tokens included (once per image shape)."""
        key = tuple(image.shape[1:])
        if key not in self._template_tokens:
            enc = self._encode(image, [self.prompt.format(instruction="")])
            self._template_tokens[key] = int(enc["attention_mask"].sum())
        return self._template_tokens[key]

    def _pad_left(self, enc: dict[str, Any], length: int, instructions: Sequence[str]) -> dict[str, Any]:
        """input_ids and attention_mask left-padded to `length` columns, as the processor pads."""
        ids, mask = enc["input_ids"], enc["attention_mask"]
        extra = length - ids.shape[1]
        if extra < 0:
            longest = max(instructions, key=len)
            raise UserError(
                f"The instruction {longest!r} takes more than policy.model.hf.max_text_tokens="
                f"{self.max_text_tokens} tokens of the VLM's prompt; raise max_text_tokens."
            )
        pad = self.processor.tokenizer.pad_token_id or 0
        return {
            **enc,
            "input_ids": F.pad(ids, (extra, 0), value=pad),
            "attention_mask": F.pad(mask, (extra, 0), value=0),
        }

    def _joined(self, prefix: Prefix, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**prefix.inputs, "input_ids": torch.cat([prefix.inputs["input_ids"], ids], dim=1)}

    def _model(self) -> nn.Module:
        return self.model


def create_backbone(cfg: QSFTModelConfig, image_size: int) -> Backbone:
    """For training: a Hugging Face VLM, a train_policy.py VLA checkpoint (`init`), or a random VLA."""
    if cfg.backbone == "hf":
        return HFVLMBackbone.load(cfg.hf, image_size)
    if cfg.backbone != "vla":
        raise UserError(f"policy.model.backbone={cfg.backbone!r}; use vla or hf.")
    if cfg.init:
        from policies.learned import load_policy_model

        return VLABackbone(load_policy_model(cfg.init, "vla").model.train())
    from policies.vla import VLAModel

    return VLABackbone(VLAModel.create(cfg.vla, image_size))


def rebuild_backbone(cfg: Any, image_size: int, path: Path) -> Backbone:
    """The backbone architecture of a Q-SFT checkpoint (no download; weights are loaded by the caller)."""
    if cfg.backbone == "hf":
        return HFVLMBackbone.rebuild(cfg.hf, image_size, path)
    from policies.vla import VLAModel

    return VLABackbone(VLAModel.rebuild(cfg.vla, image_size, path))
