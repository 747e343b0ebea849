"""Q-SFT's loss math on hand-computed examples: targets, floor, clipping, soft labels, selection rule."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from configs.errors import UserError
from policies.qsft.qsft import (
    double_ratio,
    dummy_label_ce,
    log_q,
    max_ratio,
    selection_logits,
    soft_label_ce,
    token_targets,
    unit_rewards,
)

FLOOR = 1e-4


def logp(*probs: float) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).clamp(min=1e-30).log()


# A 2-step episode, 3 tokens per action, 4 action tokens. Step 0 is not terminal (r = 0); step 1
# reaches success (r = 1, terminal). Each row: (pi_phi, target) at the token state *after* token j.
STEP0 = [
    # after token 0: ratios 0.6, 0.8, 1.6; token 3 (pi = 0) is cut by the floor -> 1.6, clipped to 1
    ((0.5, 0.25, 0.25, 0.0), (0.3, 0.2, 0.4, 0.1)),
    # after token 1: token 3 has pi = 5e-5 < floor, its ratio 12200 is ignored; the rest 0.5, 0.25, 0.4 -> 0.5
    ((0.5, 0.4, 0.09995, 0.00005), (0.25, 0.1, 0.04, 0.61)),
    # after token 2 = the first token of step 1 (the action boundary): 0.2, 0.75, 0.17, (cut) -> 0.75
    ((0.5, 0.2, 0.29995, 0.00005), (0.1, 0.15, 0.05, 0.7)),
]
STEP1 = [
    ((0.7, 0.1, 0.1, 0.1), (0.14, 0.07, 0.07, 0.72)),  # ratios 0.2, 0.7, 0.7, 7.2 -> 7.2, clipped
    ((0.25, 0.25, 0.25, 0.25), (0.1, 0.1, 0.2, 0.6)),  # 0.4, 0.4, 0.8, 2.4 -> 2.4, clipped
    ((0.25, 0.25, 0.25, 0.25), (0.25, 0.25, 0.25, 0.25)),  # the next state after a terminal step: unused
]


def ratios(rows: list) -> torch.Tensor:
    pi = torch.stack([logp(*p) for p, _ in rows])
    target = torch.stack([logp(*t) for _, t in rows])
    return max_ratio(target, pi, FLOOR)[0]


def test_max_ratio_floor_and_support() -> None:
    r = ratios(STEP0 + STEP1)
    torch.testing.assert_close(r, torch.tensor([1.6, 0.5, 0.75, 7.2, 2.4, 1.0], dtype=torch.float64))
    pi, target = logp(0.5, 0.4, 0.09995, 0.00005), logp(0.25, 0.1, 0.05, 0.6)
    _, support = max_ratio(target, pi, FLOOR)
    assert support == 3
    # a floor below the rare token lets its ratio 0.6 / 5e-5 = 12000 through: why the floor exists
    assert math.isclose(float(max_ratio(target, pi, 1e-5)[0]), 12000.0, rel_tol=1e-6)
    # a floor above every token keeps pi_phi's most likely one: 0.25 / 0.5
    ratio, support = max_ratio(target, pi, 0.9)
    assert support == 1 and math.isclose(float(ratio), 0.5, rel_tol=1e-9)


def test_double_ratio_values_the_online_choice_with_the_target() -> None:
    """backup=double: p_theta picks among pi_phi's supported tokens, the target's ratio at that token is y."""
    pi = logp(0.5, 0.25, 0.24995, 0.00005)  # token 3 below the floor
    target = logp(0.3, 0.2, 0.4, 0.1)  # target ratios 0.6, 0.8, 1.6, (2000, cut)
    online = logp(0.1, 0.5, 0.1, 0.3)  # online ratios 0.2, 2.0, 0.4, (6000, cut) -> token 1
    ratio, support = double_ratio(target, pi, online, FLOOR)
    assert support == 3 and math.isclose(float(ratio), 0.8, rel_tol=1e-9)  # target's 0.2 / 0.25, not max 1.6
    assert float(ratio) < float(max_ratio(target, pi, FLOOR)[0])  # never above the max backup
    # the same network choosing and valuing is the max backup
    torch.testing.assert_close(double_ratio(target, pi, target, FLOOR)[0], max_ratio(target, pi, FLOOR)[0])
    # batched over leading axes, as the model calls it (B, 7, A)
    rows = torch.stack([torch.stack([target, pi, online])] * 2)  # (2, 3, 4)
    batched, _ = double_ratio(rows[:, :1], rows[:, 1:2], rows[:, 2:], FLOOR)
    torch.testing.assert_close(batched, torch.full((2, 1), 0.8, dtype=torch.float64))


def test_two_step_three_token_targets() -> None:
    """y per token: gamma 1 within an action, reward on the last token, next step's first token, terminal."""
    gamma = 0.9
    next_ratio = torch.stack([ratios(STEP0), ratios(STEP1)])  # (2 steps, 3 tokens)
    reward, terminal = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    y, raw = token_targets(reward, terminal, next_ratio, gamma)
    expected_raw = torch.tensor(
        [
            [1.6, 0.5, 0.0 + 0.9 * 0.75],  # step 0: clipped; within the action; across the boundary, discounted
            [7.2, 2.4, 1.0],  # step 1: the terminal last token takes its reward only (the 1.0 ratio is ignored)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(raw, expected_raw)
    torch.testing.assert_close(y, torch.tensor([[1.0, 0.5, 0.675], [1.0, 1.0, 1.0]], dtype=torch.float64))
    # a failed (non-terminal) step with reward 0 keeps bootstrapping; negative values clip to 0
    y, _ = token_targets(torch.zeros(1), torch.zeros(1), torch.tensor([[0.3, -0.2, 0.5]]), 0.5)
    torch.testing.assert_close(y, torch.tensor([[0.3, 0.0, 0.25]]))


def test_soft_label_ce_reference_values() -> None:
    logits = logp(0.1, 0.2, 0.3, 0.4)
    loss = soft_label_ce(logits, torch.tensor(2), torch.tensor(0.7, dtype=torch.float64))
    # -(0.7 log 0.3 + 0.3 (log 0.1 + log 0.2 + log 0.4) / 3)
    assert math.isclose(float(loss), 1.3256123367583852, rel_tol=1e-12)
    # it is the cross-entropy against the dense soft label (y on a, (1 - y) / (|A| - 1) elsewhere)
    torch.manual_seed(0)
    logits, index, y = torch.randn(5, 3, 256), torch.randint(0, 256, (5, 3)), torch.rand(5, 3)
    dense = ((1 - y) / 255)[..., None].expand(-1, -1, 256).clone()
    dense.scatter_(-1, index[..., None], y[..., None])
    reference = -(dense * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(soft_label_ce(logits, index, y), reference)
    hard = F.cross_entropy(logits.transpose(1, 2), index, reduction="none")  # y = 1: plain cross-entropy
    torch.testing.assert_close(soft_label_ce(logits, index, torch.ones(5, 3)), hard)


def test_dummy_label_ce_and_its_optimum() -> None:
    logits = logp(0.2, 0.1, 0.3, 0.4)  # column 0: the dummy token
    loss = dummy_label_ce(logits, torch.tensor(1), torch.tensor(0.6, dtype=torch.float64))
    assert math.isclose(float(loss), -(0.6 * math.log(0.3) + 0.4 * math.log(0.2)), rel_tol=1e-12)


def fit(labels: str, pi: torch.Tensor, q: torch.Tensor, steps: int = 3000) -> torch.Tensor:
    """Minimise the expected loss over a ~ pi with targets Q(a): the learned p_theta (A,)."""
    logits = torch.zeros(1 + len(pi), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    index = torch.arange(len(pi))
    for _ in range(steps):
        x = logits.expand(len(pi), -1)
        per = soft_label_ce(x[:, 1:], index, q) if labels == "uniform" else dummy_label_ce(x, index, q)
        opt.zero_grad()
        (pi * per).sum().backward()
        opt.step()
    return log_q(logits.detach(), labels).exp()


def test_dummy_labels_recover_q_where_uniform_labels_bias_the_ratio() -> None:
    """Fixed points: dummy p = pi Q (ratio = Q); uniform p / pi >= 1 at its max, whatever Q (docs/qsft.md)."""
    pi = torch.tensor([0.6, 0.3, 0.09, 0.01], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.1, 0.3], dtype=torch.float64)
    dummy = fit("dummy", pi, q)
    torch.testing.assert_close(dummy / pi, q, atol=2e-3, rtol=0)
    uniform = fit("uniform", pi, q)
    predicted = pi * q + ((pi * (1 - q)).sum() - pi * (1 - q)) / 3  # reference/qsft.md's implied fixed point
    torch.testing.assert_close(uniform, predicted, atol=2e-3, rtol=0)
    assert (uniform / pi).max() > 1 > q.max()


def test_selection_rule_on_fixed_logits() -> None:
    pi_logits = logp(0.5, 0.3, 0.2)
    q_probs = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    for beta in (0.0, 1.0, 8.0):
        weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64) * torch.exp(beta * q_probs)
        torch.testing.assert_close(selection_logits(pi_logits, q_probs, beta).softmax(-1), weights / weights.sum())
    # beta 0 = pi_phi's choice; a large beta follows p_theta; 8: 0.5 e^0.8 < 0.2 e^4.8
    assert [int(selection_logits(pi_logits, q_probs, b).argmax()) for b in (0.0, 1.0, 8.0)] == [0, 0, 2]


def test_ratio_selection_on_fixed_logits() -> None:
    """value=ratio: beta multiplies p_theta / pi_phi, and tokens at or under the floor cannot be chosen."""
    pi_logits = logp(0.5, 0.3, 0.19, 0.01)
    q_probs = torch.tensor([0.05, 0.15, 0.095, 0.009], dtype=torch.float64)  # ratios 0.1, 0.5, 0.5, 0.9
    for beta in (0.0, 2.0, 20.0):
        weights = torch.tensor([0.5, 0.3, 0.19, 0.0], dtype=torch.float64) * torch.exp(
            beta * torch.tensor([0.1, 0.5, 0.5, 0])
        )
        got = selection_logits(pi_logits, q_probs, beta, value="ratio", floor=0.02).softmax(-1)
        torch.testing.assert_close(got, weights / weights.sum())
    # at a large beta the ratio ties tokens 1 and 2 and pi_phi breaks the tie
    assert int(selection_logits(pi_logits, q_probs, 50.0, "ratio").argmax()) == 1
    # where they disagree: p_theta follows pi_phi's mass (0.3 = 0.6 x 0.5), the ratio the value (0.8)
    pi_logits, q_probs = logp(0.6, 0.1, 0.3), torch.tensor([0.3, 0.08, 0.12], dtype=torch.float64)
    assert [int(selection_logits(pi_logits, q_probs, 50.0, v).argmax()) for v in ("p_theta", "ratio")] == [0, 1]
    # pi_phi's mode stays in whatever the floor
    assert torch.isfinite(selection_logits(pi_logits, q_probs, 1.0, "ratio", floor=0.9)).tolist() == [
        True,
        False,
        False,
    ]
    with pytest.raises(UserError, match="select_value"):
        selection_logits(pi_logits, q_probs, 1.0, value="q")


def test_log_q_normalises_over_the_right_tokens() -> None:
    logits = torch.randn(2, 257)
    assert torch.allclose(log_q(logits, "uniform").exp().sum(-1), torch.ones(2))
    dummy = log_q(logits, "dummy").exp().sum(-1)
    assert torch.allclose(dummy, 1 - logits.softmax(-1)[:, 0])


def test_unit_rewards() -> None:
    r = torch.tensor([-1.0, 0.0, -1.0])
    torch.testing.assert_close(unit_rewards(r, 0.0, -1.0), torch.tensor([0.0, 1.0, 0.0]))  # V-GPS labels
    torch.testing.assert_close(unit_rewards(torch.tensor([0.0, 1.0]), 1.0, 0.0), torch.tensor([0.0, 1.0]))
    with pytest.raises(UserError, match="success signal"):
        unit_rewards(r, 0.0, 0.0)
