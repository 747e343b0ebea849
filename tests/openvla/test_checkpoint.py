"""OpenVLA checkpoints: the published key names and shapes, strict loading, statistics, errors that name the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from configs.errors import UserError
from policies.openvla import checkpoint as ckpt
from policies.openvla.model import OpenVLA
from policies.openvla.tiny import REAL_CONFIG, TINY_STATS, real_arch, write_tiny_checkpoint

# Names as the published checkpoint stores them (modeling_prismatic.py: `vision_backbone.featurizer` /
# `fused_featurizer` are timm ViTs whose LayerScale `gamma` is patched to `scale_factor`; `projector.fc1..3`;
# `language_model` is transformers' LlamaForCausalLM).
PUBLISHED_KEYS = [
    "vision_backbone.featurizer.cls_token",
    "vision_backbone.featurizer.reg_token",
    "vision_backbone.featurizer.pos_embed",
    "vision_backbone.featurizer.patch_embed.proj.weight",
    "vision_backbone.featurizer.blocks.0.norm1.weight",
    "vision_backbone.featurizer.blocks.0.attn.qkv.weight",
    "vision_backbone.featurizer.blocks.0.attn.proj.bias",
    "vision_backbone.featurizer.blocks.0.ls1.scale_factor",
    "vision_backbone.featurizer.blocks.0.mlp.fc1.weight",
    "vision_backbone.featurizer.blocks.0.ls2.scale_factor",
    "vision_backbone.featurizer.norm.weight",
    "vision_backbone.fused_featurizer.pos_embed",
    "vision_backbone.fused_featurizer.patch_embed.proj.weight",
    "vision_backbone.fused_featurizer.blocks.0.attn.qkv.weight",
    "vision_backbone.fused_featurizer.blocks.0.mlp.fc2.bias",
    "vision_backbone.fused_featurizer.norm.bias",
    "vision_backbone.fused_featurizer.attn_pool.latent",
    "vision_backbone.fused_featurizer.attn_pool.q.weight",
    "vision_backbone.fused_featurizer.attn_pool.kv.weight",
    "vision_backbone.fused_featurizer.attn_pool.mlp.fc1.weight",
    "projector.fc1.weight",
    "projector.fc2.bias",
    "projector.fc3.weight",
    "language_model.model.embed_tokens.weight",
    "language_model.model.layers.0.self_attn.q_proj.weight",
    "language_model.model.layers.0.self_attn.k_proj.weight",
    "language_model.model.layers.0.self_attn.v_proj.weight",
    "language_model.model.layers.0.self_attn.o_proj.weight",
    "language_model.model.layers.0.mlp.gate_proj.weight",
    "language_model.model.layers.0.mlp.up_proj.weight",
    "language_model.model.layers.0.mlp.down_proj.weight",
    "language_model.model.layers.0.input_layernorm.weight",
    "language_model.model.layers.0.post_attention_layernorm.weight",
    "language_model.model.norm.weight",
    "language_model.lm_head.weight",
]


def weight_map(directory: Path) -> dict[str, str]:
    return json.loads((directory / ckpt.INDEX).read_text())["weight_map"]


def test_the_published_key_names_are_saved_and_loaded(tiny_dir: Path, loaded: Any) -> None:
    stored = weight_map(tiny_dir)
    assert set(PUBLISHED_KEYS) <= set(stored)
    assert set(stored) == set(loaded.model.state_dict())  # strict both ways
    assert not [k for k in stored if k.endswith(".gamma")]
    assert not [k for k in stored if "fused_featurizer.cls_token" in k or "fused_featurizer.reg_token" in k]
    assert len(set(stored.values())) > 1  # sharded, through the index
    total = json.loads((tiny_dir / ckpt.INDEX).read_text())["metadata"]["total_size"]
    assert total == sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())


def test_real_architecture_has_openvla_7b_shapes() -> None:
    with torch.device("meta"):
        model = OpenVLA(real_arch())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "vision_backbone.featurizer.pos_embed": (1, 256, 1024),  # 16 x 16 patches at 224 px, no class position
        "vision_backbone.featurizer.reg_token": (1, 4, 1024),
        "vision_backbone.featurizer.blocks.23.ls2.scale_factor": (1024,),
        "vision_backbone.fused_featurizer.pos_embed": (1, 256, 1152),
        "vision_backbone.fused_featurizer.blocks.26.mlp.fc1.weight": (4304, 1152),
        "vision_backbone.fused_featurizer.attn_pool.latent": (1, 1, 1152),
        "projector.fc1.weight": (8704, 2176),
        "projector.fc2.weight": (4096, 8704),
        "projector.fc3.weight": (4096, 4096),
        "language_model.model.embed_tokens.weight": (32064, 4096),
        "language_model.model.layers.31.mlp.gate_proj.weight": (11008, 4096),
        "language_model.lm_head.weight": (32064, 4096),
    }
    assert {k: shapes[k] for k in expected} == expected
    assert "vision_backbone.featurizer.blocks.24.norm1.weight" not in shapes
    assert "vision_backbone.fused_featurizer.blocks.27.norm1.weight" not in shapes
    assert 7.5e9 < sum(v.numel() for v in model.parameters()) < 7.6e9  # "OpenVLA 7B": 7.54 B parameters
    assert model.tokens.first_id == 31744 and model.tokens.vocab_size == 32000
    assert model.language_model.config.rms_norm_eps == 1e-6  # 4.40.1's default, as the published code builds it


def test_loading_is_strict(loaded: Any) -> None:
    state = dict(loaded.model.state_dict())
    with torch.device("meta"):
        empty = OpenVLA(loaded.model.arch)
    with pytest.raises(UserError, match=r"1 missing, e.g. \['projector.fc3.bias'\]; 0 unexpected"):
        ckpt.assign_weights(empty, {k: v for k, v in state.items() if k != "projector.fc3.bias"}, "cpu", "x")
    with torch.device("meta"):
        empty = OpenVLA(loaded.model.arch)
    with pytest.raises(UserError, match=r"0 missing.*1 unexpected, e.g. \['projector.fc4.weight'\]"):
        ckpt.assign_weights(empty, {**state, "projector.fc4.weight": state["projector.fc3.weight"]}, "cpu", "x")


def test_timm_gamma_keys_load_as_scale_factor(tiny_dir: Path, loaded: Any, tmp_path: Path) -> None:
    directory = shutil.copytree(tiny_dir, tmp_path / "gamma")
    for name in set(weight_map(directory).values()):
        shard = load_file(str(directory / name))
        save_file({k.replace(".scale_factor", ".gamma"): v for k, v in shard.items()}, str(directory / name))
    state = ckpt.read_weights(directory, torch.float32)
    key = "vision_backbone.featurizer.blocks.1.ls2.scale_factor"
    torch.testing.assert_close(state[key], loaded.model.state_dict()[key], rtol=0, atol=0)


def test_bfloat16_loads_in_bfloat16_with_a_float32_rotary_table(tiny_dir: Path) -> None:
    bf16 = ckpt.load_openvla(str(tiny_dir), "bfloat16", "cpu")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert bf16.model.language_model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_dataset_statistics_override_the_config(tiny_dir: Path, tmp_path: Path) -> None:
    directory = shutil.copytree(tiny_dir, tmp_path / "stats")
    config = json.loads((directory / ckpt.CONFIG).read_text())
    assert ckpt.norm_stats(directory, config) == TINY_STATS
    assert ckpt.norm_stats(directory, {**config, "norm_stats": {"other": {}}}) == TINY_STATS
    (directory / ckpt.STATS).unlink()
    assert ckpt.norm_stats(directory, {**config, "norm_stats": {"other": {}}}) == {"other": {}}
    with pytest.raises(UserError, match=r"neither dataset_statistics\.json nor norm_stats"):
        ckpt.norm_stats(directory, {})


def test_missing_weights_name_the_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fix = r"hf download openvla/openvla-7b --local-dir <dir>.*policy.path=<dir>"
    with pytest.raises(UserError, match=rf"No OpenVLA checkpoint directory at '{tmp_path}/nowhere'.*{fix}"):
        ckpt.load_openvla(str(tmp_path / "nowhere"))

    def offline(*args: Any, **kwargs: Any) -> None:
        raise OSError("no network")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(
        UserError, match=rf"Cannot fetch the OpenVLA checkpoint 'openvla/openvla-7b' \(OSError: no network\).*{fix}"
    ):
        ckpt.load_openvla("openvla/openvla-7b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"has no config.json.*{fix}"):
        ckpt.load_openvla(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text(json.dumps(REAL_CONFIG))
    with pytest.raises(UserError, match=r"has no model\.safetensors\.index\.json or model\.safetensors"):
        ckpt.load_openvla(str(tmp_path / "empty"))


def test_a_missing_shard_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    directory = shutil.copytree(tiny_dir, tmp_path / "shards")
    (directory / "model-00002-of-00005.safetensors").unlink()
    with pytest.raises(UserError, match=r"lacks the shard\(s\) \['model-00002-of-00005.safetensors'\]"):
        ckpt.load_openvla(str(directory), "float32")


def test_unknown_architectures_and_options_are_refused(tiny_dir: Path) -> None:
    with pytest.raises(UserError, match="Only Llama-2-based"):
        ckpt.OpenVLAArch.from_hf_config({**REAL_CONFIG, "llm_backbone_id": "mistral-v0.1-7b-pure"})
    with pytest.raises(UserError, match="Unknown OpenVLA vision backbone 'vit_huge'"):
        OpenVLA(ckpt.OpenVLAArch.from_hf_config({**REAL_CONFIG, "timm_model_ids": ["vit_huge", "vit_huge"]}))
    with pytest.raises(UserError, match=r"policy\.dtype='float8'"):
        ckpt.load_openvla(str(tiny_dir), "float8")


def test_tiny_checkpoint_in_bfloat16_round_trips(tmp_path: Path) -> None:
    directory = write_tiny_checkpoint(tmp_path / "bf16", seed=1, dtype=torch.bfloat16)
    stored = load_file(str(directory / next(iter(weight_map(directory).values()))))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert json.loads((directory / ckpt.CONFIG).read_text())["torch_dtype"] == "bfloat16"
