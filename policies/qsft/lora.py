"""LoRA for Q-SFT's backbones (Hu et al., ICLR 2022, arXiv 2106.09685), through peft.

    python train_qsft.py vlm=smolvlm policy.model.lora.rank=16           # adapters instead of full fine-tuning

With `policy.model.lora.rank > 0`, low-rank adapters go on every linear layer whose name ends in
one of `lora.target_modules` (default: the attention and MLP projections of Llama, Gemma, Qwen and
SmolVLM, text and vision towers alike), and every other weight is frozen, except the modules named
in `lora.train_modules`, trained fully (e.g. a VLM's projector). pi_phi, p_theta and the target are
three copies of the adapted backbone; the adapters start at zero (peft's B = 0), so all three start
as the pretrained model, as in full fine-tuning. Only the adapters (and train_modules) get
gradients and AdamW state, and in a one-process run the three copies share one set of the frozen
base weights (`share_frozen_weights`): one bf16 copy of a multi-billion-parameter VLM in memory,
not three, and no optimiser state for it. (Under torchrun, FSDP shards each copy on its own, so
there the three copies stay.) Checkpoints still hold every weight, so a run resumes and acts without
the base model at hand.

For acting (`load_qsft`), `merge_lora` folds each adapter into its base weight and puts the plain
layer back: no adapter cost per token, and a Llama VLA decodes through policies/llama_stack.py again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from configs.errors import UserError

# peft imports bitsandbytes where installed, whose CPU backend then warns that an optional kernel
# package is missing: a note for 4-bit CPU inference, noise for adapters
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


@contextlib.contextmanager
def _quiet_bitsandbytes() -> Iterator[None]:
    log = logging.getLogger(_BNB_CPU_LOGGER)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def lora_enabled(cfg: Any) -> bool:
    """Whether a Q-SFT model config asks for adapters (configs older than LoRA have no `lora` section)."""
    lora = cfg.get("lora") if hasattr(cfg, "get") else getattr(cfg, "lora", None)
    return lora is not None and int(lora.rank) > 0


def add_lora(backbone: nn.Module, cfg: Any) -> None:
    """Put adapters of `cfg` (policies/qsft/config.py `LoRAConfig`) on `backbone` in place and freeze the rest."""
    if int(cfg.rank) <= 0:
        return
    if float(cfg.alpha) <= 0 or not 0 <= float(cfg.dropout) < 1:
        raise UserError(f"policy.model.lora: alpha={cfg.alpha} must be > 0 and dropout={cfg.dropout} in [0, 1).")
    try:
        with _quiet_bitsandbytes():
            from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UserError("policy.model.lora.rank > 0 needs peft: pip install -e '.[lora]'.") from None
    targets = list(cfg.target_modules)
    config = LoraConfig(r=int(cfg.rank), lora_alpha=float(cfg.alpha), lora_dropout=float(cfg.dropout),
                        target_modules=targets)  # fmt: skip
    try:
        inject_adapter_in_model(config, backbone)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise UserError(f"policy.model.lora.target_modules={targets}: {err}") from None
    train = set(cfg.train_modules)
    found = set()
    for name, param in backbone.named_parameters():
        parts = set(name.split("."))
        found |= parts & train
        param.requires_grad_(".lora_" in name or bool(parts & train))
    if train - found:
        raise UserError(f"policy.model.lora.train_modules: no module named {sorted(train - found)} in the backbone.")


def share_frozen_weights(model: nn.Module) -> int:
    """Let p_theta (`model.q`) and the target use pi_phi's frozen parameters (the base weights under the
    adapters): one copy of the base weights in memory instead of three, for training.

    A parameter is shared where it is frozen in both pi_phi and p_theta and holds the same values in all
    three copies (so not the adapters, nor `train_modules`, nor a pi_phi frozen by behaviour=frozen
    whose p_theta trains). Frozen weights never change, so the three models compute what they computed
    before; the state dict keeps every key (checkpoints are unchanged). Returns how many parameters
    (elements) the sharing saves. `merge_lora` gives each layer its own weight again before folding.
    """
    pi, q = dict(model.pi.named_parameters()), dict(model.q.named_parameters())
    names = [n for n, p in pi.items() if not p.requires_grad and n in q and not q[n].requires_grad]
    saved = 0
    for part in (model.q, model.q_target):
        mine = dict(part.named_parameters())
        for name in names:
            param = mine.get(name)
            if param is None or param is pi[name] or param.shape != pi[name].shape or not torch.equal(param, pi[name]):
                continue
            parent, _, leaf = name.rpartition(".")
            setattr(part.get_submodule(parent) if parent else part, leaf, pi[name])
            saved += param.numel()
    return saved


def merge_lora(module: nn.Module) -> int:
    """Fold every adapter of `module` into its base layer and put the base layer back; returns how many."""
    try:
        with _quiet_bitsandbytes():
            from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft: no adapters either
        return 0
    layers = [(name, sub) for name, sub in module.named_modules() if isinstance(sub, BaseTunerLayer)]
    seen: set[int] = set()
    for _, layer in layers:  # a weight shared by the copies (share_frozen_weights): each merges into its own
        base = layer.get_base_layer()
        if base.weight.data_ptr() in seen:
            base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=base.weight.requires_grad)
        seen.add(base.weight.data_ptr())
    for name, layer in layers:
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, layer.get_base_layer())
    return len(layers)
