"""OpenVLA-7B, native: the published checkpoint loaded into robosteer's own modules (docs/openvla.md).

    config      the `policy=openvla` schema (imports nothing heavy)
    model       the architecture (timm ViTs + projector + transformers Llama) and the K-sample decoder
    checkpoint  the published Hugging Face layout: config.json, sharded safetensors, statistics, tokenizer
    processing  OpenVLA's image preprocessing and prompt
    policy      the registered `openvla` Policy
    tiny        tiny random checkpoints in the published layout (tests, CPU benchmark)

No `trust_remote_code`: the published modelling code is pinned to transformers 4.40.1 / timm 0.9.10
and breaks on later versions (reference/policies.md, "Version traps").
"""
