"""Q-SFT vs SFT on the same tokenized VLA: training step time and action-selection latency.

    python benchmarks/qsft_step.py                                   # auto device, the default VLA (policy=vla)
    python benchmarks/qsft_step.py --size tiny --device cpu --batch 16 --iters 5 --label "CPU smoke run"

Models are randomly initialised (time does not depend on the weights), built from the `qsft` policy
config, whose backbone is the `vla` policy's architecture. Milliseconds:

- sft_step:        one AdamW step of `VLAModel.loss` (train_policy.py's step), batch B,
- qsft_step:       one train_qsft step: p_theta over (s, a), pi_phi and the target over (s, a) and s'
                   (2B rows; pi_phi's s' prefix without a gradient), joint SFT of pi_phi, Polyak update;
                   and its ratio to sft_step,
- qsft_step_frozen: the same with pi_phi trained beforehand (train_qsft behaviour=frozen): pi_phi and
                   the target each one forward of 2B rows without a gradient, p_theta's step alone;
                   and its ratio to sft_step,
- prefix:          one model's `embed_prefix` of one observation (vision encoder, projector, prompt),
- lm_decode[K] / lm_decode_pair[K]: the language-model part of decoding alone (prefill of a given
                   prefix, K rows, 6 one-token steps) for one model / both Q-SFT models as one stack,
- sft_decode[K]:   `VLAModel.sample` of K actions for one observation (KV cache, 7 steps),
- qsft_select[K]:  `QSFTModel.select` of K actions (pi_phi and p_theta decoding in lockstep); and the ratio,
- critic_<mode>[K]: `QSFTModel.score` of K candidate actions (p_theta: one model; ratio: both).
Each of the last three twice: fused (the default: the Llama LMs run through policies/llama_stack.py,
both Q-SFT models as one stack) and `_hf` (transformers' forward, one model after the other).

Goal (issue 6, GPU): qsft_step <= 2 x sft_step and qsft_select <= 1.5 x sft_decode. Joint Q-SFT
does four forwards (p_theta and pi_phi over B rows with a gradient, pi_phi over B next prefixes, the
target over 2B rows) and two backwards where SFT does one of each (about 10 row-passes against 3,
counting a backward as two forwards); frozen, three forwards (B, 2B, 2B rows) and one backward (7
row-passes). Selection decodes two models, ~2x with `_hf`; fused, the two LMs cost about one in a
launch-bound regime, and what is left is the second vision encoder (`prefix`).
Writes benchmarks/results/qsft_step.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = [
    "policy.model.vla.vision.arch=resnet10t", "policy.model.vla.lm.hidden_size=64", "policy.model.vla.lm.layers=2",
    "policy.model.vla.lm.heads=2",
]  # fmt: skip


def timed(fn: Callable[[], object], iters: int, warmup: int, sync: Callable[[], None]) -> float:
    """Median milliseconds of fn over `iters` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", choices=["default", "tiny"], default="default")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--label", default="")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "qsft_step.json"))
    args = parser.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    from configs import CONFIG_DIR
    from configs.schema import register
    from policies.learned import resolve_device
    from policies.llama_stack import LlamaStack
    from policies.qsft.backbone import DUMMY_COLUMNS
    from policies.qsft.qsft import QSFTModel

    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("train_qsft", overrides=TINY if args.size == "tiny" else [])
    torch.manual_seed(0)
    model = QSFTModel.create(cfg.policy.model, args.image_size).to(device).train()
    sft = model.pi.net  # the SFT baseline: the same VLA, its own loss
    B, rng = args.batch, np.random.default_rng(0)
    frames = lambda n: torch.from_numpy(rng.integers(0, 256, (n, args.image_size, args.image_size, 3), np.uint8))  # noqa: E731
    batch = {
        "image": frames(B).to(device), "next_image": frames(B).to(device),
        "action": (torch.rand(B, 7) * 2 - 1).to(device), "reward": torch.zeros(B, device=device),
        "terminal": torch.zeros(B, device=device), "instruction": ["pick up the red cube"] * B,
    }  # fmt: skip
    autocast = device.type == "cuda"
    opt_sft = torch.optim.AdamW(sft.parameters(), lr=1e-5)
    opt_qsft = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    opt_q = torch.optim.AdamW([p for p in model.q.parameters() if p.requires_grad], lr=1e-5)

    def sft_step() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            loss, _ = sft.loss(batch)
        opt_sft.zero_grad(set_to_none=True)
        loss.backward()
        opt_sft.step()

    def qsft_step() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            q_loss, bc_loss, _ = model.losses(batch, 0.98, 1e-4)
        opt_qsft.zero_grad(set_to_none=True)
        (q_loss + bc_loss).backward()
        opt_qsft.step()
        model.update_target(0.005)

    def qsft_step_frozen() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            q_loss, _, _ = model.losses(batch, 0.98, 1e-4, train_behaviour=False)
        opt_q.zero_grad(set_to_none=True)
        q_loss.backward()
        opt_q.step()
        model.update_target(0.005)

    result: dict = {"label": args.label, "device": torch.cuda.get_device_name() if autocast else platform.processor(),
                    "size": args.size, "image_size": args.image_size, "batch": B,
                    "params_per_copy_M": sum(p.numel() for p in sft.parameters()) / 1e6}  # fmt: skip
    result["sft_step_ms"] = timed(sft_step, args.iters, args.warmup, sync)
    result["qsft_step_ms"] = timed(qsft_step, args.iters, args.warmup, sync)
    result["qsft_step_ratio"] = result["qsft_step_ms"] / result["sft_step_ms"]
    result["qsft_step_frozen_ms"] = timed(qsft_step_frozen, args.iters, args.warmup, sync)
    result["qsft_step_frozen_ratio"] = result["qsft_step_frozen_ms"] / result["sft_step_ms"]
    model.eval()
    one, text = batch["image"][:1], ["pick up the red cube"]
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=autocast):
        result["prefix_ms"] = timed(lambda: sft.embed_prefix(one, text), args.iters, args.warmup, sync)
        prefix = sft.embed_prefix(one, text)
        columns = slice(model.tokens.first_id - DUMMY_COLUMNS, model.tokens.vocab_size)
        stacks = {"": LlamaStack([sft.lm], columns), "_pair": LlamaStack([model.pi.net.lm, model.q.net.lm], columns)}
        token = model.tokens.index_to_id(torch.zeros(1, 1, dtype=torch.long, device=device))
        for k in args.ks:
            ids = model.tokens.encode(torch.rand(1, k, 7, device=device) * 2 - 1)
            for tag, stack in stacks.items():  # the LM part alone: prefill + 6 one-token steps, 1 or 2 models

                def lm_decode(stack: LlamaStack = stack, k: int = k) -> None:
                    embeds = prefix.embeds[None].expand(len(stack.lms), -1, -1, -1)
                    state, _ = stack.prefill(embeds, prefix.mask, k, extra=6)
                    for _ in range(6):
                        stack.extend(state, token.expand(k, 1))

                result[f"lm_decode{tag}_{k}_ms"] = timed(lm_decode, args.iters, args.warmup, sync)
            for fused, tag in ((True, ""), (False, "_hf")):
                run = lambda fn: timed(fn, args.iters, args.warmup, sync)  # noqa: E731
                sft_ms = result[f"sft_decode{tag}_{k}_ms"] = run(lambda k=k, f=fused: sft.sample(one, text, k, fused=f))
                sel_ms = result[f"qsft_select{tag}_{k}_ms"] = run(
                    lambda k=k, f=fused: model.select(one, text, k, 1.0, fused=f)
                )
                result[f"select_ratio{tag}_{k}"] = sel_ms / sft_ms
                for mode in ("p_theta", "ratio"):
                    result[f"critic_{mode}{tag}_{k}_ms"] = run(lambda ids=ids, m=mode, f=fused: model.score(
                        one, text, ids, m, fused=f))  # fmt: skip
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
