"""Q-SFT on a Hugging Face VLM: a tiny random Idefics3 (SmolVLM's family) loaded by path, as users load one by id."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from configs.errors import UserError
from policies.learned import save_policy_checkpoint
from policies.qsft.backbone import HFVLMBackbone
from policies.qsft.config import HFVLMConfig
from policies.qsft.policy import load_qsft
from policies.qsft.qsft import QSFTModel
from policies.text import fix_text_length
from tests.policies.conftest import fake_stats
from tests.qsft.helpers import images, qsft_config, tiny_idefics3

PROMPT = "<image>What should the robot do to {instruction}?"
TEXTS = ["go", "pick up the red cube"]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_idefics3(tmp_path_factory.mktemp("idefics3"))


@pytest.fixture(scope="module")
def backbone(vlm_dir: Path) -> HFVLMBackbone:
    torch.set_num_threads(1)
    return HFVLMBackbone.load(HFVLMConfig(source=str(vlm_dir), prompt=PROMPT), image_size=32).eval()


def test_action_tokens_are_the_last_base_ids(backbone: HFVLMBackbone) -> None:
    tok = backbone.processor.tokenizer
    assert backbone.tokens.first_id == tok.convert_tokens_to_ids("<act0>")
    assert backbone.tokens.vocab_size == tok.convert_tokens_to_ids("<fake_token_around_image>")
    prefix = backbone.prefix(images(2), TEXTS)
    assert prefix.mask[0, 0].item() is False and prefix.mask[:, -1].all()  # left padding


@torch.no_grad()
def test_cached_decoding_equals_full_forwards_and_padding_changes_nothing(backbone: HFVLMBackbone) -> None:
    ims, ids = images(2, 1), backbone.tokens.encode(torch.rand(2, 6) * 2 - 1)
    full = backbone.action_logits(backbone.prefix(ims, TEXTS), ids)  # (2, 7, 257)
    assert full.shape == (2, 7, 257)
    dec = backbone.prefill(backbone.prefix(ims, TEXTS), k=3)
    torch.testing.assert_close(dec.logits, full[:, 0].repeat_interleave(3, 0), rtol=1e-4, atol=1e-5)
    rows = backbone.extend(dec, ids.repeat_interleave(3, 0))
    torch.testing.assert_close(rows, full[:, 1:].repeat_interleave(3, 0), rtol=1e-4, atol=1e-5)
    alone = backbone.action_logits(backbone.prefix(ims[:1], TEXTS[:1]), ids[:1])
    torch.testing.assert_close(alone, full[:1], rtol=1e-4, atol=1e-5)
    # no action tokens: the row after the prefix only (the double backup's next-state choice)
    torch.testing.assert_close(backbone.action_logits(backbone.prefix(ims, TEXTS), ids[:, :0]), full[:, :1])


def test_qsft_loss_selection_and_critic(backbone: HFVLMBackbone) -> None:
    model = QSFTModel(backbone, labels="dummy")
    data = {
        "image": images(2, 2), "next_image": images(2, 3), "action": torch.rand(2, 7) * 2 - 1,
        "reward": torch.tensor([0.0, 1.0]), "terminal": torch.tensor([0.0, 1.0]), "instruction": TEXTS,
    }  # fmt: skip
    double = model.losses(data, 0.98, 1e-4, backup="double")[2]
    assert 0 <= double["target"] <= 1 and double["ratio_support"] >= 1
    q_loss, bc_loss, metrics = model.losses(data, 0.98, 1e-4)
    (q_loss + bc_loss).backward()
    assert torch.isfinite(q_loss) and torch.isfinite(bc_loss) and 0 <= metrics["target"] <= 1
    assert model.q.model.get_input_embeddings().weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.q_target.parameters())
    with torch.no_grad():
        ids = model.select(images(2, 4), TEXTS, 4, beta=2.0, generator=torch.Generator().manual_seed(0))
        assert ids.shape == (2, 4, 7) and model.tokens.is_action(ids).all()
        scores = model.score(images(2, 4), TEXTS, ids, "p_theta")
        one = model.score(images(2, 4)[1:], TEXTS[1:], ids[1:, 2:3], "p_theta")
    assert scores.shape == (2, 4) and ((scores > 0) & (scores < 1)).all()
    torch.testing.assert_close(one[0, 0], scores[1, 2], rtol=1e-4, atol=1e-6)


def test_checkpoint_rebuilds_without_the_source(backbone: HFVLMBackbone, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = QSFTModel(backbone)
    cfg = qsft_config("policy.model.backbone=hf", "policy.model.hf.source=/nowhere")  # rebuilt from the checkpoint
    cfg.policy.model.hf.prompt = PROMPT
    meta = {"policy": "qsft", "image_size": 32, "chunk": 1, "normalization": "bounds_q99"}
    save_policy_checkpoint(tmp_path, 3, model, {}, cfg, fake_stats(), meta)
    loaded = load_qsft(tmp_path).model
    assert isinstance(loaded.pi, HFVLMBackbone)
    with torch.no_grad():
        a = model.select(images(2, 5), TEXTS, 1, 1.0, temperature=0.0)
        b = loaded.select(images(2, 5), TEXTS, 1, 1.0, temperature=0.0)
        sa = model.score(images(2, 5), TEXTS, a, "ratio")
        sb = loaded.score(images(2, 5), TEXTS, a, "ratio")
    assert torch.equal(a, b)
    torch.testing.assert_close(sa, sb)


@torch.no_grad()
def test_fixed_text_length_makes_a_row_independent_of_its_companions(backbone: HFVLMBackbone) -> None:
    """With the text length fixed (fixed batch rows, evaluation), every prompt is padded to one length:
    a row's logits are bit for bit the same beside a short or a long instruction, and an instruction
    longer than max_text_tokens is a clear error."""
    ims, ids = images(2, 5), backbone.tokens.encode(torch.rand(2, 6) * 2 - 1)
    short, long = ["go", "go"], ["go", "put the red cube on the green cube, then lift the blue one"]
    fix_text_length(backbone, True)
    try:
        a, b = backbone.prefix(ims, short), backbone.prefix(ims, long)
        assert a.mask.shape == b.mask.shape and a.mask.shape[1] > backbone.prefix(ims[:1], ["go"]).mask.sum()
        assert torch.equal(a.mask[0], b.mask[0])
        assert torch.equal(backbone.action_logits(a, ids)[0], backbone.action_logits(b, ids)[0])
        with pytest.raises(UserError, match="max_text_tokens"):
            backbone.prefix(ims[:1], ["lift " * 80])
    finally:
        fix_text_length(backbone, False)
    assert backbone.prefix(ims, short).mask.shape[1] < backbone.prefix(ims, long).mask.shape[1]
