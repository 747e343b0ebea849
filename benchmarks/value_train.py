"""Value-learning throughput (Cal-QL or IQL), end to end and by part: where does a training step go?

    python benchmarks/value_train.py                                  # GPU: batch 256, 256 px, ResNet-34, Cal-QL
    python benchmarks/value_train.py --no-compile --workers 12        # eager encoders (default: compiled on CUDA)
    python benchmarks/value_train.py --model-only --profile 3         # agent.update alone; its top CUDA ops
    python benchmarks/value_train.py --device cpu --arch resnet10t --image-size 64 --batch 64 \\
        --steps 10 --label "CPU smoke run"

The data is a synthetic dataset in the exact `bridge_dataset` 1.0.0 format (256x256 JPEG image_0,
generated once under --cache), prepared into robosteer's store (`--image-format raw` decoded frames,
or `jpeg`) and read by the training loader, i.e. what `python train_value.py data=bridge` runs.
Measured, in samples (transitions) per second, each after --warmup steps:

- data:        the loader alone (batches as the trainer receives them, on the host),
- model:       `agent.update` alone on one batch already on the device (no data at all),
- end_to_end:  the train_value loop: loader -> device -> embeddings -> negatives -> augment -> update,
               as train_value runs it (the host waits for the GPU only at the end),
- end_to_end_synced: the same loop, the GPU synchronised after each part, to give
per-step milliseconds of that loop split into `wait_data` (blocked on the loader), `to_device`
(copies, embedding lookup, relabelling, augmentation) and `update` (forward, backward, optimiser, target
networks; CUDA synchronised so the time lands in the right bucket). `--profile N` adds the 15 ops with the
most device time over N updates (torch.profiler); `--model-only` measures the update alone.

Goal (issue 4, one H100): >= 6,000 samples/s end to end at batch 256, 256 px, ResNet-34.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--algo", default="calql", choices=["calql", "iql"])
    p.add_argument("--arch", default="resnet34")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--image-format", default="raw", choices=["raw", "jpeg"])
    p.add_argument("--workers", type=int, default=8, help="loader workers")
    p.add_argument("--loader", default="threads", choices=["threads", "processes"])
    p.add_argument("--episodes", type=int, default=150, help="synthetic episodes (38 steps each)")
    p.add_argument("--steps", type=int, default=50, help="measured steps per configuration")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="train_value compile= (default: as train_value, torch.compile on CUDA only)")  # fmt: skip
    p.add_argument("--actor-encoder", default="separate", choices=["separate", "critic"],
                   help="value.actor_encoder: the actor's own ResNet (V-GPS) or the critic's embedding")  # fmt: skip
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--channels-last", action="store_true", help="as train_value channels_last=true")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "robosteer_bench_value"))
    p.add_argument("--label", default="")
    p.add_argument("--data-only", action="store_true", help="write the synthetic dataset under --cache and stop")
    p.add_argument("--model-only", action="store_true", help="measure agent.update alone (no data, no end to end)")
    p.add_argument(
        "--cudnn-benchmark",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.backends.cudnn.benchmark (default: unchanged)",
    )
    p.add_argument("--profile", type=int, default=0, help="torch.profiler over this many updates: the top CUDA ops")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "value_train.json"))
    return p.parse_args()


def config(args: argparse.Namespace, data_dir: str):
    """The train_value config of this measurement (hydra compose, as the entry point builds it)."""
    from hydra import compose, initialize_config_dir

    from configs.schema import register

    register()
    overrides = [
        "data=bridge", f"data.data_dir={data_dir}", f"data.image_size={args.image_size}",
        f"data.datasets.bridge.image_format={args.image_format}", f"data.num_workers={args.workers}",
        f"data.loader={args.loader}", f"value={args.algo}", f"value.encoder.arch={args.arch}",
        f"batch_size={args.batch}", f"device={args.device}",
        f"compile={'null' if args.compile is None else args.compile}", f"bf16={not args.no_bf16}",
        f"channels_last={args.channels_last}", f"value.actor_encoder={args.actor_encoder}",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return compose("train_value", overrides=overrides)


def main() -> None:
    args = parse()
    import torch
    from data_throughput import build_dataset

    from configs.distributed import Distributed, resolve_device, setup_distributed
    from data.loader import build_datasets, make_loader
    from data.prepare import prepare_data
    from values.language import EmbeddingCache, make_language_encoder
    from values.train import compile_encoders, make_agent, training_batch, use_compile

    data_dir = build_dataset(Path(args.cache) / f"{args.episodes}ep", args.episodes, 1)
    if args.data_only:
        print(data_dir)
        return
    cfg = config(args, str(data_dir))
    device = resolve_device(cfg.device, setup_distributed(cfg.device))
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if args.cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    train, weights = build_datasets(prepare_data(cfg.data, need_val=False), cfg.data, "train")
    language = make_language_encoder(cfg.value.language, device="cpu")
    lang = EmbeddingCache(language, device).table(train.instructions)
    torch.manual_seed(0)
    agent = make_agent(cfg.value, language.dim, cfg.data.reward.discount, 0, cfg.channels_last).to(device)
    agent.autocast = cfg.bf16 and cuda
    if cfg.channels_last:
        agent.to(memory_format=torch.channels_last)
    compiled = use_compile(cfg.compile, device, cfg.channels_last)
    if compiled:
        compile_encoders(agent)

    total = args.warmup + args.steps

    def loader(n: int):
        return iter(make_loader(train, weights, args.batch, seed=0, num_workers=args.workers,
                                backend=args.loader, num_batches=n, pin_memory=cuda))  # fmt: skip

    def prepare(raw: dict, step: int) -> dict:  # what train_value does to each batch
        return training_batch(raw, lang, cfg, step, device, Distributed())

    # data alone
    data_rate = None
    if not args.model_only:
        it = loader(total)
        for _ in range(args.warmup):
            next(it)
        start = time.perf_counter()
        for _ in range(args.steps):
            next(it)
        data_rate = args.steps * args.batch / (time.perf_counter() - start)

    # model alone (one device-resident batch)
    batch = prepare(next(loader(1)), 0)
    start = time.perf_counter()
    agent.update(batch, metrics=False)  # compiles the encoders where they are compiled
    sync()
    first_update_s = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        agent.update(batch, metrics=False)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        agent.update(batch, metrics=False)
    sync()
    model_rate = args.steps * args.batch / (time.perf_counter() - start)
    top_ops = profile(agent, batch, args.profile, sync) if args.profile else None
    result = {
        "label": args.label,
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "cache", "label")},
        "compiled": compiled,
        "first_update_s": round(first_update_s, 2),  # with torch.compile: mostly compiling
        "samples_per_s": {"model": round(model_rate, 1)},
        "update_ms": round(1000 * args.batch / model_rate, 2),
    }
    if top_ops is not None:
        result["profile_top_ops"] = top_ops
    if not args.model_only:
        result["samples_per_s"]["data"] = round(data_rate, 1)
        result["samples_per_s"]["end_to_end"], _ = end_to_end(args, loader, prepare, agent, sync, split=False)
        result["samples_per_s"]["end_to_end_synced"], result["ms_per_step"] = end_to_end(
            args, loader, prepare, agent, sync, split=True
        )
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps([*runs, result], indent=2) + "\n")


def profile(agent, batch: dict, steps: int, sync) -> list[dict]:
    """The 15 ops with the most self device (CPU: CPU) time over `steps` updates (ms per update, share of the total)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            agent.update(batch, metrics=False)
        sync()
    events = prof.key_averages()

    def device_us(e) -> float:
        if not torch.cuda.is_available():
            return float(e.self_cpu_time_total)
        return float(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0) or 0)

    total = sum(device_us(e) for e in events) or 1.0
    top = sorted(events, key=device_us, reverse=True)[:15]
    return [{"op": e.key[:90], "ms_per_update": round(device_us(e) / 1000 / steps, 3),
             "share": round(device_us(e) / total, 4), "calls_per_update": e.count // steps} for e in top]  # fmt: skip


def end_to_end(args: argparse.Namespace, loader, prepare, agent, sync, split: bool) -> tuple[float, dict]:
    """The train_value loop: samples/s, and with `split` the time of a step split into waiting for data,
    moving/augmenting it, and the update (CUDA synchronised between the parts, so each lands in its
    bucket; without `split` nothing waits for the GPU but the loop's end, as in train_value)."""
    total = args.warmup + args.steps
    parts = {"wait_data": 0.0, "to_device": 0.0, "update": 0.0}
    it = loader(total)
    start = None
    for step in range(total):
        if step == args.warmup:
            sync()
            parts = dict.fromkeys(parts, 0.0)
            start = time.perf_counter()
        t0 = time.perf_counter()
        raw = next(it)
        t1 = time.perf_counter()
        batch = prepare(raw, step)
        if split:
            sync()
        t2 = time.perf_counter()
        agent.update(batch, metrics=(step + 1) % 100 == 0)
        if split:
            sync()
        t3 = time.perf_counter()
        parts["wait_data"] += t1 - t0
        parts["to_device"] += t2 - t1
        parts["update"] += t3 - t2
    sync()
    elapsed = time.perf_counter() - start
    return round(args.steps * args.batch / elapsed, 1), {k: round(1000 * v / args.steps, 2) for k, v in parts.items()}


if __name__ == "__main__":
    main()
