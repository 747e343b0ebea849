"""The tokenized VLA: KV-cache sampling against a plain decode loop, sampling law, padding, training signal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from policies.config import VisionConfig
from policies.learned import load_policy_model
from policies.vision import VisionEncoder
from policies.vla import VLAModel, choose
from tests.policies.conftest import IMAGE_SIZE, tiny_checkpoint, tiny_model_config

INSTRUCTIONS = ["reach forward", "move the gripper forward to the red block", "go"]


@pytest.fixture(scope="module")
def model() -> VLAModel:
    """A random tiny VLA with sharpened attention and logits.

    At random initialisation attention is nearly uniform, so a wrong position id or cache row would
    barely move the logits; scaled query/key weights make every position matter.
    """
    torch.manual_seed(0)
    model = VLAModel.create(tiny_model_config("vla").policy.model, IMAGE_SIZE).eval()
    with torch.no_grad():
        for layer in model.lm.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
        model.lm.lm_head.weight.mul_(4)
    return model


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(
        np.random.default_rng(seed).integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    )


@torch.no_grad()
def plain_greedy(model: VLAModel, image: torch.Tensor, instruction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding with a full forward per token and no cache: ids (7,) and step logits (7, 256)."""
    prefix = model.embed_prefix(image[None], [instruction])
    ids = torch.zeros((1, 0), dtype=torch.long)
    steps = []
    for _ in range(7):
        logits = model.action_logits(prefix, ids)[0, -1]
        steps.append(logits)
        ids = torch.cat([ids, model.tokens.index_to_id(logits.argmax())[None, None]], dim=1)
    return ids[0], torch.stack(steps)


def test_greedy_kv_cache_decode_equals_plain_decode(model: VLAModel) -> None:
    imgs = images(3)
    ids, logp = model.sample(imgs, INSTRUCTIONS, 1, temperature=0.0)
    assert ids.shape == (3, 1, 7) and logp.shape == (3, 1)
    for n, text in enumerate(INSTRUCTIONS):  # different prompt lengths share one padded batch
        ref_ids, ref_logits = plain_greedy(model, imgs[n], text)
        assert torch.equal(ids[n, 0], ref_ids), text
        ref_logp = ref_logits.log_softmax(-1).gather(1, model.tokens.id_to_index(ref_ids)[:, None]).sum()
        torch.testing.assert_close(logp[n, 0], ref_logp, rtol=1e-4, atol=1e-4)


def test_samples_stay_in_action_ids_and_have_k_rows_per_observation(model: VLAModel) -> None:
    g = torch.Generator().manual_seed(0)
    ids, logp = model.sample(images(2), INSTRUCTIONS[:2], 50, temperature=1.5, generator=g)
    assert ids.shape == (2, 50, 7) and logp.shape == (2, 50)
    assert bool(model.tokens.is_action(ids).all())
    assert len({tuple(r) for r in ids[0].tolist()}) > 40  # a random model at T = 1.5: K distinct actions
    assert torch.isfinite(logp).all() and (logp < 0).all()


@pytest.mark.parametrize("fused", [True, False])
def test_sample_log_prob_equals_the_batched_action_logits(model: VLAModel, fused: bool) -> None:
    """What Q-SFT reuses: one pass over (prefix, 7 tokens) gives the sampler's per-token distributions."""
    g = torch.Generator().manual_seed(1)
    imgs = images(2, seed=3)
    ids, logp = model.sample(imgs, INSTRUCTIONS[1:], 4, temperature=1.0, generator=g, fused=fused)
    prefix = model.embed_prefix(imgs.repeat_interleave(4, 0), [t for t in INSTRUCTIONS[1:] for _ in range(4)])
    flat = ids.view(8, 7)
    logits = model.action_logits(prefix, flat)  # (8, 8, 256): rows 0..6 predict the 7 tokens
    assert logits.shape == (8, 8, 256)
    ref = logits[:, :7].log_softmax(-1).gather(2, model.tokens.id_to_index(flat)[..., None])[..., 0].sum(-1)
    torch.testing.assert_close(logp.view(8), ref, rtol=1e-4, atol=1e-4)


def test_fused_decoding_draws_what_transformers_decoding_draws(model: VLAModel, monkeypatch) -> None:
    """policies/llama_stack.py is the default decoder: the same samples and log-probs as transformers' cached
    forward, for one generator seed, and transformers' forward is not called."""
    imgs, texts = images(3, seed=11), INSTRUCTIONS
    ref_ids, ref_logp = model.sample(imgs, texts, 5, temperature=1.0, generator=torch.Generator().manual_seed(4),
                                     fused=False)  # fmt: skip
    monkeypatch.setattr(model.lm, "forward", lambda *a, **k: pytest.fail("transformers' forward was called"))
    ids, logp = model.sample(imgs, texts, 5, temperature=1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)


def test_a_row_does_not_depend_on_the_rest_of_the_batch(model: VLAModel) -> None:
    imgs = images(2, seed=5)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    together, _ = model.sample(imgs, ["go", "a much longer instruction than the first"], 3, generator=g1)
    other = torch.cat([imgs[:1], images(1, seed=9)])
    alone, _ = model.sample(other, ["go", "x"], 3, generator=g2)
    assert torch.equal(together[0], alone[0])


def test_greedy_gives_k_identical_samples(model: VLAModel) -> None:
    ids, _ = model.sample(images(1), ["go"], 5, temperature=0.0)
    assert (ids[0] == ids[0, :1]).all()


def test_choose_samples_the_softmax_at_the_temperature() -> None:
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, -1)
    g = torch.Generator().manual_seed(0)
    for temperature in (1.0, 0.5):
        counts = torch.bincount(choose(scores, temperature, generator=g), minlength=4).float() / 20000
        expected = (scores[0] / temperature).softmax(-1)
        torch.testing.assert_close(counts, expected, atol=0.015, rtol=0)
    top2 = choose(scores, 1.0, top_k=2, generator=g)
    assert set(top2.tolist()) == {0, 1}
    assert torch.equal(choose(scores[:3], 0.0), torch.zeros(3, dtype=torch.long))


def test_training_on_one_batch_raises_token_accuracy() -> None:
    torch.manual_seed(0)
    model = VLAModel.create(tiny_model_config("vla").policy.model, IMAGE_SIZE)
    batch = {"image": images(8), "instruction": ["reach forward", "go"] * 4,
             "action": torch.rand(8, 7) * 2 - 1}  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss, metrics = model.loss(batch)
        first = first if first is not None else metrics
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, last = model.loss(batch)
    assert last["loss"] < 0.5 * first["loss"] and last["token_accuracy"] > 0.8 > first["token_accuracy"]
    ids, _ = model.eval().sample(batch["image"], batch["instruction"], 1, temperature=0.0)
    err = (model.tokens.decode(ids[:, 0]) - batch["action"]).abs()
    assert err.mean() < 0.1  # the greedy action reproduces the memorised targets


def test_cnn_encoder_gives_grid_tokens() -> None:
    enc = VisionEncoder(VisionConfig(arch="resnet10t", grid=2), image_size=48)
    tokens = enc(images(3))  # 32 px inputs are resized to 48
    assert tokens.shape == (3, 4, enc.dim)
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        enc(torch.zeros(3, 3, 32, 32, dtype=torch.uint8))


def test_checkpoint_round_trip_gives_the_same_model(tmp_path: Path) -> None:
    root = tiny_checkpoint("vla", tmp_path)
    loaded = load_policy_model(root, "vla")
    again = load_policy_model(root, "vla")
    imgs = images(2)
    a, _ = loaded.model.sample(imgs, INSTRUCTIONS[:2], 1, temperature=0.0)
    b, _ = again.model.sample(imgs, INSTRUCTIONS[:2], 1, temperature=0.0)
    assert torch.equal(a, b)
    ckpt = next((root / "checkpoints").iterdir())
    assert json.loads((ckpt / "text_tokenizer.json").read_text())["kind"] == "bytes"


def hf_language_model(root: Path) -> Path:
    """A tiny Llama with a 300-token word-level tokenizer and a 320-row embedding (OpenVLA pads too)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "reach", "forward", "go", "the", "to", "block"]
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(300 - len(words))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")  # fmt: skip
    tok.save_pretrained(root)
    config = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root)
    return root


def test_pretrained_language_model_puts_actions_on_its_tokenizers_last_ids(tmp_path: Path) -> None:
    lm_dir = hf_language_model(tmp_path / "lm")
    cfg = tiny_model_config("vla", f"policy.model.lm.pretrained={lm_dir}").policy.model
    model = VLAModel.create(cfg, IMAGE_SIZE).eval()
    assert model.tokens.vocab_size == 300 and list(model.tokens.action_ids) == list(range(44, 300))
    assert model.prompt_ids(["Reach forward"]) == [[4, 5]]
    ids, _ = model.sample(images(2), ["reach forward", "go"], 6, generator=torch.Generator().manual_seed(0))
    assert ((ids >= 44) & (ids < 300)).all()  # never the 20 padding rows of the embedding
    # the checkpoint carries the tokenizer and the LM config: it loads without the LM directory
    from policies.learned import save_policy_checkpoint
    from tests.policies.conftest import fake_stats

    full = tiny_model_config("vla", f"policy.model.lm.pretrained={lm_dir}")
    meta = {"policy": "vla", "image_size": IMAGE_SIZE}
    save_policy_checkpoint(tmp_path / "run", 1, model, {}, full, fake_stats(), meta)
    import shutil

    shutil.rmtree(lm_dir)
    loaded = load_policy_model(tmp_path / "run", "vla").model
    assert loaded.tokens.vocab_size == 300 and loaded.prompt_ids(["go"]) == [[6]]
    greedy = model.sample(images(2), ["reach forward", "go"], 1, temperature=0.0)[0]
    assert torch.equal(loaded.sample(images(2), ["reach forward", "go"], 1, temperature=0.0)[0], greedy)


@pytest.mark.parametrize("fused", [True, False])
def test_policy_returns_unnormalised_bin_centres(tmp_path: Path, fused: bool) -> None:
    from data.normalize import ActionNormalizer
    from policies.base import make_policy
    from policies.vision import stack_images
    from tests.policies.conftest import contract_config, fake_stats, observation

    cfg = contract_config("vla", tmp_path)
    cfg.fused = fused  # policy.fused=false: transformers' forward, the same draws
    policy = make_policy(cfg)
    obs = [observation(0), observation(1, "go")]
    actions = policy.sample_actions_batch(obs, 4)
    assert actions.shape == (2, 4, 1, 7)
    uniform = make_policy(cfg).draw([0, 1], (4, 7))  # the slots' draws, replayed by a fresh instance
    imgs = stack_images([o["image_primary"] for o in obs], IMAGE_SIZE)
    ids, _ = policy.model.sample(imgs, ["reach forward", "go"], 4, cfg.temperature, cfg.top_k, uniform=uniform)
    norm = policy.model.tokens.decode(ids).numpy()
    norm[..., 6] = norm[..., 6].clip(0, 1)  # the gripper is a fraction in [0, 1]
    expected = ActionNormalizer(fake_stats()["sim"], "bounds_q99").unnormalize(norm)
    np.testing.assert_allclose(actions[:, :, 0], expected, rtol=1e-5, atol=1e-7)
    q01, q99 = (np.array(fake_stats()["sim"]["action"][k][:6]) for k in ("q01", "q99"))
    assert (actions[..., :6] >= q01 - 1e-6).all() and (actions[..., :6] <= q99 + 1e-6).all()
