"""Fixtures: free loopback ports, the simulated WidowX service in a thread, fast safety limits, a policy."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
from omegaconf import OmegaConf

from policies.base import Policy, make_policy
from real_robot.client import WidowXClient
from real_robot.protocol import DEFAULT_ENV_PARAMS
from real_robot.safety import SafetyConfig, resolve_limits
from real_robot.sim_service import Fault, SimWidowXService, free_port_pair

IMAGE_SIZE = 32  # small frames keep the tests fast; the layout is the same at 256
TIMEOUT_MS = 300  # client request timeout in tests (the reference's 800 ms is the default elsewhere)


@pytest.fixture
def sim_service() -> Iterator[Callable[..., SimWidowXService]]:
    """Factory: `sim_service(fault=..., init_delay_s=...)` starts a service on a free port (stopped after)."""
    started: list[SimWidowXService] = []

    def start(fault: Fault | None = None, port: int | None = None, **kwargs) -> SimWidowXService:
        kwargs.setdefault("move_settle_s", 0.0)
        service = SimWidowXService(port or free_port_pair(), fault=fault, **kwargs).start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture
def connect() -> Iterator[Callable[..., WidowXClient]]:
    """Factory: a client of a service, initialised at IMAGE_SIZE unless init=False (closed after)."""
    clients: list[WidowXClient] = []

    def make(service: SimWidowXService, init: bool = True, **kwargs) -> WidowXClient:
        kwargs.setdefault("timeout_ms", TIMEOUT_MS)
        client = WidowXClient("127.0.0.1", service.port, **kwargs)
        clients.append(client)
        if init:
            client.init(DEFAULT_ENV_PARAMS, IMAGE_SIZE, timeout_s=10)
        return client

    yield make
    for client in clients:
        client.stop()


def limits(**overrides) -> SafetyConfig:
    """Safety limits resolved from the default env params; tests run at 20 Hz unless told otherwise."""
    base = replace(SafetyConfig(), control_hz=20.0, max_obs_age_s=0.25, max_policy_s=0.2)
    return resolve_limits(replace(base, **overrides), DEFAULT_ENV_PARAMS)


def random_policy(seed: int = 0) -> Policy:
    """The in-project `random` policy built through the registry, as deploy_robot.py builds policies."""
    return make_policy(OmegaConf.create({"name": "random", "translation": 0.02, "rotation": 0.1, "chunk": 1,
                                         "seed": seed}))  # fmt: skip
