"""Fixtures: policy servers on loopback (port 0: the OS picks a free one), clients, raw connections."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from policies.base import Observation, Policy, RandomPolicy
from policies.remote import RemotePolicy, packb, unpackb
from policies.server import PolicyServer

IMAGE_SIZE = 256  # the real size: messages as large as in use (~197 kB)


def observation(seed: int = 0, instruction: str = "put the spoon on the towel", size: int = IMAGE_SIZE) -> Observation:
    rng = np.random.default_rng(seed)
    return {
        "image_primary": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "state": rng.normal(size=7).astype(np.float32),
        "instruction": instruction,
    }


class EchoPolicy(Policy):
    """Actions that tell what the policy saw: [call number, state[0], len(instruction), slot, 0, 0, 0.5].

    `delays` maps a call number (1-based) to seconds of sleep before answering; `fail_on` is an
    instruction that makes the policy raise.
    """

    chunk = 2

    def __init__(self, delays: dict[int, float] | None = None, fail_on: str | None = None) -> None:
        super().__init__()
        self.calls, self.delays, self.fail_on = 0, delays or {}, fail_on

    def sample_actions(self, obs: Observation, k: int, slot: int = 0) -> np.ndarray:
        self.calls += 1
        time.sleep(self.delays.get(self.calls, 0.0))
        instruction = obs.get("instruction") or self.instructions.get(slot, "")
        if instruction == self.fail_on:
            raise RuntimeError(f"policy failure on {instruction!r}")
        out = np.zeros((k, self.chunk, 7), np.float32)
        out[..., 0] = self.calls
        out[..., 1] = obs["state"][0] if "state" in obs else -1.0
        out[..., 2] = len(instruction)
        out[..., 3] = slot
        out[..., 6] = 0.5
        return out


@pytest.fixture
def serve() -> Iterator[Callable[..., PolicyServer]]:
    """Factory: `serve(factory, **PolicyServer kwargs)` starts a server in a thread (stopped after)."""
    started: list[PolicyServer] = []

    def start(factory: Callable[[], Policy] = lambda: RandomPolicy(chunk=4), **kwargs: Any) -> PolicyServer:
        kwargs.setdefault("host", "127.0.0.1")
        kwargs.setdefault("port", 0)
        server = PolicyServer(factory, **kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def connect() -> Iterator[Callable[..., RemotePolicy]]:
    """Factory: a RemotePolicy of a server (closed after)."""
    clients: list[RemotePolicy] = []

    def make(server: PolicyServer, **kwargs: Any) -> RemotePolicy:
        kwargs.setdefault("timeout_s", 10.0)
        kwargs.setdefault("connect_timeout_s", 5.0)
        client = RemotePolicy("127.0.0.1", server.port, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


class Raw:
    """A bare WebSocket connection, as openpi's client opens it; the metadata frame is in `.metadata`."""

    def __init__(self, port: int, **kwargs: Any) -> None:
        from websockets.sync.client import connect

        self.ws = connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None, **kwargs).__enter__()
        self.metadata = unpackb(self.ws.recv(timeout=5))

    def send(self, message: Any) -> None:
        self.ws.send(message if isinstance(message, bytes | str) else packb(message))

    def recv(self) -> Any:
        reply = self.ws.recv(timeout=5)
        return reply if isinstance(reply, str) else unpackb(reply)

    def ask(self, message: Any) -> Any:
        self.send(message)
        return self.recv()


@pytest.fixture
def raw() -> Iterator[Callable[..., Raw]]:
    opened: list[Raw] = []

    def open_(server: PolicyServer, **kwargs: Any) -> Raw:
        conn = Raw(server.port, **kwargs)
        opened.append(conn)
        return conn

    yield open_
    for conn in opened:
        conn.ws.close()
