"""The one-intra-op-thread fixture shared by the tiny-model tests (import it into a conftest or test module)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Tiny models run fastest on one intra-op thread; two threads on a shared 2-core box spin-wait ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
