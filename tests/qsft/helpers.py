"""Tiny Q-SFT models and checkpoints for the tests (tiny VLA backbone, tiny random Idefics3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from configs import CONFIG_DIR
from configs.schema import register
from tests.policies.conftest import IMAGE_SIZE, fake_stats

TINY_QSFT = [
    "policy.model.vla.vision.arch=vit_tiny_patch16_224",
    "+policy.model.vla.vision.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
    "policy.model.vla.vision.grid=null",
    "policy.model.vla.lm.hidden_size=32", "policy.model.vla.lm.layers=2", "policy.model.vla.lm.heads=2",
]  # fmt: skip


def qsft_config(*overrides: str) -> DictConfig:
    """The train_qsft config of a tiny VLA backbone with `overrides`."""
    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose("train_qsft", overrides=[*TINY_QSFT, *overrides])


def tiny_qsft_model(seed: int = 0) -> Any:
    import torch

    from policies.qsft.qsft import QSFTModel

    torch.manual_seed(seed)
    return QSFTModel.create(qsft_config().policy.model, IMAGE_SIZE)


def tiny_qsft_checkpoint(root: Path, seed: int = 0) -> Path:
    """A checkpoint of a random tiny Q-SFT model, as train_qsft writes it (p_theta perturbed away from pi_phi)."""
    import torch

    from policies.learned import save_policy_checkpoint

    model = tiny_qsft_model(seed)
    with torch.no_grad():
        for p in model.q.parameters():
            p.add_(0.05 * torch.randn_like(p))
    meta = {"policy": "qsft", "image_size": IMAGE_SIZE, "chunk": 1, "normalization": "bounds_q99"}
    save_policy_checkpoint(root, 0, model, {}, qsft_config(), fake_stats(seed), meta)
    return root


def qsft_contract_config(root: Path) -> DictConfig:
    """The `policy=qsft` node acting with a tiny checkpoint (tests/policies/conftest.py CONTRACT_BUILDERS)."""
    cfg = qsft_config().policy
    cfg.checkpoint, cfg.device = str(tiny_qsft_checkpoint(root)), "cpu"
    return cfg


def images(n: int, seed: int = 0, size: int = IMAGE_SIZE) -> Any:
    import torch

    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def tiny_idefics3(root: Path) -> Path:
    """A random SmolVLM-style Idefics3 (~60k parameters) and its processor saved in `root`, loadable by path.

    The tokenizer is built in code: a character-level vocabulary whose last 256 base ids are the
    action tokens, plus the Idefics3 image tokens as added (special) tokens after them.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        PreTrainedTokenizerFast,
    )

    words = ["<unk>", "<pad>", "<s>", "</s>"] + [chr(c) for c in range(32, 127)] + [f"<act{i}>" for i in range(256)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>")  # fmt: skip
    tok.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>", "<global-img>"]})
    images = Idefics3ImageProcessor(size={"longest_edge": 16}, max_image_size={"longest_edge": 16},
                                    do_image_splitting=False)  # fmt: skip
    processor = Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4)
    config = Idefics3Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 16, "patch_size": 4},
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "pad_token_id": tok.pad_token_id},
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    import torch

    torch.manual_seed(0)
    Idefics3ForConditionalGeneration(config).save_pretrained(root)
    processor.save_pretrained(root)
    return root
