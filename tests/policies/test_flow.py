"""The flow-matching chunked policy: loss masking, the Euler integrator, K samples, chunk execution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from configs.errors import UserError
from policies.chunking import ActionChunker
from policies.flow import FlowModel
from tests.policies.conftest import IMAGE_SIZE, tiny_model_config

CHUNK = 4


@pytest.fixture(scope="module")
def model() -> FlowModel:
    torch.manual_seed(0)
    return FlowModel.create(tiny_model_config("flow").policy.model, IMAGE_SIZE).eval()


def batch(n: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    mask = torch.ones(n, CHUNK, dtype=torch.bool)
    mask[0, 2:] = False  # the episode ended after 2 steps
    return {
        "image": torch.from_numpy(rng.integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)),
        "instruction": ["reach forward", "go"] * (n // 2),
        "action_chunk": torch.from_numpy(rng.uniform(-1, 1, (n, CHUNK, 7)).astype(np.float32)) * mask[..., None],
        "action_chunk_mask": mask,
    }


def test_loss_ignores_steps_past_the_episode_end(model: FlowModel) -> None:
    b = batch()
    loss, _ = model.loss(b, torch.Generator().manual_seed(0))
    b["action_chunk"][0, 2:] = 5.0  # padding content must not matter
    same, _ = model.loss(b, torch.Generator().manual_seed(0))
    b["action_chunk"][0, 1] = 5.0  # a valid step must
    other, _ = model.loss(b, torch.Generator().manual_seed(0))
    assert torch.equal(loss, same) and not torch.equal(loss, other)


def test_euler_integration_lands_on_the_target_of_the_conditional_flow(model: FlowModel, monkeypatch) -> None:
    """With v(x, t) = (a - x) / (1 - t) (the straight path to a), Euler steps from t = 0 end exactly at a."""
    target = torch.linspace(-0.9, 0.9, CHUNK * 7).view(CHUNK, 7)
    seen_t = []

    def velocity(cond: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen_t.append(float(t[0]))
        return (target - x) / (1 - t[:, None, None])

    monkeypatch.setattr(model, "velocity", velocity)
    b = batch(2)
    out = model.sample(b["image"], b["instruction"], 5, torch.Generator().manual_seed(0), steps=4)
    assert out.shape == (2, 5, CHUNK, 7)
    torch.testing.assert_close(out, target.expand(2, 5, CHUNK, 7), atol=1e-5, rtol=0)
    assert seen_t == [0.0, 0.25, 0.5, 0.75]


def test_k_samples_share_one_encoding_and_differ_by_their_noise(model: FlowModel, monkeypatch) -> None:
    b = batch(2)
    calls = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda *a: calls.append(len(a[1])) or encode(*a))
    out = model.sample(b["image"], b["instruction"], 10, torch.Generator().manual_seed(0))
    assert calls == [2]  # one trunk pass for the 2 observations, not 20
    assert out.shape == (2, 10, CHUNK, 7) and torch.isfinite(out).all()
    assert out[0].std(0).min() > 0  # K distinct samples
    zero = model.sample(b["image"], b["instruction"], 3, torch.Generator().manual_seed(0), noise_scale=0.0)
    torch.testing.assert_close(zero[:, 0], zero[:, 1])  # no noise: the flow's deterministic path


def test_training_learns_instruction_conditioned_chunks() -> None:
    """Targets +0.5 for "reach forward" and -0.5 for "go": after 120 steps the samples follow the instruction."""
    torch.manual_seed(0)
    model = FlowModel.create(tiny_model_config("flow").policy.model, IMAGE_SIZE)
    b = batch(4)
    b["action_chunk"][:] = torch.tensor([0.5, -0.5, 0.5, -0.5])[:, None, None]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def held_out_loss() -> float:  # the same noise and times before and after training
        return float(model.loss(b, torch.Generator().manual_seed(5))[0].detach())

    before = held_out_loss()
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        loss, _ = model.loss(b, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_out_loss() < 0.6 * before
    samples = model.eval().sample(b["image"][:2], b["instruction"][:2], 32, torch.Generator().manual_seed(1))
    assert samples[0].mean() > 0.25 and samples[1].mean() < -0.25


# --- chunk execution ------------------------------------------------------------------------------


def chunk(start: float) -> np.ndarray:
    """A (4, 7) chunk whose row i is filled with start + i."""
    return np.repeat((start + np.arange(CHUNK, dtype=np.float32))[:, None], 7, axis=1)


def test_receding_horizon_executes_the_chunk_then_replans() -> None:
    c = ActionChunker(CHUNK, exec_horizon=3)
    assert c.needs_prediction(0)
    c.push(0, chunk(10))
    firsts = []
    for _ in range(3):
        assert not c.needs_prediction(0) or not firsts
        out = c.next(0)
        assert out.shape == (CHUNK, 7)
        firsts.append(out[0, 0])
    assert firsts == [10, 11, 12] and c.needs_prediction(0)
    assert c.next(0)[:, 0].tolist() == [13, 13, 13, 13]  # past the horizon: what is left, last action held
    c.reset(0)
    assert c.needs_prediction(0)


def test_temporal_ensemble_averages_what_recent_chunks_planned_for_now() -> None:
    c = ActionChunker(CHUNK, ensemble=True, ensemble_temp=0.0)
    c.push(0, chunk(0))  # planned 0, 1, 2, 3 for steps t .. t+3
    assert c.next(0)[0, 0] == 0
    c.push(0, chunk(10))  # at t+1: the first planned 1, the new one 10
    assert c.next(0)[0, 0] == pytest.approx(5.5)
    c.push(0, chunk(20))  # at t+2: 2, 11, 20
    out = c.next(0)
    assert out[0, 0] == pytest.approx(11.0) and out[1:, 0].tolist() == [21, 22, 23]
    w = ActionChunker(CHUNK, ensemble=True, ensemble_temp=1.0)
    w.push(0, chunk(0))
    w.next(0)
    w.push(0, chunk(10))
    assert w.next(0)[0, 0] == pytest.approx((1 + np.exp(-1) * 10) / (1 + np.exp(-1)))  # the oldest weighs 1


def test_chunker_slots_are_independent_and_options_checked() -> None:
    c = ActionChunker(CHUNK, exec_horizon=2)
    c.push(0, chunk(0))
    c.push(1, chunk(100))
    assert c.next(1)[0, 0] == 100 and c.next(0)[0, 0] == 0 and c.next(0)[0, 0] == 1
    c.reset(0)
    assert c.needs_prediction(0) and c.next(1)[0, 0] == 101
    with pytest.raises(UserError, match="exec_horizon"):
        ActionChunker(CHUNK, exec_horizon=5)
    with pytest.raises(UserError, match="ensembl"):
        ActionChunker(CHUNK, exec_horizon=2, ensemble=True)


def test_flow_policy_replans_every_exec_horizon_steps_per_slot(tmp_path, monkeypatch) -> None:
    from policies.base import make_policy
    from tests.policies.conftest import contract_config, observation

    cfg = contract_config("flow", tmp_path)
    cfg.exec_horizon = 2
    policy = make_policy(cfg)
    calls = []
    sample = policy.model.sample
    monkeypatch.setattr(
        policy.model, "sample", lambda imgs, texts, *a, **kw: calls.append(len(texts)) or sample(imgs, texts, *a, **kw)
    )
    policy.reset("reach forward", 0)
    policy.reset("go", 1)
    o = [observation(0), observation(1, "go")]
    first = policy.act_batch(o, [0, 1])
    assert calls == [2]
    policy.reset("go", 1)  # a new episode in slot 1 only: slot 1 re-plans, slot 0 executes its chunk
    second = policy.act_batch(o, [0, 1])
    assert calls == [2, 1]
    np.testing.assert_array_equal(second[0, :-1], first[0, 1:])  # the same chunk, one step on
    np.testing.assert_array_equal(second[0, -1], first[0, -1])  # rows past its end hold the last action
    policy.act_batch(o, [0, 1])
    assert calls == [2, 1, 1]  # slot 0's horizon is over, slot 1 is one step into its chunk


def test_counting_image_tokens_leaves_batch_norm_statistics_alone() -> None:
    """FlowModel counts its image tokens with a blank image when it is built; a training-mode batch
    norm would move its running statistics (pretrained ones too) and fail on a 1x1 map of one image."""
    from policies.config import VisionConfig
    from policies.vision import VisionEncoder

    torch.manual_seed(0)
    encoder = VisionEncoder(VisionConfig(arch="resnet10t"), image_size=32)  # a 1x1 feature map
    stats = {k: v.clone() for k, v in encoder.state_dict().items() if "running" in k}
    assert encoder.training and encoder.num_tokens() == 1 and encoder.training
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in stats.items())
