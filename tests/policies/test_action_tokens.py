"""OpenVLA's action-token arithmetic, reproduced: reference values, round trips, NumPy == torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policies.action_tokens import ActionTokenizer

LLAMA2 = 32000
HALF_BIN = 1 / 255  # bins are 2 / 255 wide


def test_llama2_action_ids_are_31744_to_31999() -> None:
    tok = ActionTokenizer(LLAMA2)
    assert tok.first_id == 31744 and list(tok.action_ids) == list(range(31744, 32000))


@pytest.mark.parametrize(
    ("action", "token", "decoded"),
    [
        # edges -1 + 2i/255; digitize(a) = i + 1 for edge_i <= a < edge_{i+1}; token = 32000 - digitize
        (-1.0, 31999, -1 + 1 / 255),  # digitize 1 -> bin 0, the first centre
        (-2.0, 31999, -1 + 1 / 255),  # clipped to -1
        (0.0, 31872, 0.0),  # edges 127 and 128 are -+1/255: digitize 128 -> bin 127, centre exactly 0
        (0.5, 31808, -1 + 383 / 255),  # 191 <= 191.25: digitize 192 -> bin 191
        (1.0, 31744, -1 + 509 / 255),  # digitize 256 -> bin 255, clipped to 254
        (7.0, 31744, -1 + 509 / 255),  # clipped to 1
        (-1 + 2 / 255, 31998, -1 + 3 / 255),  # exactly on edge 1: digitize 2 (right-open bins)
    ],
)
def test_reference_values(action: float, token: int, decoded: float) -> None:
    tok = ActionTokenizer(LLAMA2)
    ids = tok.encode(np.array([action], dtype=np.float64))
    assert ids.tolist() == [token]
    np.testing.assert_allclose(tok.decode(ids), [decoded], atol=1e-6)
    t_ids = tok.encode(torch.tensor([action], dtype=torch.float64))
    assert t_ids.tolist() == [token]
    torch.testing.assert_close(tok.decode(t_ids), torch.tensor([decoded], dtype=torch.float32))


def test_ids_below_the_action_range_decode_to_the_last_centre_as_in_openvla() -> None:
    tok = ActionTokenizer(LLAMA2)
    np.testing.assert_allclose(tok.decode(np.array([0, 100, 31743, 31745])), [-1 + 509 / 255] * 4, atol=1e-6)


def test_round_trip_error_is_at_most_half_a_bin() -> None:
    tok = ActionTokenizer(515)
    actions = np.random.default_rng(0).uniform(-1, 1, (4000, 7)).astype(np.float32)
    actions[:, 6] = np.random.default_rng(1).uniform(0, 1, 4000)  # gripper in [0, 1]
    actions[:7] = np.linspace(-1, 1, 7)  # both ends included
    err = np.abs(tok.decode(tok.encode(actions)) - actions)
    assert err.max() <= HALF_BIN + 1e-6
    assert err.max() > 0.9 * HALF_BIN  # the bound is tight: the check can fail


def test_numpy_and_torch_agree_on_edges_and_in_between() -> None:
    tok = ActionTokenizer(515)
    edges = tok.bins.astype(np.float32)
    grid = np.concatenate([edges, np.nextafter(edges, 2), np.nextafter(edges, -2), np.linspace(-1.2, 1.2, 5001)])
    grid = grid.astype(np.float32)
    np_ids = tok.encode(grid)
    torch_ids = tok.encode(torch.from_numpy(grid))
    np.testing.assert_array_equal(np_ids, torch_ids.numpy())
    np.testing.assert_array_equal(tok.decode(np_ids), tok.decode(torch_ids).numpy())
    assert set(np.unique(np_ids)) <= set(tok.action_ids)


def test_decoding_is_monotone_decreasing_in_the_id() -> None:
    tok = ActionTokenizer(515)
    values = tok.decode(np.arange(tok.first_id, tok.vocab_size))
    assert np.all(np.diff(values[1:]) < 0) and values[0] == values[1]  # first two ids share the last centre


def test_logit_helpers_restrict_to_action_ids() -> None:
    tok = ActionTokenizer(300)
    logits = torch.randn(2, 3, 320)  # an embedding padded past the vocabulary, as OpenVLA's 32064
    masked = tok.mask_logits(logits)
    allowed = torch.isfinite(masked[0, 0]).nonzero()[:, 0]
    assert allowed.tolist() == list(range(44, 300))
    sliced = tok.action_logits(logits)
    assert sliced.shape == (2, 3, 256)
    torch.testing.assert_close(sliced, logits[..., 44:300])
    best = tok.index_to_id(sliced.argmax(-1))
    assert torch.equal(best, masked.argmax(-1))
    assert torch.equal(tok.id_to_index(best), sliced.argmax(-1))


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="256 bins"):
        ActionTokenizer(32000, bins=128)
    with pytest.raises(ValueError, match="must exceed"):
        ActionTokenizer(200)
    with pytest.raises(ValueError, match="vocabulary has"):
        ActionTokenizer(300).action_logits(torch.zeros(1, 299))
