"""The K-sample decoder: masking, shapes, distributions, and greedy equivalence with a plain decode loop."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

from policies.openvla.policy import bin_centres
from policies.openvla.processing import prompt_ids
from tests.openvla.helpers import observation, plain_greedy_decode


def inputs(loaded: Any, seed: int = 0, instruction: str = "put the spoon on the towel") -> tuple[torch.Tensor, ...]:
    pixel_values = loaded.processor(observation(seed)["image_primary"])[None]
    return pixel_values, torch.tensor([prompt_ids(loaded.tokenizer, instruction)])


@torch.no_grad()
def first_logits(loaded: Any, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits (V,) of the first action token from one full forward (no cache)."""
    model = loaded.model
    return model.language_model(inputs_embeds=model.embed_prefix(pixel_values, input_ids)).logits[0, -1].float()


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shapes_and_action_ids(loaded: Any) -> None:
    ids, logp = loaded.model.sample(*inputs(loaded), 5, generator=generator(0))
    assert ids.shape == (5, 7) and logp.shape == (5,) and ids.dtype == torch.long
    assert bool(loaded.model.tokens.is_action(ids).all())
    assert bool((logp < 0).all())


def test_masking_keeps_samples_on_action_ids_where_the_vocabulary_would_not(loaded: Any) -> None:
    """The random tiny model prefers non-action ids: unmasked greedy decoding (published) emits them."""
    model, tokens = loaded.model, loaded.model.tokens
    assert not tokens.is_action(first_logits(loaded, *inputs(loaded)).argmax())
    sampled, _ = model.sample(*inputs(loaded), 50, temperature=2.0, generator=generator(1))
    greedy, _ = model.sample(*inputs(loaded), 1, temperature=0.0)
    published, _ = model.sample(*inputs(loaded), 1, temperature=0.0, restrict=False)
    assert bool(tokens.is_action(sampled).all()) and bool(tokens.is_action(greedy).all())
    assert not bool(tokens.is_action(published).all())
    # predict_action's arithmetic on non-action ids: below 31744 -> +0.996, padding ids >= 32000 -> -0.996
    np.testing.assert_allclose(
        bin_centres(tokens, np.array([5, 31743, 32000, 32063])), [254 / 255] * 2 + [-254 / 255] * 2
    )


@pytest.mark.parametrize("restrict", [False, True])
def test_greedy_equals_a_plain_decode_loop(loaded: Any, restrict: bool) -> None:
    for seed, instruction in [(0, "put the spoon on the towel"), (1, "pick up the carrot")]:
        pixel_values, input_ids = inputs(loaded, seed, instruction)
        ids, _ = loaded.model.sample(pixel_values, input_ids, 1, temperature=0.0, restrict=restrict)
        assert ids[0].tolist() == plain_greedy_decode(loaded.model, pixel_values, input_ids, restrict)


def test_greedy_rows_are_identical(loaded: Any) -> None:
    ids, logp = loaded.model.sample(*inputs(loaded), 4, temperature=0.0)
    assert (ids == ids[0]).all() and (logp == logp[0]).all()


def test_the_image_changes_the_actions(loaded: Any) -> None:
    """The published code on transformers >= 4.50 silently ignores the image (reference/policies.md)."""
    _, input_ids = inputs(loaded)
    a = first_logits(loaded, inputs(loaded, seed=0)[0], input_ids)
    b = first_logits(loaded, inputs(loaded, seed=1)[0], input_ids)
    assert (a - b).abs().max() > 1e-2


def chi_square_p(samples: np.ndarray, probs: np.ndarray) -> float:
    """p-value of Pearson's chi-square test of categorical samples against probs; cells expected < 5 pooled."""
    expected = probs * len(samples)
    observed = np.bincount(samples, minlength=len(probs)).astype(float)
    small = expected < 5
    expected = np.append(expected[~small], expected[small].sum())
    observed = np.append(observed[~small], observed[small].sum())
    statistic = ((observed - expected) ** 2 / np.maximum(expected, 1e-12)).sum()
    return float(stats.chi2.sf(statistic, df=len(expected) - 1))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_first_token_samples_follow_the_masked_softmax(loaded: Any, temperature: float) -> None:
    pixel_values, input_ids = inputs(loaded)
    probs = loaded.model.tokens.action_logits(first_logits(loaded, pixel_values, input_ids)) / temperature
    probs = probs.softmax(-1).double().numpy()
    assert probs.max() > 5 / 256  # far from uniform: the test can tell distributions apart
    ids, _ = loaded.model.sample(pixel_values, input_ids, 2000, temperature, generator=generator(3))
    index = loaded.model.tokens.id_to_index(ids[:, 0]).numpy()
    assert chi_square_p(index, probs / probs.sum()) > 1e-3
    wrong = np.roll(probs, 1)  # the same test rejects a shifted distribution
    assert chi_square_p(index, wrong / wrong.sum()) < 1e-6


@torch.no_grad()
def test_sample_log_probs_equal_teacher_forcing(loaded: Any) -> None:
    """Each row's 7 tokens were drawn from its own history: the decoder's log-probabilities (action
    ids only, T = 1) equal those of one full forward over prefix + that row's tokens."""
    model, tokens = loaded.model, loaded.model.tokens
    pixel_values, input_ids = inputs(loaded)
    ids, logp = model.sample(pixel_values, input_ids, 16, generator=generator(4))
    prefix = model.embed_prefix(pixel_values, input_ids).expand(16, -1, -1)
    sequence = torch.cat([prefix, model.language_model.get_input_embeddings()(ids[:, :-1])], dim=1)
    logits = model.language_model(inputs_embeds=sequence).logits[:, prefix.shape[1] - 1 :].float()  # (16, 7, V)
    forced = tokens.action_logits(logits).log_softmax(-1).gather(2, tokens.id_to_index(ids)[..., None])
    torch.testing.assert_close(logp, forced.sum(dim=(1, 2)), rtol=1e-4, atol=1e-4)
    assert len({tuple(row) for row in ids.tolist()}) > 1


def test_top_k_restricts_each_step(loaded: Any) -> None:
    pixel_values, input_ids = inputs(loaded)
    top = loaded.model.tokens.action_logits(first_logits(loaded, pixel_values, input_ids)).topk(3).indices
    ids, _ = loaded.model.sample(pixel_values, input_ids, 200, 5.0, top_k=3, generator=generator(5))
    assert set(loaded.model.tokens.id_to_index(ids[:, 0]).tolist()) <= set(top.tolist())


@pytest.mark.parametrize("restrict", [True, False])
def test_fused_decoding_draws_what_transformers_draws(loaded: Any, restrict: bool, monkeypatch) -> None:
    """Llama-2 through policies/llama_stack.py (the default): transformers' samples for one seed, and
    transformers' forward is not called; quantised layers fall back to it (tests/openvla/test_quantization.py)."""
    model = loaded.model
    ref_ids, ref_logp = model.sample(*inputs(loaded), 6, temperature=1.5, restrict=restrict, generator=generator(3),
                                     fused=False)  # fmt: skip
    monkeypatch.setattr(model.language_model.model, "forward", lambda *a, **k: pytest.fail("transformers called"))
    ids, logp = model.sample(*inputs(loaded), 6, temperature=1.5, restrict=restrict, generator=generator(3))
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-4, atol=1e-4)
