"""DESIGN.md "light imports": the client and the serving path run without torch or TensorFlow.

Each test runs a fresh interpreter with a `sys.meta_path` finder that refuses the heavy packages,
as in Octo's environment (no torch) or on a robot computer (neither).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from policies.remote import RemotePolicy

REPO = Path(__file__).resolve().parents[2]
HEAVY = ["torch", "torchvision", "tensorflow", "tensorflow_datasets", "jax", "flax", "transformers", "timm"]

BLOCKER = textwrap.dedent(
    """
    import atexit, importlib.abc, sys
    BLOCKED, TRIED = set(sys.argv[1].split(",")), []
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                TRIED.append(name)
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None
    sys.meta_path.insert(0, Block())
    atexit.register(lambda: print("BLOCKED-IMPORTS:", sorted(set(TRIED)), file=sys.stderr, flush=True))
    """
)


def run_python(code: str, blocked: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    script = BLOCKER + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script, ",".join(blocked)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_client_server_and_octo_modules_import_with_numpy_msgpack_websockets_only() -> None:
    """Every third-party module loaded is numpy, msgpack or websockets (not even omegaconf or PIL)."""
    code = """
        import json
        from policies.base import make_policy
        import policies.remote, policies.server, policies.octo

        class Cfg(dict):
            __getattr__ = dict.__getitem__

        policy = make_policy(Cfg(name="random", translation=0.02, rotation=0.1, chunk=2, seed=0))
        try:
            make_policy(Cfg(name="octo", checkpoint="hf://rail-berkeley/octo-small-1.5", step=None))
        except Exception as err:
            octo_error = f"{type(err).__name__}: {err}"
        # installed packages loaded (private helpers such as setuptools' _distutils_hack aside)
        files = {m: getattr(sys.modules[m], "__file__", None) or "" for m in list(sys.modules) if "." not in m}
        loaded = {m for m, f in files.items() if "site-packages" in f and not m.startswith("_")}
        print(json.dumps({"third_party": sorted(loaded), "octo_error": octo_error, "chunk": policy.chunk}))
    """
    blocked = [*HEAVY, "octo", "omegaconf", "hydra", "PIL", "scipy", "zmq", "lz4", "tqdm"]
    result = run_python(code, blocked)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"numpy", "msgpack"} <= set(out["third_party"]) <= {"numpy", "msgpack", "websockets"}, out["third_party"]
    assert out["octo_error"].startswith("UserError: Octo is not importable") and "docs/serving.md" in out["octo_error"]
    assert "BLOCKED-IMPORTS: ['octo']" in result.stderr  # only Octo itself was tried: never torch & co.


def test_serve_policy_serves_without_torch_or_tensorflow() -> None:
    """`python serve_policy.py policy=random` (Hydra included) serves a RemotePolicy with the heavy packages absent."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = f"""
        import runpy
        sys.argv = ["serve_policy.py", "policy=random", "policy.chunk=3", "host=127.0.0.1", "port={port}"]
        runpy.run_path("serve_policy.py", run_name="__main__")
    """
    script = BLOCKER + textwrap.dedent(code)
    server = subprocess.Popen([sys.executable, "-c", script, ",".join(HEAVY)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        client = RemotePolicy("127.0.0.1", port, timeout_s=10, connect_timeout_s=30)
        client.reset("go")
        obs = {"image_primary": np.zeros((64, 64, 3), np.uint8), "instruction": "go"}
        assert client.act(obs).shape == (3, 7) and client.sample_actions(obs, 5).shape == (5, 3, 7)
        client.close()
    finally:
        server.send_signal(signal.SIGTERM)  # handled as Ctrl-C: stop the server, exit 0
        try:
            _, stderr = server.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            pytest.fail("serve_policy.py did not stop on SIGTERM")
    assert server.returncode == 0, stderr
    assert "BLOCKED-IMPORTS: []" in stderr, stderr[-2000:]
