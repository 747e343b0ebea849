"""Run by tests/values/test_ddp.py under torchrun (2 CPU ranks, gloo): `python -m torch.distributed.run
--standalone --nproc_per_node=2 -m tests.values.ddp_worker OUT`.

Two IQL updates (deterministic: no sampled actions) with each rank on half of a fixed batch and the
gradients averaged over the ranks (values/agent.py), against the same updates of one agent on the
whole batch; rank 0 writes the comparison (tests/distributed.py `compare_with_reference`) to OUT.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(out: Path) -> None:
    import torch.distributed as tdist

    from configs.distributed import setup_distributed
    from tests.distributed import compare_with_reference
    from tests.values.helpers import LANG_DIM, small_value_config, value_batch
    from values.train import make_agent

    dist = setup_distributed("cpu")
    torch.set_num_threads(1)

    def agent() -> torch.nn.Module:
        torch.manual_seed(0)
        return make_agent(small_value_config("iql", "resnet10t"), LANG_DIM, 0.98, seed=3, channels_last=False)

    data = [value_batch(4, 32, seed=step) for step in range(2)]
    reference, ranked, initial = agent(), agent(), agent().state_dict()
    for batch in data:
        reference.update(batch)  # the same whole batch on both ranks: averaging changes nothing
        ranked.update({k: v[2 * dist.rank : 2 * dist.rank + 2] for k, v in batch.items()})
    result = compare_with_reference(ranked.state_dict(), reference.state_dict(), initial)
    if dist.main:
        out.write_text(json.dumps(result))
    tdist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
