"""Config schemas of value learning: the `value` group (`configs/value/*.yaml`) and `train_value.py`.

Defaults reproduce V-GPS (reference/vgps.md): Cal-QL with alpha 5, discount 0.98 (in
`data.reward`), critic lr 3e-4, actor lr 1e-4, batch 256, 2000 warm-up steps, 2 critics, soft
target rate 5e-3, ResNet-34 with FiLM, 1M steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from data.config import DataConfig


@dataclass
class EncoderConfig:
    """Image encoder: a timm ResNet with FiLM conditioning on the instruction after every block."""

    # timm architecture: resnet34 (V-GPS), resnet18, or any timm ResNet (resnet10t for CPU tests).
    arch: str = "resnet34"
    # GroupNorm groups replacing BatchNorm (V-GPS: 4); 0 keeps timm's BatchNorm.
    norm_groups: int = 4
    # Activation: silu (V-GPS "swish") or relu.
    act: str = "silu"
    # Append two coordinate channels (x, y in [-1, 1]) to the RGB input, as V-GPS does.
    coord_channels: bool = True


@dataclass
class LanguageConfig:
    """Instruction encoder (values/language.py); embeddings are computed once per instruction."""

    # "hash": deterministic, offline (tests, the embedded default); "hf": a transformers sentence
    # encoder (mean pooling, L2-normalised) loaded from `model` (hub id or local directory).
    name: str = "hash"
    model: str = "sentence-transformers/all-MiniLM-L6-v2"
    # Embedding size of the hash encoder (the hf encoder's comes from the model; V-GPS MUSE: 512).
    dim: int = 512


@dataclass
class ValueConfig:
    """The value-learning algorithm and its networks."""

    # Algorithm: calql or iql.
    algo: str = MISSING
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    # Hidden sizes of the Q heads, the value head (IQL) and the actor MLP.
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    ensemble: int = 2
    critic_lr: float = 3e-4
    actor_lr: float = 1e-4
    temperature_lr: float = 3e-4
    value_lr: float = 3e-4
    # Linear learning-rate warm-up steps, then constant.
    warmup_steps: int = 2000
    # Clip each network's gradient (critic, actor, temperature or value: one norm per optimiser group)
    # to this global norm; 0 = no clipping. V-GPS: none for Cal-QL, 1.0 for IQL (optax
    # clip_by_global_norm before each network's Adam).
    grad_clip_norm: float = 0.0
    # Polyak rate of the target critic (V-GPS Cal-QL 5e-3, IQL 2e-3).
    target_update_rate: float = 5e-3
    # Cal-QL / CQL (jaxrl_m ContinuousCQLAgent as configured by V-GPS).
    cql_alpha: float = 5.0
    cql_n_actions: int = 4
    cql_temp: float = 1.0
    cql_importance_sample: bool = True
    cql_max_target_backup: bool = True
    # Cal-QL: lower-bound Q of policy actions by the Monte-Carlo return (false = plain CQL).
    use_calql: bool = True
    # SAC actor of Cal-QL: target entropy (-action_dim) and initial temperature.
    target_entropy: float = -7.0
    init_temperature: float = 1.0
    # IQL.
    expectile: float = 0.7
    awr_temperature: float = 1.0
    # Fraction of each batch whose instruction is replaced by another one (reward = failure,
    # MC return = step_reward / (1 - discount)); V-GPS: 0.0 for Cal-QL, 0.1 for IQL.
    negative_proportion: float = 0.0
    # The actor's (and IQL's V's) image encoder: "separate" (V-GPS: each network its own ResNet) or
    # "critic": their MLPs read the critic's embedding, without a gradient into it (the online
    # critic's where they train, the target critic's where they give targets). Steering uses the
    # critic alone; "critic" halves the encoder passes per update (Cal-QL 8 -> 4, IQL 11 -> 5 batch
    # passes, a backward counted as two), so training runs ~2x faster (docs/values.md). Not V-GPS's recipe.
    actor_encoder: str = "separate"
    # Proprioception: append the normalised robot state (the observation's 7-D `state`, normalised with
    # the dataset's "proprio" statistics like actions, all 7 dimensions) to the image-language
    # embedding that the Q heads, the actor and V read. V-GPS: use_proprio false (images only).
    # Steering then needs `state` in every observation (the sim and the WidowX client send it).
    proprio: bool = False
    # Image augmentation (V-GPS: random resized crop scale [0.8, 1], colour jitter), same for s, s'.
    augment: bool = True
    language: LanguageConfig = field(default_factory=LanguageConfig)


@dataclass
class TrainValueConfig:
    """`python train_value.py data=<name> value=calql|iql`."""

    data: DataConfig = MISSING
    value: ValueConfig = MISSING
    steps: int = 1_000_000
    batch_size: int = 256
    seed: int = 42
    # Output: <run_root>/train_value/<name or timestamp>/; rerunning with the same name resumes.
    run_root: str = "runs"
    name: str | None = None
    # Resume from this run directory's latest checkpoint (default: the run directory itself).
    resume: str | None = None
    log_every: int = 1000
    val_every: int = 20_000
    val_batches: int = 20
    ckpt_every: int = 100_000
    # Keep only the last N periodic checkpoints (the final one is always kept).
    keep_checkpoints: int = 3
    # Device: auto (cuda if available), cuda, cpu.
    device: str = "auto"
    # bf16 autocast (GPU only), channels-last convolutions, torch.compile of the networks.
    # channels_last is off by default: with the GroupNorm encoder it is slower (agent.update alone,
    # ResNet-34 @256, batch 256, bf16, torch 2.11, one H200: 998 samples/s vs 1,370 NCHW), since
    # torch's GroupNorm copies channels_last activations to NCHW and back (docs/values.md).
    bf16: bool = True
    channels_last: bool = False
    # torch.compile of the image encoders: null (the default) compiles on CUDA in NCHW (not with
    # channels_last=true, where inductor crashed) and not on the CPU, where it only adds compile time.
    # One H200, agent.update alone (ResNet-34 @256, batch 256, bf16, Cal-QL): 96.7 ms compiled vs 167 ms
    # eager (docs/values.md); compiling adds a minute or so at the start (not yet timed on its own).
    compile: bool | None = None


def register(cs: Any) -> None:
    cs.store(group="value", name="schema", node=ValueConfig)
    cs.store(name="train_value_schema", node=TrainValueConfig)
