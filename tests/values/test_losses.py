"""Hand-computed reference values for every loss term, and network invariants."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import distributions as D

from data.augment import augment_pair
from tests.values.helpers import LANG_DIM, small_value_config, value_batch
from values.agent import UNIFORM_LOG_DENSITY, step_generator
from values.calql import (
    calql_lower_bound,
    cql_logsumexp,
    max_target_backup,
    sac_actor_loss,
    td_loss,
    td_target,
    temperature_loss,
)
from values.config import EncoderConfig
from values.iql import awr_loss, expectile_loss, q_loss
from values.language import HashEncoder
from values.metrics import average_ranks, matched_auc, spearman
from values.networks import (
    Actor,
    CoordStemConv,
    Critic,
    EnsembleMLP,
    FiLM,
    FiLMResNet,
    GroupNorm,
    coordinate_channels,
    soft_update,
)

T = torch.tensor


def test_td_target_and_max_backup() -> None:
    # two critics, two states, three sampled next actions
    target_q = T([[[1.0, 5.0, 2.0], [0.0, -1.0, -2.0]], [[2.0, 4.0, 3.0], [1.0, -3.0, 0.0]]])
    # min over critics: [[1, 4, 2], [0, -3, -2]] -> max over samples: [4, 0]
    assert max_target_backup(target_q).tolist() == [4.0, 0.0]
    y = td_target(T([-1.0, 0.0]), T([0.0, 1.0]), T([4.0, 0.0]), 0.98)
    assert y.tolist() == pytest.approx([-1 + 0.98 * 4, 0.0])
    # ((1 - 2)^2 + (3 - 0)^2 + (2 - 2)^2 + (0 - 0)^2) / 4 = 2.5
    assert td_loss(T([[1.0, 3.0], [2.0, 0.0]]), T([2.0, 0.0])).item() == pytest.approx(2.5)


def test_calql_bound() -> None:
    q_pi = T([[[-5.0, -1.0], [0.0, -10.0]]])  # (E=1, B=2, n=2)
    bounded, rate = calql_lower_bound(q_pi, T([-2.0, -3.0]))
    assert bounded.tolist() == [[[-2.0, -1.0], [0.0, -3.0]]]
    assert rate.item() == pytest.approx(0.5)  # two of four values were below their MC return


def test_cql_logsumexp_importance_sampled() -> None:
    q_rand, q_cur, q_next, q_data = T([[[0.0]]]), T([[[1.0]]]), T([[[2.0]]]), T([[3.0]])
    logp_cur, logp_next = T([[0.5]]), T([[1.0]])
    got = cql_logsumexp(q_rand, q_cur, logp_cur, q_next, logp_next, q_data, temp=1.0, importance_sample=True)
    want = math.log(math.exp(0.0 - 7 * math.log(0.5)) + math.exp(2.0 - 1.0) + math.exp(1.0 - 0.5))
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert pytest.approx(7 * math.log(0.5)) == UNIFORM_LOG_DENSITY
    plain = cql_logsumexp(q_rand, q_cur, logp_cur, q_next, logp_next, q_data, temp=2.0, importance_sample=False)
    want = 2 * math.log(sum(math.exp(v / 2) for v in (0.0, 3.0, 1.0, 2.0)))
    assert plain.item() == pytest.approx(want, rel=1e-6)


def test_actor_and_temperature_losses() -> None:
    log_alpha = torch.tensor(math.log(0.5), requires_grad=True)
    logp = T([[-1.0, 2.0]])  # (B=1, n=2)
    q_pi = T([[[1.0, 0.0]], [[3.0, -2.0]]])  # (E=2, B=1, n=2): min over critics [1, -2]
    # mean(0.5 * [-1, 2] - [1, -2]) = mean([-1.5, 3]) = 0.75
    assert sac_actor_loss(log_alpha, logp, q_pi).item() == pytest.approx(0.75)
    loss = temperature_loss(log_alpha, logp, target_entropy=-7.0)
    assert loss.item() == pytest.approx(-math.log(0.5) * ((-1 - 7) + (2 - 7)) / 2)
    loss.backward()  # d/dlog_alpha = -mean(logp + target_entropy) = 6.5: alpha grows when entropy is low
    assert log_alpha.grad.item() == pytest.approx(6.5)


def test_iql_losses() -> None:
    # diff = [1, -2], tau = 0.7: (0.7 * 1 + 0.3 * 4) / 2 = 0.95
    assert expectile_loss(T([1.0, -2.0]), 0.7).item() == pytest.approx(0.95)
    loss, target = q_loss(T([[0.0, 1.0]]), T([-1.0, 0.0]), T([0.0, 1.0]), T([2.0, 5.0]), 0.5)
    assert target.tolist() == [0.0, 0.0] and loss.item() == pytest.approx(0.5)
    loss, weight = awr_loss(T([0.0, math.log(2.0), 10.0]), T([-1.0, -2.0, -3.0]), 1.0)
    assert weight.tolist() == pytest.approx([1.0, 2.0, 100.0])  # exp(10) clipped at 100
    assert loss.item() == pytest.approx(-(1 * -1 + 2 * -2 + 100 * -3) / 3)


@pytest.mark.parametrize("actor_encoder", ["separate", "critic"])
def test_iql_bootstraps_from_the_target_value_network(actor_encoder: str) -> None:
    """V-GPS's gc_iql: Q's target is r + gamma (1 - terminal) Vbar(s'), Vbar a Polyak copy of V (rate 2e-3)."""
    from dataclasses import replace

    from values.iql import IQLAgent

    torch.manual_seed(0)
    agent = IQLAgent(replace(small_value_config("iql", "resnet10t"), actor_encoder=actor_encoder), LANG_DIM, 0.5, 0)
    data = value_batch(4, 32)
    _, before = agent.losses(data, torch.Generator().manual_seed(0))
    with torch.no_grad():
        agent.value_target.mlp.biases[-1].add_(10.0)  # Vbar(s') + 10: the target moves by gamma * 10 = 5
    _, after = agent.losses(data, torch.Generator().manual_seed(0))
    assert after["q_target"].item() == pytest.approx(before["q_target"].item() + 5.0, abs=1e-4)
    assert after["value_loss"].item() == pytest.approx(before["value_loss"].item())  # V itself is untouched
    v, vbar = agent.value.mlp.biases[-1].detach().clone(), agent.value_target.mlp.biases[-1].detach().clone()
    agent.after_step()
    rate = agent.cfg.target_update_rate
    torch.testing.assert_close(agent.value_target.mlp.biases[-1], vbar + rate * (v - vbar))
    # a checkpoint from before Vbar existed starts it as V
    old = {k: t for k, t in agent.state_dict().items() if not k.startswith("value_target.")}
    fresh = IQLAgent(replace(small_value_config("iql", "resnet10t"), actor_encoder=actor_encoder), LANG_DIM, 0.5, 1)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.value_target.mlp.biases[-1], agent.value.mlp.biases[-1])


def test_gradient_clipping_bounds_each_networks_norm() -> None:
    """grad_clip_norm (V-GPS IQL: 1.0): every optimiser group's gradient is clipped to that global norm."""
    from dataclasses import replace

    from values.iql import IQLAgent

    torch.manual_seed(0)
    agent = IQLAgent(replace(small_value_config("iql", "resnet10t"), grad_clip_norm=1e-3), LANG_DIM, 0.98, 0)
    agent.update(value_batch(4, 32))
    for group in agent.optimizer.param_groups:  # the gradients of the step are still there
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in group["params"] if p.grad is not None]))
        assert norm.item() == pytest.approx(1e-3, rel=1e-3)  # clipped (unclipped norms are far above 1e-3)


def test_tanh_gaussian_log_prob_matches_torch_distributions() -> None:
    actor = Actor(FiLMResNet(EncoderConfig(arch="resnet10t"), 8), [16], tanh_squash=True)
    mean, std = T([[0.3, -1.0, 2.0, 0.0, 0.5, -0.2, 4.0]]), T([[0.5, 1.0, 0.2, 2.0, 0.1, 1.5, 0.3]])
    a, logp = actor.sample(mean, std, n=5, generator=torch.Generator().manual_seed(0))
    reference = D.TransformedDistribution(D.Independent(D.Normal(mean, std), 1), [D.TanhTransform(cache_size=1)])
    u = torch.atanh(a.clamp(-1 + 1e-6, 1 - 1e-6))
    expected = D.Independent(D.Normal(mean, std), 1).log_prob(u) - torch.log1p(-a.pow(2) + 1e-12).sum(-1)
    assert a.shape == (5, 1, 7) and a.abs().max() < 1
    close = (a.abs() < 0.999).all(-1)  # atanh is ill-conditioned near +-1
    torch.testing.assert_close(logp[close], expected[close], rtol=1e-3, atol=1e-3)
    assert reference.log_prob(a[0]).shape == (1,)


def test_ensemble_members_are_independent_mlps() -> None:
    torch.manual_seed(0)
    mlp = EnsembleMLP(3, 5, [4], 2)
    x = torch.randn(6, 5)
    out = mlp(x)
    for e in range(3):
        h = torch.nn.functional.silu(x @ mlp.weights[0][e] + mlp.biases[0][e])
        torch.testing.assert_close(out[e], h @ mlp.weights[1][e] + mlp.biases[1][e])


def test_q_heads_stay_float32_under_bf16_autocast() -> None:
    """bf16 would round a Q near -40 to steps of 0.25 and tie the candidates steering ranks: the heads run
    in float32 under autocast, with the float32 result bit for bit, and close candidates stay distinct."""
    torch.manual_seed(0)
    critic = Critic(FiLMResNet(EncoderConfig(arch="resnet10t"), cond_dim=8), [16, 16], ensemble=2).eval()
    with torch.no_grad():
        critic.heads.biases[-1].fill_(-40.0)  # Qs near -40, of 10 candidates close together
        emb = torch.randn(1, critic.encoder.out_dim)
        actions = torch.linspace(0, 0.2, 10).view(1, 10, 1).expand(1, 10, 7).contiguous()
        reference = critic.q_from_embedding(emb, actions)
        with torch.autocast("cpu", torch.bfloat16):
            q = critic.q_from_embedding(emb, actions)
            assert torch.mm(emb, emb.T).dtype == torch.bfloat16  # autocast is on for other matmuls
    assert q.dtype == torch.float32 and torch.equal(q, reference)
    assert q[0, 0].unique().numel() == 10 and q.abs().min() > 39
    assert reference.bfloat16()[0, 0].unique().numel() < 10  # what bf16 heads would have returned


def test_critic_shapes_film_identity_and_batched_actions() -> None:
    torch.manual_seed(0)
    enc = FiLMResNet(EncoderConfig(arch="resnet10t"), cond_dim=8)
    critic = Critic(enc, [16, 16], ensemble=2).eval()
    images = torch.randint(0, 255, (3, 32, 32, 3), dtype=torch.uint8)
    lang, actions = torch.randn(3, 8), torch.rand(3, 4, 7) * 2 - 1
    with torch.no_grad():
        emb = critic.embed(images, lang)
        assert torch.equal(emb, critic.embed(images, torch.zeros(3, 8)))  # zero-init FiLM: no effect yet
        many = critic.q_from_embedding(emb, actions)
        assert many.shape == (2, 3, 4)
        for j in range(4):
            torch.testing.assert_close(many[:, :, j], critic.q(images, lang, actions[:, j]))
    params = sum(p.numel() for p in Critic(FiLMResNet(EncoderConfig(), 512), [256, 256], 2).parameters())
    assert params / 1e6 == pytest.approx(25.6, abs=0.1)  # V-GPS: 25.6M


@pytest.mark.parametrize("arch", ["resnet18", "resnet10t"])  # a 7x7 stem conv; timm's deep stem (Sequential)
def test_coordinate_channels_enter_through_the_stem_convolution(arch: str) -> None:
    """The stem convolution given RGB only equals the 5-channel convolution over [RGB, x, y] (V-GPS's
    input), with the same gradients, and keeps the 5-channel parameter (checkpoints unchanged)."""
    torch.manual_seed(0)
    enc = FiLMResNet(EncoderConfig(arch=arch), cond_dim=8)
    stem = enc.net.conv1[0] if isinstance(enc.net.conv1, torch.nn.Sequential) else enc.net.conv1
    assert isinstance(stem, CoordStemConv) and stem.weight.shape[1] == 5
    # the checkpoint is that of the same network without the swap: same keys, same shapes
    unswapped = FiLMResNet(EncoderConfig(arch=arch, coord_channels=False), cond_dim=8).state_dict()
    keys = [k for k, v in enc.state_dict().items() if v.shape != unswapped[k].shape]
    assert list(enc.state_dict()) == list(unswapped) and keys == [next(k for k in unswapped if "conv1" in k)]
    assert enc.state_dict()[keys[0]].shape[1] == 5 and unswapped[keys[0]].shape[1] == 3
    xy = coordinate_channels(6, 10, torch.device("cpu"))
    assert torch.equal(xy[0, 0, 3], torch.linspace(-1, 1, 10)) and torch.equal(xy[0, 1, :, 7], torch.linspace(-1, 1, 6))
    rgb = torch.randn(3, 3, 6, 10, requires_grad=True)
    five = torch.cat([rgb, xy.expand(3, -1, -1, -1)], dim=1)
    reference = torch.nn.functional.conv2d(five, stem.weight, None, stem.stride, stem.padding)
    out = stem(rgb)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    (ref_grad_w, ref_grad_x) = torch.autograd.grad(reference.square().sum(), [stem.weight, rgb])
    (grad_w, grad_x) = torch.autograd.grad(out.square().sum(), [stem.weight, rgb])
    torch.testing.assert_close(grad_w, ref_grad_w, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_x, ref_grad_x, rtol=1e-4, atol=1e-4)
    plain = FiLMResNet(EncoderConfig(arch=arch, coord_channels=False), cond_dim=8)
    assert not any(isinstance(m, CoordStemConv) for m in plain.modules())
    assert plain(torch.zeros(2, 16, 16, 3, dtype=torch.uint8), torch.zeros(2, 8)).shape == (2, plain.out_dim)


def test_film_scales_and_shifts_each_sample() -> None:
    torch.manual_seed(0)
    film = FiLM(3, 2)
    torch.nn.init.normal_(film.proj.weight)
    torch.nn.init.normal_(film.proj.bias)
    x, cond = torch.randn(2, 2, 4, 4), torch.randn(2, 3)
    gamma, beta = (cond @ film.proj.weight.T + film.proj.bias).chunk(2, dim=1)  # (B, C) each
    torch.testing.assert_close(film(x, cond), x * (1 + gamma[:, :, None, None]) + beta[:, :, None, None])


def test_group_norm_keeps_bf16_under_autocast() -> None:
    """float32: torch's GroupNorm exactly; under autocast a bf16 input stays bf16 (CUDA autocast would
    cast it to float32), close to the float32 result, with float32 gradients for the affine weights."""
    torch.manual_seed(0)
    norm = GroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 8, 5, 5) * 3 + 1
    reference = torch.nn.functional.group_norm(x, 4, norm.weight, norm.bias, norm.eps)
    assert torch.equal(norm(x), reference)
    low = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        y = norm(low)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference, rtol=2e-2, atol=3e-2)
    y.float().square().sum().backward()
    assert norm.weight.grad.dtype == torch.float32 and norm.weight.grad.abs().sum() > 0 and low.grad is not None
    assert isinstance(FiLMResNet(EncoderConfig(arch="resnet10t"), 8).net.layer1[0].bn1, GroupNorm)


@pytest.mark.parametrize("algo", ["calql", "iql"])
def test_next_state_pass_runs_without_gradient(algo: str) -> None:
    """The network read at s and s' (Cal-QL: the actor; IQL: V, and at s' its target Vbar) runs with a
    gradient over the B rows of s only; s' rows get a forward without one, so the backward does not run
    over 2B rows. Exact, because GroupNorm normalises each row on its own: one pass over 2B rows gives
    the same outputs."""
    from values.train import make_agent

    torch.manual_seed(0)
    agent = make_agent(small_value_config(algo, "resnet10t"), LANG_DIM, 0.98, seed=0, channels_last=False)
    net = agent.actor if algo == "calql" else agent.value
    calls: list[tuple[int, bool]] = []
    net.encoder.register_forward_hook(lambda m, args, out: calls.append((len(args[0]), torch.is_grad_enabled())))
    if algo == "iql":  # Vbar(s'): the same network's target copy (equal to V before the first update)
        hook = lambda m, args, out: calls.append((len(args[0]), torch.is_grad_enabled()))  # noqa: E731
        agent.value_target.encoder.register_forward_hook(hook)
    batch = value_batch(4, 32)
    metrics = agent.update(batch)
    assert calls == [(4, True), (4, False)] and all(np.isfinite(v) for v in metrics.values())
    with torch.no_grad():
        both = net(torch.cat([batch["image"], batch["next_image"]]), torch.cat([batch["lang"]] * 2))
        apart = [net(batch[k], batch["lang"]) for k in ("image", "next_image")]
    if algo == "calql":  # (mean, std)
        both, apart = torch.cat(both, -1), torch.cat([torch.cat(apart[0], -1), torch.cat(apart[1], -1)])
    else:
        apart = torch.cat(apart)
    torch.testing.assert_close(both, apart, rtol=1e-5, atol=1e-6)


def test_a_non_finite_loss_is_reported_with_its_step_without_a_sync_per_step() -> None:
    """A NaN reward at step 1: the updates without metrics go on (no device sync), the next one with
    metrics raises naming step 1, and so does check_finite; finite updates pass both."""
    from values.train import make_agent

    torch.manual_seed(0)
    agent = make_agent(small_value_config("calql", "resnet10t"), LANG_DIM, 0.98, seed=0, channels_last=False)
    good, bad = value_batch(4, 32), value_batch(4, 32)
    bad["reward"] = bad["reward"].clone()
    bad["reward"][2] = float("nan")
    agent.update(good, metrics=False)
    agent.check_finite()
    agent.update(bad, metrics=False)
    agent.update(good, metrics=False)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 1 .*not saved"):
        agent.check_finite()
    with pytest.raises(FloatingPointError, match="non-finite loss at step 1"):
        agent.update(good)


def test_check_finite_under_torchrun_raises_for_another_ranks_nan(monkeypatch) -> None:
    """Every rank joins one collective: a rank whose own losses were finite still stops (and saves
    nothing) when another rank's were not, since the averaged gradients carried the NaN to its weights."""
    import values.agent
    from configs.distributed import Distributed
    from values.train import make_agent

    agent = make_agent(small_value_config("calql", "resnet10t"), LANG_DIM, 0.98, seed=0, channels_last=False)
    agent.update(value_batch(4, 32), metrics=False)
    calls = []

    def other_rank_bad(values: dict, dist: Distributed) -> dict:
        calls.append(values)
        return {"bad": (values["bad"] + 1.0) / 2}  # this rank's flag and one bad other rank

    monkeypatch.setattr(values.agent, "mean_over_ranks", other_rank_bad)
    two = Distributed(rank=0, world=2, local_rank=0)
    with pytest.raises(FloatingPointError, match="another rank"):
        agent.check_finite(two)
    assert calls == [{"bad": 0.0}]
    agent.check_finite()  # alone, this rank's own losses are fine


@pytest.mark.parametrize("algo", ["calql", "iql"])
def test_actor_encoder_critic_shares_the_critic_embedding_without_training_it(algo: str) -> None:
    """value.actor_encoder=critic: the only encoder passes are the critic's over s (with a gradient) and
    the target's (s', and s for IQL in the same pass, without one); the actor's (and V's) losses send no gradient into
    the critic's encoder; an update trains, and a state dict restores it exactly."""
    from dataclasses import replace

    from configs.errors import UserError
    from values.networks import FiLMResNet
    from values.train import make_agent

    cfg = replace(small_value_config(algo, "resnet10t"), actor_encoder="critic")

    def agent() -> Any:
        torch.manual_seed(0)
        return make_agent(cfg, LANG_DIM, 0.98, seed=0, channels_last=False)

    first = agent()
    assert first.actor.encoder is None and (algo == "calql" or first.value.encoder is None)
    assert not any(k.startswith(("actor.encoder", "value.encoder")) for k in first.state_dict())
    calls: list[tuple[str, int, bool]] = []
    for name, module in first.named_modules():
        if isinstance(module, FiLMResNet):
            module.register_forward_hook(
                lambda m, args, out, name=name: calls.append((name, len(args[0]), torch.is_grad_enabled()))
            )
    batch = value_batch(4, 32)
    _, metrics = first.losses(batch, torch.Generator().manual_seed(0))
    expected = [("critic.encoder", 4, True), ("target.encoder", 8 if algo == "iql" else 4, False)]  # IQL: s and s'
    assert sorted(calls) == sorted(expected)
    encoder = list(first.critic.encoder.parameters())
    heads = ["actor_loss"] + (["value_loss"] if algo == "iql" else [])
    for name in heads:
        grads = torch.autograd.grad(metrics[name], encoder, allow_unused=True, retain_graph=True)
        assert all(g is None or not g.any() for g in grads), name
    assert any(g is not None and g.any() for g in torch.autograd.grad(metrics["critic_loss"], encoder))
    before = [p.detach().clone() for p in first.actor.parameters()]
    for step in range(2):
        assert all(np.isfinite(v) for v in first.update(value_batch(4, 32, seed=step)).values())
    assert any(not torch.equal(b, p) for b, p in zip(before, first.actor.parameters(), strict=True))
    second = agent()
    second.load_state_dict(first.state_dict())
    m1, m2 = first.update(value_batch(4, 32, seed=9)), second.update(value_batch(4, 32, seed=9))
    assert m1 == m2
    with pytest.raises(UserError, match="actor_encoder"):
        make_agent(replace(cfg, actor_encoder="shared"), LANG_DIM, 0.98, seed=0, channels_last=False)


def test_soft_update() -> None:
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    soft_update(a, b, 0.25)
    torch.testing.assert_close(a.weight, 0.75 * before + 0.25 * b.weight.detach())
    # a frozen source parameter (a LoRA base weight, say) is never averaged: only trained ones move
    b.bias.requires_grad_(False)
    weight, bias = a.weight.detach().clone(), a.bias.detach().clone()
    soft_update(a, b, 0.5)
    torch.testing.assert_close(a.weight, 0.5 * weight + 0.5 * b.weight.detach())
    assert torch.equal(a.bias, bias)


def test_metrics_reference_values() -> None:
    np.testing.assert_array_equal(average_ranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1, 3.5, 2])
    # t=0: success 2.0 vs failure 1.0 (win); t=1: success 0.0 vs failures 1.0 (loss) and 0.0 (tie)
    q = np.array([2.0, 1.0, 0.0, 1.0, 0.0])
    success = np.array([True, False, True, False, False])
    t = np.array([0, 0, 1, 1, 1])
    assert matched_auc(q, success, t) == pytest.approx((1 + 0 + 0.5) / 3)
    assert math.isnan(matched_auc(q, np.ones(5, bool), t))
    assert spearman(np.array([1.0, 2, 3]), np.array([10.0, 20, 30])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2, 3]), np.array([3.0, 2, 1])) == pytest.approx(-1.0)


def test_augmentation_is_deterministic_consistent_and_identity_at_zero() -> None:
    img = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    a1, b1 = augment_pair(img, img.clone(), step_generator(0, 5, torch.device("cpu")))
    a2, _ = augment_pair(img, img.clone(), step_generator(0, 5, torch.device("cpu")))
    assert torch.equal(a1, a2) and torch.equal(a1, b1)  # same step -> same result; s and s' alike
    assert a1.dtype == torch.uint8 and a1.shape == img.shape and not torch.equal(a1, img)
    same, _ = augment_pair(
        img, img, torch.Generator().manual_seed(1), scale=(1, 1), ratio=(1, 1), brightness=0.0,
        contrast=(1, 1), saturation=(1, 1), hue=0.0,
    )  # fmt: skip
    assert (same.int() - img.int()).abs().max() <= 1  # only colour-space round-off


def test_hash_language_encoder() -> None:
    enc = HashEncoder(dim=64)
    e = enc.embed(["pick up the cube", "pick up the cube", "pick up the red cube", "open the drawer"])
    np.testing.assert_array_equal(e[0], e[1])
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, rtol=1e-5)
    assert e[0] @ e[2] > e[0] @ e[3]  # shared words -> closer
    np.testing.assert_array_equal(HashEncoder(dim=64).embed(["pick up the cube"])[0], e[0])  # stable
