"""The CUDA paths: the same numbers as on the CPU where the maths is the same, finite and close under bf16.

Marked `gpu` and skipped without a CUDA device (CI has none): `pytest -m gpu` on a GPU machine. Every
test here needs no TensorFlow and no MuJoCo, so it runs in a bare PyTorch image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.values.helpers import small_value_config, value_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def exact_fp32() -> Any:
    """TF32 off, so that float32 on the GPU is comparable with float32 on the CPU."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def test_critic_q_on_cuda_matches_cpu_and_bf16_stays_close() -> None:
    from values.networks import Critic, FiLMResNet

    cfg = small_value_config("calql")
    torch.manual_seed(0)
    cpu = Critic(FiLMResNet(cfg.encoder, 32), cfg.hidden, cfg.ensemble).eval()
    gpu = Critic(FiLMResNet(cfg.encoder, 32, channels_last=True), cfg.hidden, cfg.ensemble).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda().to(memory_format=torch.channels_last)
    b = value_batch(16, 64, "cpu")
    with torch.no_grad():
        q_cpu = cpu.q(b["image"], b["lang"], b["action"])
        args = [b[k].cuda() for k in ("image", "lang", "action")]
        q_gpu = gpu.q(*args).cpu()
        with torch.autocast("cuda", torch.bfloat16):
            q_bf16 = gpu.q(*args).float().cpu()
    assert q_cpu.shape == (2, 16)
    torch.testing.assert_close(q_gpu, q_cpu, rtol=1e-4, atol=1e-4)
    assert (q_bf16 - q_cpu).abs().max() <= 0.05 * q_cpu.abs().max() + 1e-2


def test_group_norm_stays_bf16_under_cuda_autocast() -> None:
    """CUDA autocast runs torch's group_norm in float32 (a cast up before it and back at the next
    convolution); the encoder's GroupNorm keeps bf16 and stays close to the float32 result."""
    from values.networks import GroupNorm

    torch.manual_seed(0)
    norm = GroupNorm(4, 8).cuda()
    x = torch.randn(2, 8, 5, 5, device="cuda") * 3 + 1
    with torch.autocast("cuda", torch.bfloat16):
        assert torch.nn.functional.group_norm(x.bfloat16(), 4).dtype == torch.float32  # why GroupNorm exists
        y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), norm(x), rtol=2e-2, atol=3e-2)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("algo", ["calql", "iql"])
def test_agent_updates_on_cuda_with_bf16(algo: str, channels_last: bool) -> None:
    """The trainer's GPU settings (bf16 autocast; NCHW by default, channels_last as an option): finite
    metrics, float32 master weights that move, and two identical agents stay identical (the step's
    random draws come from a per-step CUDA generator)."""
    from values.train import make_agent

    def agent() -> Any:
        torch.manual_seed(0)
        a = make_agent(small_value_config(algo), 32, 0.98, seed=3, channels_last=channels_last).cuda()
        a.autocast = True
        return a.to(memory_format=torch.channels_last) if channels_last else a

    first, second = agent(), agent()
    before = [p.detach().clone() for p in first.parameters()]
    for step in range(3):
        batch = value_batch(16, 64, "cuda", seed=step)
        m1, m2 = first.update(batch), second.update(batch)
        assert all(np.isfinite(v) for v in m1.values()), m1
        for name in m1:
            assert m1[name] == pytest.approx(m2[name], rel=1e-3, abs=1e-4), name
    after = list(first.parameters())
    assert all(p.dtype == torch.float32 and p.is_cuda for p in after)
    assert any(not torch.equal(b, a.detach()) for b, a in zip(before, after, strict=True))


def test_compiled_encoders_train_like_eager_ones_and_keep_checkpoint_keys() -> None:
    """train_value compile=true (values/train.py compile_encoders): the compiled agent's updates match the
    eager agent's (float32, TF32 off), and its state dict has the eager keys (load_critic reads it)."""
    from values.train import compile_encoders, make_agent

    def agent() -> Any:
        torch.manual_seed(0)
        return make_agent(small_value_config("calql", "resnet10t"), 32, 0.98, seed=3, channels_last=False).cuda()

    eager, compiled = agent(), agent()
    compile_encoders(compiled)
    for step in range(2):
        batch = value_batch(8, 64, "cuda", seed=step)
        m1, m2 = eager.update(batch), compiled.update(batch)
        for name in m1:
            assert m2[name] == pytest.approx(m1[name], rel=1e-3, abs=1e-4), name
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for key, value in eager.state_dict().items():
        if isinstance(value, torch.Tensor):  # (also the optimiser's and scheduler's state dicts, the step)
            torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-3, atol=1e-4)


def test_steering_scores_on_cuda_match_cpu_with_bf16_and_cuda_graphs_close() -> None:
    from tests.policies.conftest import fake_stats
    from values.critic import random_critic

    cfg, stats = small_value_config("calql"), fake_stats()["sim"]
    rng = np.random.default_rng(0)
    obs = {"image_primary": rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), "instruction": "lift the cube"}
    actions = np.concatenate([rng.normal(0, 0.01, (50, 6)), rng.integers(0, 2, (50, 1))], axis=1).astype(np.float32)

    def scores(**kwargs: Any) -> np.ndarray:
        critic = random_critic(cfg, stats, 64, seed=5, **kwargs)
        return np.asarray(critic.score(obs, actions).cpu(), dtype=np.float64)

    cpu, gpu = scores(), scores(device="cuda")
    bf16, graphs = scores(device="cuda", bf16=True), scores(device="cuda", bf16=True, cuda_graphs=True)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-4)
    spread = np.ptp(cpu) + 1e-6
    assert np.abs(bf16 - cpu).max() <= 0.1 * spread + 0.02 * np.abs(cpu).max()
    np.testing.assert_allclose(graphs, bf16, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_steering_side_stream_scores_equal_the_serial_ones(cuda_graphs: bool) -> None:
    """The encoder on the side stream (overlap) gives the serial scores, step after step, while the
    main stream is kept busy by a long matmul chain between embed_batch and score_embedded (a missing
    wait or a reused buffer would show as wrong or stale scores)."""
    from tests.policies.conftest import fake_stats
    from values.critic import random_critic

    cfg, stats = small_value_config("calql"), fake_stats()["sim"]
    rng = np.random.default_rng(1)
    overlap = random_critic(cfg, stats, 64, device="cuda", seed=5, cuda_graphs=cuda_graphs)  # fp32: no ties
    serial = random_critic(cfg, stats, 64, device="cuda", seed=5, cuda_graphs=cuda_graphs, overlap=False)
    assert overlap.stream is not None and serial.stream is None
    busy = torch.randn(2048, 2048, device="cuda")
    for _ in range(4):
        obs = [{"image_primary": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "instruction": "lift the cube"}
               for _ in range(3)]  # fmt: skip
        actions = rng.normal(0, 0.01, (3, 10, 7)).astype(np.float32)
        emb = overlap.embed_batch(obs)
        x = busy
        for _ in range(20):  # "the policy" on the main stream
            x = torch.tanh(x @ busy)
        got = overlap.score_embedded(emb, actions).cpu()
        want = serial.score_batch(obs, actions).cpu()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert want[:, 0].unique().numel() == 3  # each image its own embedding: a stale one would show


@pytest.mark.parametrize("name", ["flow", "vla"])
def test_own_generalists_sample_on_cuda(name: str, tmp_path: Path) -> None:
    from policies.base import make_policy
    from tests.policies.conftest import observation, tiny_checkpoint, tiny_model_config

    cfg = tiny_model_config(name).policy
    cfg.checkpoint, cfg.device = str(tiny_checkpoint(name, tmp_path)), "cuda"
    policy = make_policy(cfg)
    policy.reset("reach forward", 0, seed=7)
    samples = policy.sample_actions(observation(0), 10)
    assert samples.shape[0] == 10 and samples.shape[-1] == 7
    assert np.isfinite(samples).all()
    assert len({s.tobytes() for s in samples}) > 1  # K draws, not one copied
    # the episode's draws come from its own CUDA generator: the same batched next to another slot
    policy.reset("reach forward", 0, seed=7)
    policy.reset("go", 1, seed=8)
    batched = policy.sample_actions_batch([observation(0), observation(1, "go")], 10, [0, 1])[0]
    np.testing.assert_allclose(batched, samples, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_llama_stack_on_cuda_matches_transformers_in_fp32_and_bf16() -> None:
    """policies/llama_stack.py (fused decoding) on the GPU: fp32 equal to transformers' forward, bf16 autocast
    as close to it as transformers' own bf16 forward is."""
    from policies.llama_stack import LlamaStack
    from tests.policies.test_llama_stack import COLUMNS, llama, prefixes, reference

    lms = [llama(0).cuda(), llama(1).cuda()]
    embeds, mask = (x.cuda() for x in prefixes(2))
    ids = torch.randint(0, 40, (2, 3), device="cuda")
    stack = LlamaStack(lms, COLUMNS)
    state, _ = stack.prefill(embeds, mask, extra=3)
    out = stack.extend(state, ids)
    exact = [reference(lm, embeds[g], mask, ids)[:, 1:] for g, lm in enumerate(lms)]
    for g in range(2):
        torch.testing.assert_close(out[g], exact[g], rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", torch.bfloat16):
        state, _ = stack.prefill(embeds, mask, extra=3)
        bf16 = stack.extend(state, ids)
        refs = [reference(lm, embeds[g], mask, ids)[:, 1:].float() for g, lm in enumerate(lms)]
    for g in range(2):
        assert (bf16[g] - exact[g]).abs().max() <= 2 * (refs[g] - exact[g]).abs().max() + 1e-2


def test_vla_fused_sampling_on_cuda_equals_transformers(tmp_path: Path) -> None:
    from policies.learned import load_policy_model
    from tests.policies.conftest import tiny_checkpoint
    from tests.qsft.helpers import images

    model = load_policy_model(tiny_checkpoint("vla", tmp_path), "vla", "cuda").model
    imgs = images(3, 0).cuda()
    texts = ["reach forward", "go", "move the gripper to the red block"]
    a = model.sample(imgs, texts, 8, generator=torch.Generator("cuda").manual_seed(0))
    b = model.sample(imgs, texts, 8, generator=torch.Generator("cuda").manual_seed(0), fused=False)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-4)


def test_openvla_greedy_on_cuda_matches_cpu(tmp_path: Path) -> None:
    """The tiny OpenVLA checkpoint through the real loader: float32 greedy actions agree across devices;
    bf16 on the GPU gives valid actions."""
    from policies.base import make_policy
    from policies.openvla.tiny import write_tiny_checkpoint
    from tests.openvla.helpers import observation, openvla_config

    path = write_tiny_checkpoint(tmp_path / "openvla")
    obs = observation(0)
    actions = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "float32"), ("cuda", "bfloat16")):
        policy = make_policy(openvla_config(path, f"policy.device={device}", f"policy.dtype={dtype}"))
        policy.reset(obs["instruction"])
        actions[device, dtype] = policy.act(obs)
        k = policy.sample_actions(obs, 8)
        assert k.shape[0] == 8 and np.isfinite(k).all()
    np.testing.assert_allclose(actions["cuda", "float32"], actions["cpu", "float32"], atol=1e-5)
    assert np.isfinite(actions["cuda", "bfloat16"]).all()
