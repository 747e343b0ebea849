"""Per-step latency of a policy alone vs the same policy steered by a critic (V-GPS), K in {1, 10, 50, 100}.

    python benchmarks/steer_latency.py                                 # auto device, flow policy, ResNet-34 critic @256
    python benchmarks/steer_latency.py --cuda-graphs                   # the critic replayed as one CUDA graph
    python benchmarks/steer_latency.py --policy vla --policy-size tiny
    python benchmarks/steer_latency.py --device cpu --critic-arch resnet18 --critic-size 128 --policy-size tiny \\
        --policy-image-size 64 --ks 1 10 50 --iters 5 --warmup 2 --label "CPU smoke run"

Models are randomly initialised (latency does not depend on the weights): the policy is a `flow` or
`vla` checkpoint written to a temporary directory from its default (or `--policy-size tiny`)
architecture and loaded with `make_policy`, as eval_sim loads it; the critic is built in-process
from the value config (`values.critic.random_critic`: FiLM ResNet, GroupNorm, coordinate channels,
2 heads [256, 256], V-GPS's network). One observation per step (a 256 px frame), milliseconds:

- policy:            `policy.act(obs)`, one sample (the base policy alone),
- steered[K]:        `ValueSteeredPolicy(policy, critic, K).act(obs)`: K samples in one batch, critic
                     scores of their first actions, argmax; and its ratio to `policy` (on a GPU the
                     critic's encoder runs on a side stream, alongside the policy: `overlap`),
- steered_serial[K]: the same with the encoder on the main stream, before the policy (GPU only),
- policy_sample[K]:  `policy.sample_actions(obs, K)` alone, the base policy's share of steered[K]
                     (what remains is the critic and the choice),
- critic_score_50:   `CriticScorer.score(obs, 50 actions)`: host -> device, encode the image once,
                     the heads over 50 actions, scores back to the host,
- critic_encoder / critic_heads_50: those two parts alone, on device tensors.

Goal (issue 5, GPU): steered[50] <= 1.05 x policy and critic_score_50 <= 2 ms. V-GPS reports
1.28x at K=10 and 1.59x at K=50 on Octo-small (75 ms/step).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = {  # a small policy: a quick CPU check of the benchmark itself
    "flow": ["policy.model.vision.arch=resnet10t", "policy.model.width=64", "policy.model.layers=2",
             "policy.model.heads=2", "policy.model.head_hidden=64", "policy.model.head_blocks=1"],
    "vla": ["policy.model.vision.arch=resnet10t", "policy.model.lm.hidden_size=64", "policy.model.lm.layers=2",
            "policy.model.lm.heads=2"],
}  # fmt: skip


def fake_stats(seed: int = 0) -> dict:
    """Statistics of cm-scale random actions (the normalisers need some; latency does not care which)."""
    from data.normalize import dataset_statistics

    rng = np.random.default_rng(seed)
    actions = np.concatenate([rng.normal(0, 0.01, (1000, 6)), rng.integers(0, 2, (1000, 1))], axis=1)
    return dataset_statistics(actions, rng.normal(size=(1000, 7)), 10)


def build_policy(name: str, size: str, image_size: int, device: str, root: Path):
    """A random-init `name` policy checkpoint in `root`, loaded through the registry."""
    from hydra import compose, initialize_config_dir

    from configs import CONFIG_DIR
    from configs.schema import register
    from policies.base import _import_policy_modules, make_policy
    from policies.learned import MODELS, save_policy_checkpoint

    register()
    _import_policy_modules()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("train_policy", overrides=[f"policy={name}", *(TINY[name] if size == "tiny" else [])])
    model = MODELS.get(name).create(cfg.policy.model, image_size)
    meta = {"policy": name, "image_size": image_size, "chunk": model.chunk, "normalization": "bounds_q99"}
    save_policy_checkpoint(root, 0, model, {}, cfg, {"sim": fake_stats()}, meta)
    cfg.policy.checkpoint, cfg.policy.device = str(root), device
    return make_policy(cfg.policy), sum(p.numel() for p in model.parameters())


def build_critic(args: argparse.Namespace, device: str):
    from values.config import EncoderConfig, ValueConfig
    from values.critic import random_critic

    cfg = ValueConfig(algo="calql", encoder=EncoderConfig(arch=args.critic_arch))
    critic = random_critic(cfg, fake_stats(), args.critic_size, device=device, bf16=args.bf16,
                           cuda_graphs=args.cuda_graphs)  # fmt: skip
    if args.compile:  # in place, as train_value compile=true does (values/train.py compile_encoders)
        critic.critic.encoder.compile()
    return critic, sum(p.numel() for p in critic.critic.parameters())


def timed(fn: Callable[[], object], iters: int, warmup: int, sync: Callable[[], None]) -> dict[str, float]:
    """Milliseconds per call: mean, std, p50, p90, min over `iters` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    t = np.array(times)
    return {"mean": float(t.mean()), "std": float(t.std()), "p50": float(np.percentile(t, 50)),
            "p90": float(np.percentile(t, 90)), "min": float(t.min()), "n": iters}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    import torch

    from policies.learned import resolve_device
    from policies.steering import ValueSteeredPolicy

    if args.threads:
        torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rng = np.random.default_rng(0)
    obs = {"image_primary": rng.integers(0, 256, (args.image_size,) * 2 + (3,), dtype=np.uint8),
           "instruction": "put the spoon on the towel"}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        policy, policy_params = build_policy(args.policy, args.policy_size, args.policy_image_size, device, Path(tmp))
    critic, critic_params = build_critic(args, device)
    policy.reset(obs["instruction"])
    result = {"policy_ms": timed(lambda: policy.act(obs), args.iters, args.warmup, sync), "steered": {}}
    for k in args.ks:
        sample = timed(lambda k=k: policy.sample_actions(obs, k), args.iters, args.warmup, sync)
        result.setdefault("policy_sample", {})[str(k)] = {
            "ms": sample,
            "ratio": sample["mean"] / result["policy_ms"]["mean"],
        }
        steered = ValueSteeredPolicy(policy, critic, k=k, beta=0.0)
        steered.reset(obs["instruction"])
        ms = timed(lambda s=steered: s.act(obs), args.iters, args.warmup, sync)
        result["steered"][str(k)] = {"ms": ms, "ratio": ms["mean"] / result["policy_ms"]["mean"]}
        if critic.stream is not None:  # the same without the side stream
            stream, critic.stream = critic.stream, None
            ms = timed(lambda s=steered: s.act(obs), args.iters, args.warmup, sync)
            critic.stream = stream
            serial = result.setdefault("steered_serial", {})
            serial[str(k)] = {"ms": ms, "ratio": ms["mean"] / result["policy_ms"]["mean"]}
    result.update(critic_parts(critic, obs, args, sync))
    result["params"] = {"policy": policy_params, "critic": critic_params}
    cpu = f"cpu ({torch.get_num_threads()} threads)"
    result["device"] = torch.cuda.get_device_name() if device.startswith("cuda") else cpu
    return result


def critic_parts(critic, obs: dict, args: argparse.Namespace, sync: Callable[[], None]) -> dict:
    """critic_score_50 (the whole call), critic_encoder and critic_heads_50 (device tensors, no transfers)."""
    import torch

    actions = np.random.default_rng(1).normal(0, 0.01, (50, 7)).astype(np.float32)
    images = critic._images(torch.as_tensor(obs["image_primary"])[None].to(critic.device))
    lang = critic.language.get(obs["instruction"])[None]
    norm = torch.as_tensor(critic.normalizer.normalize(actions), device=critic.device)[None]
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=critic.bf16, cache_enabled=False)
    with torch.no_grad(), autocast:
        emb = critic.critic.embed(images, lang)
        encoder = timed(lambda: critic.critic.embed(images, lang), args.iters, args.warmup, sync)
        heads = timed(lambda: critic.critic.q_from_embedding(emb, norm), args.iters, args.warmup, sync)
    score = timed(lambda: critic.score(obs, actions).cpu(), args.iters, args.warmup, sync)
    return {"critic_score_50_ms": score, "critic_encoder_ms": encoder, "critic_heads_50_ms": heads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    parser.add_argument("--policy", default="flow", choices=["flow", "vla"])
    parser.add_argument("--policy-size", default="default", choices=["default", "tiny"])
    parser.add_argument("--policy-image-size", type=int, default=256, help="the policy's input size (it resizes)")
    parser.add_argument("--image-size", type=int, default=256, help="the observation's frame size")
    parser.add_argument("--critic-arch", default="resnet34", help="timm ResNet of the critic (V-GPS: resnet34)")
    parser.add_argument("--critic-size", type=int, default=256, help="the critic's input size (V-GPS: 256)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 10, 50, 100])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="critic autocast (GPU)")
    parser.add_argument("--cuda-graphs", action="store_true", help="replay the critic as CUDA graphs (GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the critic's encoder")
    parser.add_argument("--label", default="", help="a note stored with the results (e.g. 'CPU smoke run')")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "steer_latency.json"))
    args = parser.parse_args()
    import torch

    result = {
        "benchmark": "steer_latency",
        "label": args.label,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__},
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "label")},
        **run(args),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(report(result))
    print(f"wrote {out}")


def report(r: dict) -> str:
    c, p = r["config"], r["params"]
    lines = [
        f"{r['device']}: {c['policy']} ({c['policy_size']}, {p['policy'] / 1e6:.1f}M params) + {c['critic_arch']} "
        f"critic @{c['critic_size']} px ({p['critic'] / 1e6:.1f}M params)",
        f"  policy alone           {r['policy_ms']['mean']:8.2f} ms",
    ]
    for k, s in r["steered"].items():
        lines.append(f"  steered K={k:<4}         {s['ms']['mean']:8.2f} ms  ({s['ratio']:.2f}x)")
    for k, s in r.get("steered_serial", {}).items():
        lines.append(f"  serial  K={k:<4}         {s['ms']['mean']:8.2f} ms  ({s['ratio']:.2f}x)")
    for k, s in r.get("policy_sample", {}).items():
        lines.append(f"  policy sample K={k:<4}   {s['ms']['mean']:8.2f} ms  ({s['ratio']:.2f}x)")
    for key in ("critic_score_50_ms", "critic_encoder_ms", "critic_heads_50_ms"):
        lines.append(f"  {key[:-3]:<22} {r[key]['mean']:8.2f} ms")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
