"""LoRA for Q-SFT (policies/qsft/lora.py): frozen base, zero-start adapters, Polyak, merge for acting, errors."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from configs.errors import UserError
from policies.llama_stack import LlamaStack
from policies.qsft.lora import add_lora, merge_lora, share_frozen_weights
from policies.qsft.qsft import QSFTModel
from tests.policies.conftest import IMAGE_SIZE, observation
from tests.qsft.helpers import images, qsft_config

pytest.importorskip("peft")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA = ("policy.model.lora.rank=4", "policy.model.lora.train_modules=[projector]")
TEXTS = ["go", "pick up the red cube"]


def lora_model(seed: int = 0, *overrides: str) -> QSFTModel:
    torch.manual_seed(seed)
    return QSFTModel.create(qsft_config(*LORA, *overrides).policy.model, IMAGE_SIZE)


def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "image": images(2, 1), "next_image": images(2, 2), "action": torch.rand(2, 7, generator=g) * 2 - 1,
        "reward": torch.tensor([0.0, 1.0]), "terminal": torch.tensor([0.0, 1.0]), "instruction": TEXTS,
    }  # fmt: skip


def test_adapters_start_at_the_pretrained_model_and_only_they_train() -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = lora_model(0)
    torch.manual_seed(0)
    plain = QSFTModel.create(qsft_config().policy.model, IMAGE_SIZE)  # the same base weights, no adapters
    for part in (model.pi, model.q, model.q_target):
        adapted = {n.rsplit(".", 1)[-1] for n, m in part.named_modules() if isinstance(m, BaseTunerLayer)}
        assert adapted == set(PROJECTIONS)
    trained = [n for n, p in model.q.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n or ".projector." in n for n in trained)
    assert any(".projector." in n for n in trained) and not any(p.requires_grad for p in model.q_target.parameters())
    data = batch()
    with torch.no_grad():  # B = 0: every copy computes what the pretrained model computes
        for part, ref in ((model.pi, plain.pi), (model.q, plain.q)):
            ids = part.tokens.encode(data["action"])[:, :-1]
            torch.testing.assert_close(part.action_logits(part.prefix(data["image"], TEXTS), ids),
                                       ref.action_logits(ref.prefix(data["image"], TEXTS), ids))  # fmt: skip
    frozen = {n: p.clone() for n, p in model.q.named_parameters() if not p.requires_grad}
    target_before = {n: p.clone() for n, p in model.q_target.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    q_loss, bc_loss, _ = model.losses(data, 0.98, 1e-4)
    (q_loss + bc_loss).backward()
    assert all(p.grad is None for p in model.q.parameters() if not p.requires_grad)
    optimizer.step()
    model.update_target(0.5)
    params = dict(model.q.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())  # the base did not move
    assert any(p.abs().sum() > 0 for n, p in params.items() if ".lora_B" in n)  # the adapters moved off zero
    for name, new in model.q_target.named_parameters():  # Polyak on the adapters; the base stays the base
        expected = 0.5 * target_before[name] + 0.5 * params[name] if params[name].requires_grad else frozen[name]
        torch.testing.assert_close(new, expected)


@torch.no_grad()
def test_merged_model_acts_as_the_adapted_one_and_decodes_fused() -> None:
    model = lora_model(1).eval()
    for p in model.parameters():  # trained adapters: B away from zero
        p.add_(0.05 * torch.randn_like(p))
    lms = [model.pi.net.lm, model.q.net.lm]
    assert "not plain nn.Linear" in LlamaStack.unsupported(lms)  # adapters: the transformers path
    ims, ids = images(2, 3), model.tokens.encode(torch.rand(2, 4, 7) * 2 - 1)
    chosen = model.select(ims, TEXTS, 5, 2.0, generator=torch.Generator().manual_seed(0))
    scores = model.score(ims, TEXTS, ids, "ratio")
    merged = copy.deepcopy(model)
    assert merge_lora(merged) == 3 * 2 * len(PROJECTIONS)
    assert LlamaStack.unsupported([merged.pi.net.lm, merged.q.net.lm]) is None
    assert torch.equal(merged.select(ims, TEXTS, 5, 2.0, generator=torch.Generator().manual_seed(0)), chosen)
    torch.testing.assert_close(merged.score(ims, TEXTS, ids, "ratio"), scores, rtol=1e-4, atol=1e-6)


def test_the_three_copies_can_share_one_frozen_base_and_train_the_same() -> None:
    """share_frozen_weights (train_qsft in one process): p_theta and the target use pi_phi's frozen base
    weights; the adapters and train_modules stay their own, training and Polyak give exactly what three
    copies give, the state dict keeps every key (torch.distributed's full state dict too, as train_qsft
    saves and resumes), and merging for acting folds each copy's adapters into a weight of its own."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    three, shared = lora_model(0), lora_model(0)
    base = sum(p.numel() for n, p in shared.pi.named_parameters() if not p.requires_grad)
    assert share_frozen_weights(shared) == 2 * base
    assert sum(p.numel() for p in shared.parameters()) == sum(p.numel() for p in three.parameters()) - 2 * base
    key = "net.lm.model.layers.0.self_attn.q_proj"
    assert shared.q.get_parameter(f"{key}.base_layer.weight") is shared.pi.get_parameter(f"{key}.base_layer.weight")
    assert shared.q_target.get_parameter(f"{key}.base_layer.weight") is shared.pi.get_parameter(
        f"{key}.base_layer.weight"
    )
    for name in (f"{key}.lora_B.default.weight", "net.projector.0.weight"):  # trained: each copy its own
        assert shared.q.get_parameter(name) is not shared.pi.get_parameter(name)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (three, shared)]
    for step in range(2):
        losses = []
        for model, optimizer in zip((three, shared), optimizers, strict=True):
            optimizer.zero_grad()
            q_loss, bc_loss, _ = model.losses(batch(), 0.98, 1e-4)
            (q_loss + bc_loss).backward()
            optimizer.step()
            model.update_target(0.5)
            losses.append((q_loss.item(), bc_loss.item()))
        assert losses[0] == losses[1], step
    reference, state = three.state_dict(), shared.state_dict()
    assert list(state) == list(reference) and all(torch.equal(state[k], v) for k, v in reference.items())
    full = StateDictOptions(full_state_dict=True)
    assert list(get_model_state_dict(shared, options=full)) == list(get_model_state_dict(three, options=full))
    fresh = lora_model(1)  # other weights, shared too, then loaded with the checkpoint's
    share_frozen_weights(fresh)
    set_model_state_dict(fresh, get_model_state_dict(three, options=full), options=full)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in reference.items())
    ims, texts = images(2, 3), TEXTS
    merged_three, merged_shared = copy.deepcopy(three).eval(), copy.deepcopy(shared).eval()
    assert merge_lora(merged_three) == merge_lora(merged_shared) == 3 * 2 * len(PROJECTIONS)
    with torch.no_grad():
        for a, b in ((merged_three.pi, merged_shared.pi), (merged_three.q, merged_shared.q)):
            ids = a.tokens.encode(batch()["action"])[:, :-1]
            torch.testing.assert_close(
                b.action_logits(b.prefix(ims, texts), ids), a.action_logits(a.prefix(ims, texts), ids)
            )


def test_adapter_options_are_checked() -> None:
    cfg = OmegaConf.structured(qsft_config(*LORA).policy.model.lora)
    model = lora_model(0, "policy.model.lora.rank=0")
    with pytest.raises(UserError, match="target_modules"):
        add_lora(copy.deepcopy(model.pi), OmegaConf.merge(cfg, {"target_modules": ["no_such_layer"]}))
    with pytest.raises(UserError, match="no module named"):
        add_lora(copy.deepcopy(model.pi), OmegaConf.merge(cfg, {"train_modules": ["no_such_module"]}))
    with pytest.raises(UserError, match="alpha"):
        add_lora(copy.deepcopy(model.pi), OmegaConf.merge(cfg, {"alpha": 0}))


def test_lora_on_a_hugging_face_vlm_adapts_text_and_vision(tmp_path: Path) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from policies.qsft.backbone import HFVLMBackbone
    from policies.qsft.config import HFVLMConfig
    from tests.qsft.helpers import tiny_idefics3

    backbone = HFVLMBackbone.load(HFVLMConfig(source=str(tiny_idefics3(tmp_path)), prompt="<image>{instruction}"), 32)
    cfg = qsft_config(*LORA, "policy.model.lora.target_modules=[q_proj,v_proj]",
                      "policy.model.lora.train_modules=[connector]").policy.model.lora  # fmt: skip
    add_lora(backbone, cfg)
    adapted = [n for n, m in backbone.named_modules() if isinstance(m, BaseTunerLayer)]
    assert any("vision" in n for n in adapted) and any("text" in n for n in adapted)
    model = QSFTModel(backbone, labels="dummy")
    data = {**batch(), "image": images(2, 1, 32), "next_image": images(2, 2, 32)}
    q_loss, bc_loss, _ = model.losses(data, 0.98, 1e-4)
    (q_loss + bc_loss).backward()
    grads = {n for n, p in model.q.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n or ".connector." in n for n in grads)


@pytest.mark.tf
def test_train_qsft_with_adapters_from_a_vla_checkpoint(policy_data_dir: Path, tmp_path: Path) -> None:
    """2 steps from a train_policy checkpoint: the base weights are the checkpoint's, and the run acts (merged)."""
    from policies.base import make_policy
    from policies.qsft.policy import load_qsft
    from tests.policies.conftest import tiny_checkpoint
    from tests.qsft.test_train_qsft import ckpt, run

    init = tiny_checkpoint("vla", tmp_path / "sft")
    run_dir = run(policy_data_dir, tmp_path, "name=lora", "steps=2", "val_every=0", f"policy.model.init={init}", *LORA)
    base = load_file(str(ckpt(init, 0) / "model.safetensors"))
    after = load_file(str(ckpt(run_dir, 2) / "model.safetensors"))
    key = "lm.model.layers.0.self_attn.q_proj"
    assert torch.equal(after[f"q.net.{key}.base_layer.weight"], base[f"{key}.weight"])
    assert after[f"q.net.{key}.lora_B.default.weight"].abs().sum() > 0  # the adapters trained
    assert not torch.equal(after["q.net.projector.0.weight"], base["projector.0.weight"])  # train_modules
    assert torch.equal(after["q.net.lm.lm_head.weight"], base["lm.lm_head.weight"])  # frozen
    assert "share their frozen base weights" in (run_dir / "log.txt").read_text()  # one copy in memory
    for part in ("pi", "q_target"):  # the checkpoint still holds every copy
        assert torch.equal(after[f"{part}.net.{key}.base_layer.weight"], base[f"{key}.weight"])
    loaded = load_qsft(run_dir).model
    assert LlamaStack.unsupported([loaded.pi.net.lm, loaded.q.net.lm]) is None  # merged for acting
    cfg = qsft_config("policy.beta=2.0").policy
    cfg.checkpoint, cfg.device = str(run_dir), "cpu"
    actions = make_policy(cfg).sample_actions(observation(0), 3)
    assert actions.shape == (3, 1, 7) and np.isfinite(actions).all()


@pytest.mark.tf
def test_adapter_run_resumes_exactly(policy_data_dir: Path, tmp_path: Path) -> None:
    """4 steps straight == 2 steps, then resumed to 4 (frozen weights hold no optimiser state), bit for bit."""
    from tests.policies.conftest import tiny_checkpoint
    from tests.qsft.test_train_qsft import ckpt, run

    init = tiny_checkpoint("vla", tmp_path / "sft")
    extra = (f"policy.model.init={init}", "augment=true", *LORA)
    straight = run(policy_data_dir, tmp_path, "name=straight", "steps=4", *extra)
    run(policy_data_dir, tmp_path, "name=resumed", "steps=2", *extra)
    resumed = run(policy_data_dir, tmp_path, "name=resumed", "steps=4", *extra)
    a, b = (load_file(str(ckpt(d, 4) / "model.safetensors")) for d in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
