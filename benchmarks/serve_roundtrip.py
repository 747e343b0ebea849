"""Policy-server round-trip overhead on loopback: what serving a policy costs per call.

    python benchmarks/serve_roundtrip.py --calls 500 --out benchmarks/results/serve_roundtrip.json

`serve_policy.py policy=random policy.chunk=4` runs in its own process (as a served Octo does); this
process sends the observation a robot sends: a 256 x 256 x 3 uint8 image, a (7,) float32 state and
the instruction (~197 kB). It times, per call: `RemotePolicy.act` and `sample_actions(K=10)` (the
extension requests steering uses), a plain openpi-style request (a bare observation over a raw
WebSocket, what openpi's client sends), and the same policy called directly in this process. The
overhead is the round trip minus the direct call (p50 of each). Goal: <= 2 ms per call (one observation).
Also timed: one `sample_actions_batch` request of 8 observations (eval_sim's steering, 8 episodes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def stats(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds, np.float64) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()), "min": float(ms.min()),
            "max": float(ms.max())}  # fmt: skip


def timed(call: Callable[[], object], calls: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def start_server(port: int) -> subprocess.Popen:
    command = [sys.executable, "serve_policy.py", "policy=random", "policy.chunk=4", "host=127.0.0.1", f"port={port}"]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_roundtrip.json"))
    args = parser.parse_args()

    from websockets.sync.client import connect

    from policies.base import RandomPolicy
    from policies.remote import RemotePolicy, no_delay, packb, unpackb

    rng = np.random.default_rng(0)
    obs = {"image_primary": rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8),
           "state": rng.normal(size=7).astype(np.float32), "instruction": "put the spoon on the towel"}  # fmt: skip
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = start_server(port)
    try:
        client = RemotePolicy("127.0.0.1", port, timeout_s=10, connect_timeout_s=60)
        client.reset(obs["instruction"])
        raw = connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None).__enter__()
        no_delay(raw.socket)
        unpackb(raw.recv())  # metadata
        server_infer: list[float] = []

        def openpi_infer() -> None:
            raw.send(packb(obs))
            server_infer.append(unpackb(raw.recv())["server_timing"]["infer_ms"])

        batch = [obs] * 8
        local = RandomPolicy(chunk=4)
        local.reset(obs["instruction"])
        runs = {
            "direct_act": timed(lambda: local.act(obs), args.calls),
            "direct_sample_k10": timed(lambda: local.sample_actions(obs, 10), args.calls),
            "remote_act": timed(lambda: client.act(obs), args.calls),
            "remote_sample_k10": timed(lambda: client.sample_actions(obs, 10), args.calls),
            "openpi_infer": timed(openpi_infer, args.calls),
            # what eval_sim's steering sends with 8 episodes in flight: one request per control step
            "direct_sample_batch8_k10": timed(lambda: local.sample_actions_batch(batch, 10), args.calls // 5),
            "remote_sample_batch8_k10": timed(lambda: client.sample_actions_batch(batch, 10), args.calls // 5),
        }
        client.close()
        raw.close()
    finally:
        server.terminate()
        server.wait(10)
    results = {name: stats(times) for name, times in runs.items()}
    overhead = {
        "act": results["remote_act"]["p50"] - results["direct_act"]["p50"],
        "sample_k10": results["remote_sample_k10"]["p50"] - results["direct_sample_k10"]["p50"],
        "openpi_infer": results["openpi_infer"]["p50"] - results["direct_act"]["p50"],
        "sample_batch8_k10": results["remote_sample_batch8_k10"]["p50"] - results["direct_sample_batch8_k10"]["p50"],
    }
    import msgpack
    import websockets

    result = {
        "benchmark": "serve_roundtrip",
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": _cpus()},
        "versions": {"numpy": np.__version__, "msgpack": msgpack.version, "websockets": websockets.__version__},
        "transport": "WebSocket (websockets, threaded server, no compression) on loopback; server in its own process",
        "policy": "random, chunk 4",
        "image_size": args.image_size,
        "request_bytes": len(packb(obs)),
        "calls": args.calls,
        "latency_ms": results,
        "server_infer_ms_p50": float(np.percentile(server_infer[-args.calls :], 50)),
        "overhead_ms_p50": overhead,
        "goal_ms": 2.0,
        "goal_met": bool(max(overhead[k] for k in ("act", "sample_k10", "openpi_infer")) <= 2.0),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for name, s in results.items():
        print(f"{name:>24}: p50 {s['p50']:.3f} ms, p90 {s['p90']:.3f}, p99 {s['p99']:.3f}, mean {s['mean']:.3f}")
    print("overhead (p50 round trip - p50 direct): " + ", ".join(f"{k} {v:.3f} ms" for k, v in overhead.items()))
    print(f"wrote {out}")


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    main()
