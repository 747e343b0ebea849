"""The `hf` sentence encoder (values/language.py) on a tiny random BERT saved to a directory and loaded
by path, as users load a downloaded one; the embedding cache over it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from configs.errors import UserError
from values.language import EmbeddingCache, make_language_encoder

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
WORDS = [*SPECIAL, "pick", "up", "the", "red", "green", "cube", "put", "it", "on", "open", "drawer", "a"]


def tiny_bert(root: Path) -> Path:
    """A random 2-layer BERT (hidden 32, 64 positions) with a word-level tokenizer built in code."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]")  # fmt: skip
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    BertModel(config).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def test_hf_encoder_mean_pools_and_embeds_a_text_alike_in_any_batch(tmp_path: Path) -> None:
    from transformers import AutoModel

    path = tiny_bert(tmp_path / "bert")
    enc = make_language_encoder({"name": "hf", "model": str(path)})
    assert enc.dim == 32 and enc.length == 64  # the model's 64 positions cap the default 128 tokens
    assert enc.identity() == {"name": "hf", "model": str(path), "dim": 32}
    texts = ["pick up the cube", "put the red cube on the green cube", "open the drawer"]
    batch = enc.embed(texts)
    assert batch.shape == (3, 32) and batch.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1, rtol=1e-6)
    # reference: the L2-normalised mean of the last hidden states of the text alone, unpadded
    model = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        ids = torch.tensor([[2, *(WORDS.index(w) for w in texts[0].split()), 3]])
        mean = model(input_ids=ids).last_hidden_state[0].mean(0)
    np.testing.assert_allclose(batch[0], (mean / mean.norm()).numpy(), atol=1e-5)
    # a text's embedding does not depend on its batch: the training table equals the one-at-a-time
    # lookups that steering makes, bit for bit (every call pads to the same length, so the kernels see
    # the same shapes; on this CPU the old longest-in-batch padding happened to agree too)
    for i, text in enumerate(texts):
        np.testing.assert_array_equal(enc.embed([text])[0], batch[i])
    cache = EmbeddingCache(enc)
    table = cache.table(texts)
    assert all(torch.equal(cache.get(t), table[i]) for i, t in enumerate(texts))
    assert not np.allclose(batch[0], batch[1])


def test_hf_encoder_errors_name_the_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    enc = make_language_encoder({"name": "hf", "model": str(tiny_bert(tmp_path / "bert"))})
    with pytest.raises(UserError, match="has 66 tokens, more than the 64"):
        enc.embed(["pick up the cube", " ".join(["cube"] * 64)])
    with pytest.raises(UserError, match=r"No sentence encoder directory at .*hf download <owner/name> --local-dir"):
        make_language_encoder({"name": "hf", "model": str(tmp_path / "missing")})

    def offline(*args, **kwargs):  # a hub id neither cached nor reachable: one failure, not minutes of retries
        raise OSError("no network")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(UserError, match=r"Cannot fetch the sentence encoder 'owner/encoder' \(OSError: no network\)"):
        make_language_encoder({"name": "hf", "model": "owner/encoder"})
