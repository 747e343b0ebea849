"""Schema of `policy=openvla` (configs/policy/openvla.yaml); registered by policies/config.py.

Light on purpose (dataclasses only): Hydra reads it in processes that never load the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.config import PolicyConfig


@dataclass
class OpenVLAPolicyConfig(PolicyConfig):
    """OpenVLA in the published Hugging Face layout, run by robosteer's own modules (policies/openvla/)."""

    name: str = "openvla"
    # Hub id or local directory of the checkpoint (config.json, model*.safetensors, tokenizer,
    # dataset_statistics.json). Offline: `hf download openvla/openvla-7b --local-dir <dir>` on a
    # machine with network, then policy.path=<dir>.
    path: str = "openvla/openvla-7b"
    # Dataset whose action statistics un-normalise the actions: bridge_orig (WidowX / Bridge),
    # fractal20220817_data (Google robot), ...; null = the checkpoint's only dataset.
    unnorm_key: str | None = "bridge_orig"
    # Weight and activation dtype: bfloat16 (as published), float16 or float32.
    dtype: str = "bfloat16"
    # null, 8bit or 4bit: bitsandbytes LLM.int8() / NF4 quantisation of the Llama decoder's linear layers
    # (lm_head, ViTs and projector stay in `dtype`); CUDA, or the CPU with bitsandbytes >= 0.48.
    quantization: str | None = None
    # Temperature of the K candidates of sample_actions over the 256 action tokens (every other
    # token masked); 0 = greedy (all K identical).
    temperature: float = 1.0
    # Sample among the top_k action tokens only (0 = all 256; OpenVLA's generate(do_sample=True)
    # uses 50 over the whole vocabulary).
    top_k: int = 0
    # act(): OpenVLA's predict_action(do_sample=False), a greedy decode over the whole vocabulary as
    # published; false = one sample_actions candidate at `temperature`.
    greedy_act: bool = True
    # Decode Llama-2 with policies/llama_stack.py (same numbers, less per-token overhead; quantised
    # layers always use transformers); false: transformers' forward.
    fused: bool = True
    # auto (cuda if available), cuda, cpu.
    device: str = "auto"
    # Seed of the sampling noise.
    seed: int = 0
