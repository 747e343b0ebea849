"""QSFTModel on a tiny VLA backbone: the action boundary inside the loss, selection, critic batching, Polyak."""

from __future__ import annotations

import math

import pytest
import torch

from configs.errors import UserError
from policies.qsft.qsft import (
    QSFTModel,
    double_ratio,
    log_q,
    max_ratio,
    selection_logits,
    soft_label_ce,
    token_targets,
)
from tests.qsft.helpers import images, tiny_qsft_model

INSTRUCTIONS = ["reach forward", "go", "pick up the red cube", "go"]


@pytest.fixture(scope="module")
def model() -> QSFTModel:
    torch.set_num_threads(1)
    m = tiny_qsft_model(0).eval()
    with torch.no_grad():  # three different networks, as after some training
        for p in m.q.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for p in m.q_target.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def batch(b: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": images(b, seed), "next_image": images(b, seed + 100), "action": torch.rand(b, 7, generator=g) * 2 - 1,
        "reward": torch.tensor([0.0, 0.0, 1.0, 0.0])[:b], "terminal": torch.tensor([0.0, 0.0, 1.0, 0.0])[:b],
        "instruction": INSTRUCTIONS[:b],
    }  # fmt: skip


def fake_forwards(monkeypatch, backbone, table: torch.Tensor, data: dict, seen: list | None = None) -> None:
    """`backbone` returns rows of `table` (s_t: rows :B, s_{t+1}: rows B:) for the images of its prefix, the
    first n + 1 token rows for n action ids; `seen` records (images, instructions, grad enabled, n) of each call."""
    B = len(data["image"])
    parts = [(data["image"], slice(0, B)), (data["next_image"], slice(B, 2 * B))]
    parts.append((torch.cat([data["image"], data["next_image"]]), slice(0, 2 * B)))

    def prefix(im: torch.Tensor, ins: list) -> tuple:
        return im, list(ins)

    def action_logits(prefix: tuple, ids: torch.Tensor) -> torch.Tensor:
        im, ins = prefix
        if seen is not None:
            seen.append((im.clone(), ins, torch.is_grad_enabled(), ids.shape[1]))
        for part, rows in parts:
            if im.shape == part.shape and torch.equal(im, part):
                return table[rows, : ids.shape[1] + 1].clone()
        raise AssertionError("a forward over images that are neither s_t, s_{t+1} nor both")

    monkeypatch.setattr(backbone, "prefix", prefix)
    monkeypatch.setattr(backbone, "action_logits", action_logits)


@pytest.mark.parametrize("train_behaviour", [True, False])
def test_loss_wires_the_action_boundary(model: QSFTModel, monkeypatch, train_behaviour: bool) -> None:
    """Token j < 6 bootstraps from row j + 1 of (s, a); token 6 from row 0 of s'. One batched forward per
    model over s_t and s_{t+1}, except for a pi_phi that trains: its s_{t+1} rows get a forward of their
    own, without a gradient (the backward then runs over B rows, not 2B)."""
    B, data = 4, batch()
    torch.manual_seed(1)
    logits = {"pi": torch.randn(2 * B, 7, 257), "q": torch.randn(B, 7, 257), "q_target": torch.randn(2 * B, 7, 257)}
    seen: dict[str, list] = {name: [] for name in logits}
    for name, table in logits.items():
        fake_forwards(monkeypatch, getattr(model, name), table, data, seen[name])
    q_loss, _, metrics = model.losses(data, gamma=0.9, floor=1e-4, train_behaviour=train_behaviour)
    both = torch.cat([data["image"], data["next_image"]])
    if train_behaviour:
        (now, _, now_grad, now_n), (after, _, after_grad, after_n) = seen["pi"]  # exactly two forwards
        assert torch.equal(now, data["image"]) and now_grad and now_n == 6
        assert torch.equal(after, data["next_image"]) and not after_grad and after_n == 0  # the prefix alone
    else:
        assert len(seen["pi"]) == 1 and torch.equal(seen["pi"][0][0], both) and seen["pi"][0][1] == INSTRUCTIONS * 2
    assert len(seen["q"]) == len(seen["q_target"]) == 1  # one batched forward each
    assert torch.equal(seen["q"][0][0], data["image"]) and torch.equal(seen["q_target"][0][0], both)
    pi, target = logits["pi"][..., 1:].log_softmax(-1), log_q(logits["q_target"], "uniform")
    expected = torch.zeros(B, 7)
    for j in range(7):  # the per-token loop the model does without
        row, half = (j + 1, slice(0, B)) if j < 6 else (0, slice(B, 2 * B))
        expected[:, j] = max_ratio(target[half, row], pi[half, row], 1e-4)[0]
    y, _ = token_targets(data["reward"], data["terminal"], expected, 0.9)
    assert y[2, 6] == 1.0  # the terminal success takes its reward only
    index = model.tokens.id_to_index(model.tokens.encode(data["action"]))
    torch.testing.assert_close(q_loss, soft_label_ce(logits["q"][..., 1:], index, y).mean())
    torch.testing.assert_close(metrics["target"], y.mean())


def test_joint_behaviour_forward_equals_one_pass_over_both_states(model: QSFTModel) -> None:
    """The split forward of a training pi_phi changes no number: the same targets and losses as the shared one."""
    data = batch()
    joint = model.losses(data, 0.9, 0.01, train_behaviour=True)
    with torch.no_grad():
        shared = model.losses(data, 0.9, 0.01, train_behaviour=True)  # no gradient: one pass over 2B rows
    for a, b in zip(joint[:2], shared[:2], strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-6)
    for name in ("target", "target_clipped", "ratio_support", "token_accuracy"):
        torch.testing.assert_close(joint[2][name], shared[2][name], rtol=1e-5, atol=1e-6)


def test_double_backup_lets_p_theta_choose_and_the_target_value(model: QSFTModel, monkeypatch) -> None:
    """backup=double: inside the action the online choice reads p_theta's own rows of (s, a); at the
    boundary one more p_theta forward over s' (no gradient) chooses the first token."""
    B, data = 4, batch()
    torch.manual_seed(3)
    pi, target = torch.randn(2 * B, 7, 257), torch.randn(2 * B, 7, 257)
    q_now, q_next = torch.randn(B, 7, 257, requires_grad=True), torch.randn(B, 257, requires_grad=True)
    q_calls: list = []
    fake_forwards(monkeypatch, model.pi, pi, data)
    fake_forwards(monkeypatch, model.q_target, target, data)
    prefix = model.q.prefix
    monkeypatch.setattr(model.q, "prefix", lambda im, ins: q_calls.append(im.clone()) or prefix(im, ins))
    # (B, 6) action inputs over s_t; none over s_{t+1}: only the row after its prefix is needed
    rows = {6: q_now, 0: q_next[:, None]}
    monkeypatch.setattr(model.q, "action_logits", lambda p, ids: rows[ids.shape[1]].clone())
    q_loss, _, metrics = model.losses(data, gamma=0.9, floor=0.01, backup="double")
    assert len(q_calls) == 2 and torch.equal(q_calls[0], data["image"]) and torch.equal(q_calls[1], data["next_image"])
    log_pi, log_t = pi[..., 1:].log_softmax(-1), log_q(target, "uniform")
    online_rows = torch.cat([q_now.detach()[:, 1:], q_next[:, None]], dim=1)
    expected = torch.zeros(B, 7)
    for j in range(7):
        row, half = (j + 1, slice(0, B)) if j < 6 else (0, slice(B, 2 * B))
        expected[:, j] = double_ratio(log_t[half, row], log_pi[half, row], log_q(online_rows[:, j], "uniform"), 0.01)[0]
        assert (expected[:, j] <= max_ratio(log_t[half, row], log_pi[half, row], 0.01)[0] + 1e-6).all()
    y, _ = token_targets(data["reward"], data["terminal"], expected, 0.9)
    index = model.tokens.id_to_index(model.tokens.encode(data["action"]))
    torch.testing.assert_close(q_loss, soft_label_ce(q_now[..., 1:], index, y).mean())
    torch.testing.assert_close(metrics["target"], y.mean())
    q_loss.backward()  # the gradient flows through the s_t forward only
    assert q_now.grad is not None and q_next.grad is None


def test_mc_backup_regresses_every_token_on_the_return_without_the_target(model: QSFTModel, monkeypatch) -> None:
    """backup=mc: y = clip(mc_return) on all 7 tokens, and the target network is never run."""
    B, data = 4, batch()
    data["mc_return"] = torch.tensor([0.3, 0.0, 1.0, 1.7])  # 1.7: clipped to 1
    torch.manual_seed(2)
    q_logits = torch.randn(B, 7, 257)
    monkeypatch.setattr(model.q, "action_logits", lambda prefix, ids: q_logits.clone())
    monkeypatch.setattr(model.q_target, "prefix", lambda *a: pytest.fail("the target network ran"))
    seen, prefix = [], model.pi.prefix
    monkeypatch.setattr(model.pi, "prefix", lambda im, ins: seen.append(len(im)) or prefix(im, ins))
    q_loss, _, metrics = model.losses(data, gamma=0.9, floor=1e-4, backup="mc")
    assert seen == [B] and "ratio_support" not in metrics  # pi_phi reads s_t only: no next state, no support
    y = torch.tensor([0.3, 0.0, 1.0, 1.0])[:, None].expand(B, 7)
    index = model.tokens.id_to_index(model.tokens.encode(data["action"]))
    torch.testing.assert_close(q_loss, soft_label_ce(q_logits[..., 1:], index, y).mean())
    assert metrics["target_clipped"] == 1 / 4
    with pytest.raises(UserError, match="backup="):
        model.losses(data, gamma=0.9, floor=1e-4, backup="sarsa")


def test_gradients_reach_the_trained_models_only(model: QSFTModel) -> None:
    model.zero_grad(set_to_none=True)
    q_loss, bc_loss, _ = model.losses(batch(), 0.98, 1e-4, train_behaviour=True)
    (q_loss + bc_loss).backward()
    assert all(p.grad is None for p in model.q_target.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.q.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.pi.parameters())
    model.zero_grad(set_to_none=True)
    q_loss, bc_loss, _ = model.losses(batch(), 0.98, 1e-4, train_behaviour=False)
    assert not bc_loss.requires_grad and q_loss.requires_grad
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def test_greedy_selection_is_the_rule_decoded_token_by_token(model: QSFTModel) -> None:
    """KV-cached select == argmax of log pi_phi + beta p_theta recomputed with full forwards; beta 0 == pi_phi."""
    ims, texts = images(2, 5), ["go", "pick up the red cube"]
    beta = 3.0
    chosen = model.select(ims, texts, 3, beta, temperature=0.0)
    assert chosen.shape == (2, 3, 7) and (chosen == chosen[:, :1]).all()
    ids = torch.empty(2, 0, dtype=torch.long)
    for _ in range(7):
        pi = model.pi.action_logits(model.pi.prefix(ims, texts), ids)[:, -1, 1:]
        q = log_q(model.q.action_logits(model.q.prefix(ims, texts), ids)[:, -1], "uniform").exp()
        ids = torch.cat([ids, model.tokens.index_to_id(selection_logits(pi, q, beta).argmax(-1))[:, None]], dim=1)
    assert torch.equal(chosen[:, 0], ids)
    plain, _ = model.pi.net.sample(ims, texts, 1, temperature=0.0)
    assert torch.equal(model.select(ims, texts, 1, 0.0, temperature=0.0), plain)
    # the ratio rule, decoded the same way
    chosen = model.select(ims, texts, 1, beta, temperature=0.0, value="ratio", floor=0.01)
    ids = torch.empty(2, 0, dtype=torch.long)
    for _ in range(7):
        pi = model.pi.action_logits(model.pi.prefix(ims, texts), ids)[:, -1, 1:]
        q = log_q(model.q.action_logits(model.q.prefix(ims, texts), ids)[:, -1], model.labels).exp()
        ids = torch.cat(
            [ids, model.tokens.index_to_id(selection_logits(pi, q, beta, "ratio", 0.01).argmax(-1))[:, None]], 1
        )
    assert torch.equal(chosen[:, 0], ids)


@torch.no_grad()
def test_sampled_selection_stays_in_the_action_vocabulary(model: QSFTModel) -> None:
    g = torch.Generator().manual_seed(0)
    ids = model.select(images(2, 6), ["go", "reach"], 16, 1.0, temperature=1.0, generator=g)
    assert ids.shape == (2, 16, 7) and model.tokens.is_action(ids).all()
    assert len({tuple(a.tolist()) for a in ids[0]}) > 1


@pytest.mark.parametrize("value", ["p_theta", "ratio"])
@torch.no_grad()
def test_fused_selection_and_critic_equal_the_two_models_in_turn(model: QSFTModel, value: str, monkeypatch) -> None:
    """pi_phi and p_theta decoded as one stack (policies/llama_stack.py): the same samples for one seed and
    the same critic scores as each model through transformers' forward, which the fused path never calls."""
    ims, texts = images(2, 8), ["go", "pick up the red cube"]
    ids = model.tokens.encode(torch.rand(2, 4, 7, generator=torch.Generator().manual_seed(0)) * 2 - 1)

    def run(fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = model.select(ims, texts, 6, 2.0, generator=torch.Generator().manual_seed(3), value=value,
                              floor=0.01, fused=fused)  # fmt: skip
        return chosen, model.score(ims, texts, ids, value, fused=fused)

    ref_ids, ref_scores = run(False)
    with monkeypatch.context() as patch:
        for backbone in (model.pi, model.q):
            patch.setattr(backbone.net.lm, "forward", lambda *a, **k: pytest.fail("transformers' forward was called"))
        chosen, scores = run(True)
    assert torch.equal(chosen, ref_ids)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["p_theta", "ratio"])
@torch.no_grad()
def test_critic_batch_equals_one_action_at_a_time(model: QSFTModel, mode: str) -> None:
    ims, texts = images(2, 7), ["go", "pick up the red cube"]
    ids = model.tokens.encode(torch.rand(2, 5, 7) * 2 - 1)
    scores = model.score(ims, texts, ids, mode)
    assert scores.shape == (2, 5) and (scores > 0).all()
    for n in range(2):
        for k in range(5):
            one = model.score(ims[n : n + 1], texts[n : n + 1], ids[n : n + 1, k : k + 1], mode)
            torch.testing.assert_close(one[0, 0], scores[n, k], rtol=1e-4, atol=1e-6)
    # and equals p_theta(a_7 | s, a_<7) from an uncached forward
    last = model.tokens.id_to_index(ids[0, :, -1])
    full = model.q.action_logits(model.q.prefix(ims[:1].expand(5, -1, -1, -1), texts[:1] * 5), ids[0, :, :-1])
    p = full[:, -1, 1:].softmax(-1)[torch.arange(5), last]
    if mode == "ratio":
        pi = model.pi.action_logits(model.pi.prefix(ims[:1].expand(5, -1, -1, -1), texts[:1] * 5), ids[0, :, :-1])
        p = p / pi[:, -1, 1:].softmax(-1)[torch.arange(5), last]
    else:
        assert (scores <= 1).all()
    torch.testing.assert_close(scores[0], p, rtol=1e-4, atol=1e-6)


def test_polyak_update() -> None:
    m = tiny_qsft_model(1)
    with torch.no_grad():
        for p in m.q.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.q_target.parameters()]
    m.update_target(0.25)
    for old, new, online in zip(before, m.q_target.parameters(), m.q.parameters(), strict=True):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * online)


def test_backup_diagnostic_orders_its_estimates(model: QSFTModel) -> None:
    """benchmarks/qsft_backup.py: the max is never below the double, pi_phi's top or a supported data token."""
    from benchmarks.qsft_backup import backup_estimates, summarise

    data = batch()
    est = backup_estimates(model, data, floor=0.001)
    assert all(v.shape == (4, 6) for v in est.values())
    assert (est["max"] >= est["double"] - 1e-6).all() and (est["max"] >= est["pi_top"] - 1e-6).all()
    supported = est["data_token_supported"] == 1
    assert (est["max"][supported] >= est["data_token"][supported] - 1e-6).all()
    # the data token's ratio, recomputed by hand for token state after token 2 (row 3), transition 1
    ids = model.tokens.encode(data["action"])
    index = model.tokens.id_to_index(ids)
    with torch.no_grad():
        pi = model.pi.action_logits(model.pi.prefix(data["image"], data["instruction"]), ids[:, :-1])
        target = model.q_target.action_logits(model.q_target.prefix(data["image"], data["instruction"]), ids[:, :-1])
    a = index[1, 3]
    expected = log_q(target, model.labels)[1, 3, a].exp() / pi[1, 3, 1:].softmax(-1)[a]
    torch.testing.assert_close(est["data_token"][1, 2], expected)
    summary = summarise({k: v.numpy() for k, v in est.items()}, torch.tensor([0.1, 0.2, 0.3, 0.4]).numpy())
    assert summary["max"]["mean"] >= summary["double"]["mean"] and len(summary["by_token_state"]) == 6
    assert math.isclose(summary["max"]["mean_minus_mc_return"], summary["max"]["mean"] - 0.25, rel_tol=1e-5)
    unknown = summarise({k: v.numpy() for k, v in est.items()}, None)  # returns not in Q-SFT's units
    assert unknown["mc_return"] is None and "mean_minus_mc_return" not in unknown["max"]


def test_selection_diagnostic_rules_and_statistics(model: QSFTModel) -> None:
    """benchmarks/qsft_selection.py: the four rules are distributions; temperature 0.5 and the rule are the
    hand-computed ones; beta 0 makes the rule pi_phi; the statistics reduce them per transition."""
    from benchmarks.qsft_selection import RULES, rule_log_probs, summarise, token_statistics

    data = batch()
    rules = rule_log_probs(model, data, beta=30.0)
    assert set(rules) == set(RULES) and all(v.shape == (4, 7, 256) for v in rules.values())
    for logp in rules.values():
        torch.testing.assert_close(logp.exp().sum(-1), torch.ones(4, 7))
    ids = model.tokens.encode(data["action"])
    with torch.no_grad():
        pi = model.pi.action_logits(model.pi.prefix(data["image"], data["instruction"]), ids[:, :-1])[..., 1:]
        q = log_q(model.q.action_logits(model.q.prefix(data["image"], data["instruction"]), ids[:, :-1]), model.labels)
    torch.testing.assert_close(rules["t05"], (2 * pi).log_softmax(-1))
    torch.testing.assert_close(rules["qsft"], (pi.log_softmax(-1) + 30.0 * q.exp()).log_softmax(-1))
    torch.testing.assert_close(rules["control"], (pi.log_softmax(-1) + 30.0 * pi.softmax(-1)).log_softmax(-1))
    flat = rule_log_probs(model, data, beta=0.0)
    torch.testing.assert_close(flat["qsft"], flat["pi"])
    index = model.tokens.id_to_index(ids)
    stats = token_statistics(flat, index)
    assert all(v.shape == (4,) for v in stats.values())
    assert torch.allclose(stats["qsft_reweight"], torch.zeros(4), atol=1e-5) and (stats["tv_qsft_pi"] < 1e-5).all()
    assert (stats["t05_entropy"] < stats["pi_entropy"]).all()  # a lower temperature sharpens
    summary = summarise({k: v.numpy() for k, v in token_statistics(rules, index).items()},
                        torch.tensor([1, 0, 1, -1]).numpy(), torch.tensor([0, 0, 1, 1]).numpy())  # fmt: skip
    assert summary["transitions"] == 4 and summary["success_fraction"] == pytest.approx(2 / 3)
    assert set(summary["qsft"]) == {"entropy", "p_top", "p_data", "reweight_auc"} and "tv_to_qsft" in summary["pi"]


def batchnorm_model() -> QSFTModel:
    """A Q-SFT model on a ResNet vision encoder (BatchNorm) whose running statistics differ from any one
    batch's: pi_phi, p_theta and the target are three equal copies."""
    from tests.policies.conftest import IMAGE_SIZE
    from tests.qsft.helpers import qsft_config

    torch.manual_seed(0)
    cfg = qsft_config("policy.model.vla.vision.arch=resnet10t")
    cfg.policy.model.vla.vision.kwargs = {}  # drop the tiny ViT's options (img_size, depth, ...): a ResNet takes none
    m = QSFTModel.create(cfg.policy.model, IMAGE_SIZE)
    with torch.no_grad():
        m.pi.train()
        for seed in range(3):
            m.pi.prefix(images(8, 50 + seed).float().mul(0.5).to(torch.uint8), INSTRUCTIONS * 2)
        m.q.load_state_dict(m.pi.state_dict())
        m.q_target.load_state_dict(m.pi.state_dict())
    return m


def running_statistics(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


def test_a_batchnorm_pi_phi_gives_the_backup_its_eval_mode_values() -> None:
    """The target runs in eval mode, so pi_phi's values in the backup's ratio must too: with BatchNorm (a
    ResNet vision encoder), train-mode batch statistics gave a ratio above 1 where the weights are equal.
    A frozen pi_phi stays in eval mode and its statistics never move."""
    m = batchnorm_model()
    assert m.pi_mode_dependent and not tiny_qsft_model(0).pi_mode_dependent  # ResNet: BatchNorm; tiny ViT: neither
    data = batch()
    m.eval()
    with torch.no_grad():
        reference = m.losses(data, 0.9, 0.01, train_behaviour=True)[2]
    m.train()
    joint = m.losses(data, 0.9, 0.01, train_behaviour=True)[2]
    for name in ("target", "target_last", "target_clipped", "ratio_support"):
        torch.testing.assert_close(joint[name], reference[name], rtol=1e-5, atol=1e-6)
    assert m.pi.training  # joint: pi_phi trains (its SFT pass keeps batch statistics)

    m.freeze_behaviour()  # (pi_phi's training pass above moved its statistics: a new eval-mode reference)
    with torch.no_grad():
        reference = m.eval().losses(data, 0.9, 0.01, train_behaviour=False)[2]
    m.train()
    assert not m.pi.training and m.q.training and not m.q_target.training
    before = running_statistics(m.pi)
    frozen = m.losses(data, 0.9, 0.01, train_behaviour=False)[2]
    assert before and all(torch.equal(v, m.pi.state_dict()[k]) for k, v in before.items())
    torch.testing.assert_close(frozen["target"], reference["target"], rtol=1e-5, atol=1e-6)


def test_a_batchnorm_p_theta_chooses_the_double_backup_token_in_eval_mode() -> None:
    """backup=double with BatchNorm in p_theta: the online choice reads eval-mode values, as the target's
    and pi_phi's are (the targets equal an eval-mode step's), and p_theta's running statistics move once,
    with its training pass, as under backup=max (an extra train-mode forward over s' moved them twice)."""
    import copy

    m = batchnorm_model()
    with torch.no_grad():  # a p_theta unlike pi_phi and the target
        for p in m.q.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert m.q_mode_dependent
    m.freeze_behaviour()
    data = batch()
    with torch.no_grad():
        reference = m.eval().losses(data, 0.9, 0.01, train_behaviour=False, backup="double")[2]
    twin = copy.deepcopy(m).train()
    m.train()
    double = m.losses(data, 0.9, 0.01, train_behaviour=False, backup="double")[2]
    for name in ("target", "target_last", "target_clipped", "ratio_support"):
        torch.testing.assert_close(double[name], reference[name], rtol=1e-5, atol=1e-6)
    twin.losses(data, 0.9, 0.01, train_behaviour=False, backup="max")
    after, expected = running_statistics(m.q), running_statistics(twin.q)
    assert after and all(torch.equal(v, expected[k]) for k, v in after.items())
    assert any(not torch.equal(v, running_statistics(m.q_target)[k]) for k, v in after.items())  # they did move
