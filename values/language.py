"""Instruction encoders behind a registry, and the embedding cache.

V-GPS conditions its critic on a 512-d MUSE embedding (a TensorFlow-Hub model). robosteer offers:

- `hash`: a deterministic offline encoder: every lower-cased word and character trigram maps to a
  fixed pseudo-random Gaussian vector (seeded by its CRC-32), summed and L2-normalised. Instructions
  that share words get similar embeddings. No download; the embedded default and the tests use it.
- `hf`: a transformers sentence encoder from a hub id or a local directory, mean-pooled over tokens
  and L2-normalised (the sentence-transformers recipe). Documented default:
  `sentence-transformers/all-MiniLM-L6-v2` (384-d). Every text is padded to one length (128 tokens,
  or the model's limit), so that its embedding does not depend on its batch; longer texts are an
  error rather than silently truncated.

Embeddings are computed once per distinct instruction (`EmbeddingCache`), never per step. Every
checkpoint records the encoder's `identity()`, and loading a critic with another encoder is an error.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from configs.errors import UserError
from configs.hub import local_snapshot
from configs.registry import Registry

LANGUAGE_ENCODERS: Registry[type] = Registry("language encoder")

# Texts for the `hf` encoder are padded to this many tokens (or the model's limit, if lower).
MAX_TOKENS = 128


class LanguageEncoder:
    """Maps instructions to fixed-size float32 embeddings."""

    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) strings -> (N, dim) float32."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What a checkpoint records to re-create exactly this encoder."""
        raise NotImplementedError


@LANGUAGE_ENCODERS.register("hash")
class HashEncoder(LanguageEncoder):
    def __init__(self, dim: int = 512, **_: Any) -> None:
        self.dim = dim
        self._vectors: dict[str, np.ndarray] = {}

    def _vector(self, feature: str) -> np.ndarray:
        if feature not in self._vectors:
            rng = np.random.default_rng(zlib.crc32(feature.encode()))
            self._vectors[feature] = rng.standard_normal(self.dim).astype(np.float32)
        return self._vectors[feature]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            words = re.findall(r"[a-z0-9]+", text.lower())
            padded = f" {' '.join(words)} "
            features = [f"w:{w}" for w in words] + [f"c:{padded[j : j + 3]}" for j in range(len(padded) - 2)]
            for feature in features:
                out[i] += self._vector(feature)
            norm = np.linalg.norm(out[i])
            if norm > 0:
                out[i] /= norm
        return out

    def identity(self) -> dict[str, Any]:
        return {"name": "hash", "dim": self.dim}


@LANGUAGE_ENCODERS.register("hf")
class HFSentenceEncoder(LanguageEncoder):
    def __init__(self, model: str, device: str = "cpu", batch_size: int = 64, **_: Any) -> None:
        from transformers import AutoModel, AutoTokenizer

        source = local_snapshot(model, "sentence encoder", "value.language.model")  # fails fast when offline
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = AutoModel.from_pretrained(source).to(device).eval()
        except OSError as err:
            raise UserError(
                f"Cannot load the sentence encoder {model!r}: {err}\nGive a local directory with "
                "value.language.model=/path (config.json, weights, tokenizer), or use value.language.name=hash."
            ) from None
        self.name, self.device, self.batch_size = model, device, batch_size
        self.dim = int(self.model.config.hidden_size)
        limits = [MAX_TOKENS, self.tokenizer.model_max_length, getattr(self.model.config, "max_position_embeddings", 0)]
        self.length = min(n for n in limits if n and n > 0)  # the padded length of every text

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(N, dim) L2-normalised mean-pooled embeddings. Every text is padded to the same `length`, so
        that its embedding does not depend on the other texts of its batch (the training table and
        steering's one-at-a-time lookups agree); a text longer than that is an error, not truncated."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            encoded = self.tokenizer(batch, padding="max_length", max_length=self.length)  # longer ones stay longer
            for text, ids in zip(batch, encoded["input_ids"], strict=True):
                if len(ids) > self.length:
                    raise UserError(
                        f"The instruction {text!r} has {len(ids)} tokens, more than the {self.length} that the "
                        f"sentence encoder {self.name!r} embeds; shorten it or use an encoder with longer inputs."
                    )
            tokens = {k: torch.tensor(v, device=self.device) for k, v in encoded.items()}
            hidden = self.model(**tokens).last_hidden_state  # (n, length, dim)
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def identity(self) -> dict[str, Any]:
        return {"name": "hf", "model": self.name, "dim": self.dim}


def make_language_encoder(cfg: Any, device: str = "cpu") -> LanguageEncoder:
    """From a `LanguageConfig` (or a recorded identity dict)."""
    cls = LANGUAGE_ENCODERS.get(cfg["name"])
    return cls(dim=cfg.get("dim", 512), model=cfg.get("model", ""), device=device)


class EmbeddingCache:
    """Embeddings of instructions, computed once: a (V, dim) table for ids, a dict for strings."""

    def __init__(self, encoder: LanguageEncoder, device: torch.device | str = "cpu") -> None:
        self.encoder, self.device = encoder, torch.device(device)
        self._by_text: dict[str, torch.Tensor] = {}

    def table(self, instructions: Sequence[str]) -> torch.Tensor:
        """(V, dim) embeddings of a vocabulary, row i for instructions[i] (use with instruction_id)."""
        missing = sorted({t for t in instructions if t not in self._by_text})
        if missing:
            for text, vector in zip(missing, self.encoder.embed(missing), strict=True):
                self._by_text[text] = torch.from_numpy(vector).to(self.device)
        if not instructions:
            return torch.zeros(0, self.encoder.dim, device=self.device)
        return torch.stack([self._by_text[t] for t in instructions])

    def get(self, text: str) -> torch.Tensor:
        """(dim,) embedding of one instruction, computed on first use."""
        if text not in self._by_text:
            self._by_text[text] = torch.from_numpy(self.encoder.embed([text])[0]).to(self.device)
        return self._by_text[text]
