"""Instruction tokenizers of the project's policies.

Two kinds, behind one small interface (`encode`, `vocab_size`, `bos_id`, `pad_id`, `identity`):

- `bytes` (default): UTF-8 bytes, ids 3..258 (0 = pad, 1 = bos, 2 = eos); 259 text ids. Built in
  code, so it needs no vocabulary file and no network, never meets an unknown word, and a
  checkpoint only records `{"kind": "bytes"}`. The cost is longer sequences (one token per
  character), which is cheap at the sizes this project trains.
- `hf`: a transformers tokenizer loaded from a hub id or a local directory (the one of a
  pretrained language model, `policy.model.lm.pretrained`). Checkpoints store its files, so a
  trained policy loads offline.

The VLA places OpenVLA's 256 action tokens on the last 256 ids of the vocabulary (policies/
action_tokens.py): after the 259 byte ids for `bytes` (a 515-id vocabulary; no overlap), on the
tokenizer's last 256 ids for `hf`, exactly as OpenVLA does with Llama-2.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from configs.errors import UserError
from configs.hub import local_snapshot


class ByteTokenizer:
    """UTF-8 bytes as tokens; see the module docstring."""

    pad_id, bos_id, eos_id = 0, 1, 2
    _OFFSET = 3
    vocab_size = _OFFSET + 256

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """N strings -> N lists of ids (no special tokens)."""
        return [[b + self._OFFSET for b in text.encode("utf-8")] for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - self._OFFSET for i in ids if i >= self._OFFSET).decode("utf-8", errors="replace")

    def identity(self) -> dict[str, Any]:
        return {"kind": "bytes", "vocab_size": self.vocab_size}

    def files(self) -> dict[str, str]:
        """Text files a checkpoint stores to rebuild the tokenizer (none: it is built in code)."""
        return {}


class HFTokenizer:
    """A transformers tokenizer (hub id or local directory); special tokens are added by the model."""

    def __init__(self, source: str) -> None:
        from transformers import AutoTokenizer

        local = local_snapshot(source, "tokenizer", "policy.model.lm.pretrained")  # fails fast when offline
        try:
            self.tok = AutoTokenizer.from_pretrained(local)
        except (OSError, ValueError) as err:
            raise UserError(f"Cannot load the tokenizer {source!r} (a hub id or a local directory): {err}") from None
        self.source = source
        # OpenVLA counts the base vocabulary (Llama-2: 32000), not added tokens such as <PAD>.
        self.vocab_size = int(self.tok.vocab_size)
        self.bos_id = self.tok.bos_token_id
        pad = self.tok.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.tok.eos_token_id or 0))

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tok(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    def identity(self) -> dict[str, Any]:
        return {"kind": "hf", "source": self.source, "vocab_size": self.vocab_size}

    def files(self) -> dict[str, str]:
        """The tokenizer's text files (tokenizer.json, tokenizer_config.json, ...) by name."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            self.tok.save_pretrained(tmp)
            return {p.name: p.read_text() for p in Path(tmp).iterdir() if p.is_file()}


TextTokenizer = ByteTokenizer | HFTokenizer


def make_text_tokenizer(kind: str, source: str | None = None) -> TextTokenizer:
    """`bytes`, or `hf` loaded from `source` (a hub id or a directory holding the tokenizer files)."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "hf":
        if not source:
            raise UserError("An hf tokenizer needs a source: a hub id or a local directory.")
        return HFTokenizer(source)
    raise UserError(f"Unknown text tokenizer {kind!r}; known: bytes, hf.")


def load_text_tokenizer(identity: dict[str, Any], checkpoint_dir: Path) -> TextTokenizer:
    """The tokenizer a checkpoint was trained with (`hf` tokenizers from the files saved in it)."""
    if identity.get("kind") == "hf":
        tok = HFTokenizer(str(checkpoint_dir))
    else:
        tok = make_text_tokenizer(identity.get("kind", "?"))
    if tok.vocab_size != identity.get("vocab_size"):
        raise UserError(
            f"{checkpoint_dir}: the text tokenizer has {tok.vocab_size} ids but the checkpoint was trained "
            f"with {identity.get('vocab_size')}."
        )
    return tok


def pad_ids(
    sequences: Sequence[Sequence[int]], pad_id: int, max_len: int | None = None, side: str = "left",
    length: int | None = None,
) -> tuple[Any, Any]:  # fmt: skip
    """N id lists -> ids (N, L) int64 and mask (N, L) bool (False = padding); lists are cut to `max_len`.

    L is the longest list's length, or `length` if that is larger: a fixed L keeps a row's sequence
    length, hence its floating-point rounding, independent of the other rows' instructions.
    Left padding puts every sequence's end at the same column, so tokens appended after it
    (actions, decode steps) line up across the batch; right padding keeps token j at column j.
    """
    import torch

    seqs = [list(s)[:max_len] if max_len else list(s) for s in sequences]
    length = max(max((len(s) for s in seqs), default=0), length or 0)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.bool)
    for i, s in enumerate(seqs):
        cols = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = True
    return ids, mask


def fix_text_length(model: Any, fixed: bool) -> None:
    """Pad the instructions of every module of `model` that reads text (those with `text_length` and
    `max_text_tokens` attributes: the flow policy, the VLA, Q-SFT's Hugging Face VLM backbone) to
    their `max_text_tokens` (fixed) or to the batch's longest.

    With fixed batch rows (`Policy.fix_batch_rows`) this fixes the rest of a row's shape: otherwise a
    longer instruction elsewhere in the batch lengthens every row's sequence and changes its rounding.
    """
    for module in model.modules():
        if hasattr(module, "text_length"):
            module.text_length = int(module.max_text_tokens) if fixed else None
