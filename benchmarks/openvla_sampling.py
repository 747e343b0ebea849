"""Latency of K OpenVLA action samples: the KV-expansion decoder vs K sequential single-sample decodes.

    python benchmarks/openvla_sampling.py --size real                      # GPU: OpenVLA-7B shape, bf16
    python benchmarks/openvla_sampling.py --size tiny --device cpu --dtype float32 --threads 1 \\
        --label "CPU, tiny OpenVLA: checks the benchmark, not the GPU target"

Weights are random (latency does not depend on them): `real` builds OpenVLA-7B's architecture
(policies/openvla/tiny.py `real_arch`, 7.5 B parameters, ~15 GB in bf16) directly on the device;
`tiny` writes the tiny checkpoint in the published layout and loads it through the real path. One
observation (a 256 px frame, preprocessed once), milliseconds per call:

- greedy:          one greedy action, whole vocabulary (predict_action(do_sample=False)): the baseline,
- kv[K]:           K samples with `OpenVLA.sample`: one prefix forward, the KV cache expanded K times,
                   7 decode steps over the 256 action ids,
- sequential[K]:   K single-sample decodes, each with its own prefix forward (K predict_action calls),
- preprocess:      the image processor (256 px frame -> (6, S, S)), on the CPU, not in the others.

Every call decodes with `--decoder` (fused: policies/llama_stack.py, the default of `policy=openvla`;
transformers: its cached forward, `policy.fused=false`).

Goal (issue 8, GPU, real size): kv[10] <= 1.5 x greedy.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.steer_latency import timed  # noqa: E402 - one timing helper for the latency benchmarks

GOAL = 1.5  # kv[10] / greedy


def build(size: str, dtype: str, device: str, root: Path):
    """(model, image processor, tokenizer): random real-size weights on the device, or the tiny checkpoint loaded."""
    import torch

    from policies.openvla.checkpoint import DTYPES, load_openvla
    from policies.openvla.model import OpenVLA
    from policies.openvla.processing import ImageProcessor
    from policies.openvla.tiny import REAL_CONFIG, real_arch, write_tiny_checkpoint, write_tiny_tokenizer

    if size == "tiny":
        loaded = load_openvla(str(write_tiny_checkpoint(root / "tiny")), dtype, device)
        return loaded.model, loaded.processor, loaded.tokenizer
    from policies.openvla.checkpoint import load_tokenizer

    arch = real_arch()
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])  # initialise in the target dtype: no float32 copy of 7.5 B weights
    try:
        with torch.device(device):
            model = OpenVLA(arch).eval()
    finally:
        torch.set_default_dtype(default)
    lm = model.language_model
    lm.model.rotary_emb = type(lm.model.rotary_emb)(lm.config).to(device)  # float32 table, as when loading
    write_tiny_tokenizer(root)  # Llama-2's id layout; the prompt's length differs from Llama-2's by a few tokens
    processor = ImageProcessor.create(arch, REAL_CONFIG["image_resize_strategy"])
    return model, processor, load_tokenizer(root, arch)


def run(args: argparse.Namespace) -> dict:
    import torch

    from policies.learned import resolve_device
    from policies.openvla.processing import prompt_ids

    if args.threads:
        torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))
    if args.size == "real" and not device.startswith("cuda"):
        raise SystemExit("--size real needs a GPU (OpenVLA-7B: ~15 GB in bf16); use --size tiny on the CPU.")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        model, processor, tokenizer = build(args.size, args.dtype, device, Path(tmp))
    frame = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    dtype = model.language_model.get_input_embeddings().weight.dtype
    pixel_values = processor(frame)[None].to(device, dtype)
    input_ids = torch.tensor([prompt_ids(tokenizer, "put the spoon on the towel")], device=device)
    generator = torch.Generator(device=device).manual_seed(0)

    def sample(k: int, temperature: float = 1.0, restrict: bool = True) -> object:
        return model.sample(pixel_values, input_ids, k, temperature, 0, restrict, generator, args.decoder == "fused")

    with torch.inference_mode():
        result = {"greedy_ms": timed(lambda: sample(1, 0.0, False), args.iters, args.warmup, sync), "k": {}}
        for k in args.ks:
            kv = timed(lambda k=k: sample(k), args.iters, args.warmup, sync)
            seq = timed(lambda k=k: [sample(1) for _ in range(k)], max(1, args.iters // 4), 1, sync)
            greedy = result["greedy_ms"]["mean"]
            result["k"][str(k)] = {"kv_ms": kv, "sequential_ms": seq, "kv_over_greedy": kv["mean"] / greedy,
                                   "sequential_over_kv": seq["mean"] / kv["mean"]}  # fmt: skip
    result["preprocess_ms"] = timed(lambda: processor(frame), args.iters, args.warmup, lambda: None)
    if "10" in result["k"]:
        ratio = result["k"]["10"]["kv_over_greedy"]
        result["goal"] = {"kv10_over_greedy": ratio, "target": GOAL, "met": ratio <= GOAL,
                          "applies": args.size == "real" and device.startswith("cuda")}  # fmt: skip
    result["params"] = sum(p.numel() for p in model.parameters())
    result["prefix_tokens"] = int(input_ids.shape[1] + model.vision_backbone(pixel_values).shape[1])
    cpu = f"cpu ({torch.get_num_threads()} threads)"
    result["device"] = torch.cuda.get_device_name() if device.startswith("cuda") else cpu
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="real", choices=["real", "tiny"], help="real: OpenVLA-7B shape (GPU)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument(
        "--decoder",
        default="fused",
        choices=["fused", "transformers"],
        help="fused: policies/llama_stack.py (policy.fused, the default); transformers: its forward",
    )
    parser.add_argument("--label", default="", help="a note stored with the results (e.g. 'CPU, tiny')")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "openvla_sampling.json"))
    args = parser.parse_args()
    import torch
    import transformers

    machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "transformers": transformers.__version__}  # fmt: skip
    result = {"benchmark": "openvla_sampling", "label": args.label, "machine": machine,
              "config": {k: v for k, v in vars(args).items() if k not in ("out", "label")}, **run(args)}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(report(result))
    print(f"wrote {out}")


def report(r: dict) -> str:
    c = r["config"]
    lines = [
        f"{r['device']}: OpenVLA {c['size']} ({r['params'] / 1e6:,.1f} M params, {c['dtype']}), "
        f"prefix {r['prefix_tokens']} tokens, {c.get('decoder', 'transformers')} decoder",
        f"  greedy action            {r['greedy_ms']['mean']:9.2f} ms",
    ]
    for k, s in r["k"].items():
        kv, seq = s["kv_ms"]["mean"], s["sequential_ms"]["mean"]
        lines.append(f"  K={k:<4} kv {kv:9.2f} ms ({s['kv_over_greedy']:.2f}x greedy)   "
                     f"sequential {seq:9.2f} ms ({s['sequential_over_kv']:.1f}x kv)")  # fmt: skip
    lines.append(f"  preprocess (CPU)         {r['preprocess_ms']['mean']:9.2f} ms")
    if "goal" in r:
        g = r["goal"]
        verdict = ("met" if g["met"] else "NOT met") if g["applies"] else "the goal is for the real size on a GPU"
        lines.append(f"  goal kv[10] <= {g['target']}x greedy: {g['kv10_over_greedy']:.2f}x ({verdict})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
