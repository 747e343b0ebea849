"""LoRA for Q-SFT's backbones (Hu et al., ICLR 2022, arXiv 2106.09685), through peft.

    python train_qsft.py vlm=smolvlm policy.model.lora.rank=16           # adapters instead of full fine-tuning

With `policy.model.lora.rank > 0`, low-rank adapters go on every linear layer whose name ends in
one of `lora.target_modules` (default: the attention and MLP projections of Llama, Gemma, Qwen and
SmolVLM, text and vision towers alike), and every other weight is frozen, except the modules named
in `lora.train_modules`, trained fully (e.g. a VLM's projector). pi_phi, p_theta and the target are
three copies of the adapted backbone; the adapters start at zero (peft's B = 0), so all three start
as the pretrained model, as in full fine-tuning. Only the adapters (and train_modules) get
gradients and AdamW state, which is what makes a multi-billion-parameter VLM fit: three bf16 copies
of the weights, no optimiser state for them. Checkpoints still hold every weight, so a run resumes
and acts without the base model at hand.

For acting (`load_qsft`), `merge_lora` folds each adapter into its base weight and puts the plain
layer back: no adapter cost per token, and a Llama VLA decodes through policies/llama_stack.py again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

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


def merge_lora(module: nn.Module) -> int:
    """Fold every adapter of `module` into its base layer and put the base layer back; returns how many."""
    try:
        with _quiet_bitsandbytes():
            from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft: no adapters either
        return 0
    layers = [(name, sub) for name, sub in module.named_modules() if isinstance(sub, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, layer.get_base_layer())
    return len(layers)
