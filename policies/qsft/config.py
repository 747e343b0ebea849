"""Config schemas of Q-SFT: the `qsft` policy (`configs/policy/qsft.yaml`), the `vlm` group (Hugging Face
backbones, `configs/vlm/*.yaml`) and `train_qsft.py` (`configs/train_qsft.yaml`).

A `vlm=<name>` yaml is packaged at `policy.model`: it switches the backbone to `hf` and names the
model and its prompt, so `python train_qsft.py vlm=smolvlm` fine-tunes SmolVLM instead of the
project's tokenized VLA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from data.config import DataConfig
from policies.config import LearnedPolicyConfig, VLAModelConfig


@dataclass
class HFVLMConfig:
    """A Hugging Face image-text-to-text model (AutoModelForImageTextToText + AutoProcessor)."""

    # Hub id or local directory of the model and its processor, e.g. HuggingFaceTB/SmolVLM-256M-Instruct.
    source: str | None = None
    # Text before the action tokens. {instruction} is the lower-cased instruction; it must hold the
    # family's image placeholder where the processor expects one (SmolVLM/Idefics3: "<image>",
    # Qwen2-VL: "<|vision_start|><|image_pad|><|vision_end|>"; PaliGemma adds its own).
    prompt: str = "<image>In: What action should the robot take to {instruction}?\nOut:"
    # Weights dtype when loading: float32 or bfloat16 (bf16 halves the memory of the three copies).
    dtype: str = "float32"
    # While batch rows are fixed (evaluation, policies/base.py `fix_batch_rows`), every prompt is
    # left-padded to the prompt of an empty instruction plus this many tokens, so that a companion's
    # longer instruction does not change a row's length; a longer instruction is an error.
    max_text_tokens: int = 64


@dataclass
class LoRAConfig:
    """Low-rank adapters instead of full fine-tuning (policies/qsft/lora.py; needs peft)."""

    # Rank of the adapters; 0 = off (every weight of pi_phi and p_theta trains).
    rank: int = 0
    # peft's lora_alpha: the adapter's output is scaled by alpha / rank.
    alpha: float = 16.0
    dropout: float = 0.0
    # Linear layers whose names end in one of these get adapters: the attention and MLP projections of
    # Llama / Gemma / Qwen / SmolVLM (text and vision towers); peft's names (e.g. out_proj, fc1) work too.
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # Modules trained fully alongside the adapters, by name (e.g. projector for the VLA, a VLM's connector).
    train_modules: list[str] = field(default_factory=list)


@dataclass
class QSFTModelConfig:
    """The backbone of pi_phi, p_theta and the target: the project's VLA or a Hugging Face VLM."""

    # vla: policies/vla.py (random init, or `init` a train_policy.py checkpoint); hf: the `hf` section.
    backbone: str = "vla"
    vla: VLAModelConfig = field(default_factory=VLAModelConfig)
    hf: HFVLMConfig = field(default_factory=HFVLMConfig)
    # backbone=vla: a train_policy.py `vla` run or checkpoint directory that pi_phi, p_theta and the
    # target start from (its architecture replaces `vla`); null = one random initialisation shared by all three.
    init: str | None = None
    # Where the soft label puts the 1 - y not on the dataset token (it also defines p_theta at acting time):
    # "uniform" = spread over the other 255 action tokens (Eq. 3); "dummy" = on one extra token (id
    # first action id - 1), the paper's dummy-action form, whose optimum p_theta(a|s) = pi_beta(a|s) Q(s, a)
    # makes p_theta / pi_phi unbiased (docs/qsft.md: with 256 actions the uniform form biases it up).
    labels: str = "uniform"
    # Adapters instead of full fine-tuning (rank 0 = off).
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class QSFTPolicyConfig(LearnedPolicyConfig):
    """Acting with a trained Q-SFT checkpoint: pi(a|s) ∝ pi_phi(a|s) exp(beta p_theta(a|s)), token by token."""

    name: str = "qsft"
    model: QSFTModelConfig = field(default_factory=QSFTModelConfig)
    # beta of the selection rule (paper: 1 for language tasks, 4-8 for games); 0 = plain pi_phi.
    beta: float = 1.0
    # Sampling temperature of the re-weighted token distribution; 0 = greedy.
    temperature: float = 1.0
    # Sample among the top_k tokens only (0 = all 256 action tokens).
    top_k: int = 0
    # What beta multiplies: p_theta (the paper's rule) or ratio = p_theta / pi_phi (the backup's Q
    # estimate; with labels=dummy p_theta ≈ pi_beta Q), over tokens with pi_phi > select_floor.
    select_value: str = "p_theta"
    select_floor: float = 0.02
    # Decode pi_phi and p_theta as one stack, one batched forward per token (policies/llama_stack.py;
    # Llama VLA backbones; same numbers); false: each model through transformers' forward in turn.
    fused: bool = True


@dataclass
class TrainQSFTConfig:
    """`python train_qsft.py [vlm=<name>] data=<name>`: Q-SFT on prepared robot episodes."""

    data: DataConfig = MISSING
    # The qsft policy group; its `model` section is the backbone trained.
    policy: Any = MISSING
    steps: int = 10_000
    batch_size: int = 64
    seed: int = 42
    # AdamW learning rates of p_theta (lr) and pi_phi (lr_behaviour); paper Table 4: 1e-4 .. 3e-4.
    lr: float = 1e-4
    lr_behaviour: float = 1e-4
    weight_decay: float = 0.01
    # Linear warm-up, then cosine decay to min_lr_ratio * lr (or constant with lr_schedule=constant).
    warmup_steps: int = 500
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    # Clip the gradient norm of each model (0 = off).
    grad_clip: float = 1.0
    # Discount between robot steps; inside an action the 7 tokens are undiscounted (gamma = 1).
    gamma: float = 0.98
    # Polyak rate of the target p_thetabar (paper: 0.005 or 0.01).
    polyak: float = 0.005
    # The backup's max over next tokens runs over tokens with pi_phi > pi_floor only (paper: 1e-4),
    # and pi_phi's most likely token. With 256 action tokens a larger floor (1e-2) curbs the max's
    # over-estimation from rarely seen tokens (docs/qsft.md).
    pi_floor: float = 1e-4
    # Q targets: "max" = Q-SFT's bootstrapped backup above; "double" = the same with double Q-learning
    # (p_theta picks the next token, the target p_thetabar values it; one more prefix forward of
    # p_theta per step, an eval-mode pass over s and s' if it has BatchNorm or dropout; on Lift it
    # picked the same tokens as max, docs/qsft.md); "mc" = a diagnostic
    # that regresses p_theta on the data's Monte-Carlo returns instead (behaviour Q, no bootstrapping; needs
    # data.reward.success_reward=1 data.reward.step_reward=0 data.reward.discount=<gamma>).
    backup: str = "max"
    # pi_phi: "joint" = SFT alongside Q-SFT (separate parameters, loss = q_loss + bc_weight * bc_loss,
    # the author's code); "frozen" = kept as initialised (trained beforehand with train_policy.py and
    # given as policy.model.init, the paper's Algorithm 1).
    behaviour: str = "joint"
    bc_weight: float = 1.0
    # Image augmentation (random resized crop + colour jitter, data/augment.py), same crop for s and s'.
    augment: bool = False
    # Recompute activations in the backward pass (transformers gradient checkpointing): less memory.
    gradient_checkpointing: bool = False
    # Output: <run_root>/train_qsft/<name or timestamp>/; rerunning with the same name resumes.
    run_root: str = "runs"
    name: str | None = None
    # Resume from this run directory's latest checkpoint (default: the run directory itself).
    resume: str | None = None
    log_every: int = 100
    val_every: int = 2000
    val_batches: int = 10
    ckpt_every: int = 2000
    keep_checkpoints: int = 3
    # auto (cuda if available), cuda, cpu.
    device: str = "auto"
    # bf16 autocast (GPU only).
    bf16: bool = True


def register(cs: Any) -> None:
    cs.store(group="policy", name="qsft_schema", node=QSFTPolicyConfig)
    cs.store(name="train_qsft_schema", node=TrainQSFTConfig)
