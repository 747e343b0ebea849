"""Config schemas of the policy group (`configs/policy/*.yaml`) and of `train_policy.py`.

Each policy has its own schema (a subclass of `PolicyConfig`) registered as `<name>_schema`; its
yaml starts with `defaults: [<name>_schema]` and only chooses values.

The learned policies (`vla`, `flow`) have a `model` section (the architecture, used when training)
and inference options. A trained policy is loaded with `policy.checkpoint=<dir>`: the architecture
then comes from the checkpoint's own config, and only the inference options from the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from data.config import DataConfig


@dataclass
class PolicyConfig:
    # Registry name of the policy (policies/base.py POLICIES).
    name: str = MISSING


@dataclass
class RandomPolicyConfig(PolicyConfig):
    name: str = "random"
    # Arm deltas are uniform in +-translation metres and +-rotation radians per step.
    translation: float = 0.02
    rotation: float = 0.1
    chunk: int = 1
    seed: int = 0


# --- architectures -------------------------------------------------------------------------------


@dataclass
class VisionConfig:
    """A timm image encoder whose feature map (CNN) or patch tokens (ViT) become tokens."""

    # timm architecture: resnet18 (default), resnet10t, vit_tiny_patch16_224, ... (any timm model
    # with `forward_features`).
    arch: str = "resnet18"
    # Load timm's pretrained weights (downloads from the hub; random initialisation otherwise).
    pretrained: bool = False
    # Side length images are resized to before the encoder; null = the training images' size.
    image_size: int | None = None
    # Average-pool a CNN feature map larger than grid x grid down to grid x grid tokens (bounds the
    # sequence length at large image sizes); null keeps every position.
    grid: int | None = None
    # Extra keyword arguments of timm.create_model, e.g. {img_size: 64, depth: 6} for a ViT.
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LMConfig:
    """The causal language model of the VLA (transformers)."""

    # A hub id or local directory of a pretrained causal LM and its tokenizer (e.g.
    # HuggingFaceTB/SmolLM2-135M): action tokens then take the tokenizer's last 256 ids, as OpenVLA
    # does with Llama-2. null = a Llama built from the fields below (random init, byte tokenizer).
    pretrained: str | None = None
    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    # Key/value heads (grouped-query attention); null = heads.
    kv_heads: int | None = None
    # MLP width; null = 8/3 * hidden_size rounded up to a multiple of 64 (Llama's ratio).
    intermediate_size: int | None = None
    max_positions: int = 1024
    attention_dropout: float = 0.0


@dataclass
class VLAModelConfig:
    """The tokenized VLA: vision encoder -> MLP projector -> causal LM over [bos, image, prompt, 7 actions]."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    # The text before the action tokens; {instruction} is the lower-cased instruction. OpenVLA:
    # "In: What action should the robot take to {instruction}?\nOut:".
    prompt: str = "{instruction}"
    # Prompts are cut to this many text tokens.
    max_text_tokens: int = 64


@dataclass
class FlowModelConfig:
    """The chunked flow-matching policy: image + instruction tokens -> transformer trunk -> readout -> flow head."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    # Trunk transformer (pre-norm) width, depth and heads.
    width: int = 256
    layers: int = 4
    heads: int = 4
    # Instructions are cut to this many byte tokens.
    max_text_tokens: int = 64
    # Actions per predicted chunk (Octo: 4).
    chunk: int = 4
    # Flow head: residual MLP (Octo's diffusion head shape) with this width and number of blocks.
    head_hidden: int = 256
    head_blocks: int = 3
    # Euler integration steps from noise (t = 0) to actions (t = 1) when sampling.
    flow_steps: int = 10


# --- policies ------------------------------------------------------------------------------------


@dataclass
class LearnedPolicyConfig(PolicyConfig):
    # A checkpoint directory or a train_policy run directory (its latest checkpoint). Required to
    # act; the architecture and normalisation statistics come from it.
    checkpoint: str | None = None
    # Dataset whose statistics un-normalise the actions (OpenVLA's unnorm_key); null = the
    # checkpoint's only dataset.
    unnorm_key: str | None = None
    # auto (cuda if available), cuda, cpu.
    device: str = "auto"
    # Seed of the sampling noise (mixed with each episode's seed: Policy.episode_stream).
    seed: int = 0


@dataclass
class VLAPolicyConfig(LearnedPolicyConfig):
    name: str = "vla"
    model: VLAModelConfig = field(default_factory=VLAModelConfig)
    # Sampling temperature of the action tokens; 0 = greedy (every one of the K samples identical).
    temperature: float = 1.0
    # Sample among the top_k action tokens only (0 = all 256; transformers' generate uses 50).
    top_k: int = 0
    # Decode a Llama LM with policies/llama_stack.py (same numbers, less overhead); false: transformers' forward.
    fused: bool = True


@dataclass
class FlowPolicyConfig(LearnedPolicyConfig):
    name: str = "flow"
    model: FlowModelConfig = field(default_factory=FlowModelConfig)
    # Scale of the initial noise (1 = the trained distribution; 0 = deterministic, the flow's mean path).
    noise_scale: float = 1.0
    # `act`: re-plan every exec_horizon steps and execute the chunk in between (1 = every step).
    exec_horizon: int = 1
    # `act`: temporal ensembling of what the last `chunk` predictions planned for the current step
    # (Octo's ActionEnsembler; needs exec_horizon 1): weights exp(-ensemble_temp * i), i = 0 for the
    # oldest prediction; 0 = uniform (SimplerEnv's setting).
    ensemble: bool = False
    ensemble_temp: float = 0.0


@dataclass
class SteerConfig:
    """V-GPS value steering (policies/steering.py), used with `steer=true`: `steering.<field>=<value>`."""

    # The critic: a train_value.py run directory (its latest checkpoint) or checkpoint directory, or
    # a train_qsft.py one (its Q-model scores the candidates); required with steer=true. "random"
    # scores candidates i.i.d. at random: the sanity check that a gain comes from the learned values
    # (V-GPS's "random-selecting" ablation).
    critic: str | None = None
    # Candidate chunks sampled from the policy per step (V-GPS: 10 in eval_vgps.py, 50 in eval_vgps.sh).
    k: int = 10
    # Temperature of softmax(Q / beta) over the candidates; 0 = argmax (V-GPS default 1.0; paper: 0, 0.1, 1).
    beta: float = 1.0
    # Critic parameters: target (V-GPS) or online.
    params: str = "target"
    # With a Q-SFT checkpoint (train_qsft.py) as the critic: p_theta (the paper's conservative
    # estimate of Q) or ratio (p_theta / pi_phi, the estimate the backup uses); docs/qsft.md compares them.
    qsft_mode: str = "p_theta"
    # Which training dataset's statistics normalise queried actions (a critic trained on a mixture);
    # null = its only dataset.
    dataset: str | None = None
    # auto (cuda if available), cuda, cpu.
    device: str = "auto"
    # Seed of the softmax sampling and of a random critic (mixed with each episode's seed: Policy.episode_stream).
    seed: int = 0
    # GPU only: bf16 autocast of the critic (train_value trains with it), and one CUDA graph per
    # batch shape (removes the critic's kernel-launch overhead: on one H200, K=50 steering costs
    # 1.34x the policy's step with graphs, 2.13x without; docs/steering.md).
    bf16: bool = True
    cuda_graphs: bool = True
    # GPU only: encode the observation on a side CUDA stream while the policy samples its candidates
    # (false: the encoder runs before the policy on the same stream); docs/steering.md.
    overlap: bool = True
    # Executing the chosen chunk (policies/chunking.py): re-steer every exec_horizon steps; or
    # temporal ensembling of the chosen chunks (V-GPS feeds them to Octo's ActionEnsembler, temp 0).
    exec_horizon: int = 1
    ensemble: bool = False
    ensemble_temp: float = 0.0


# --- served policies (policies/remote.py, policies/server.py, policies/octo.py; docs/serving.md) ----


@dataclass
class RemotePolicyConfig(PolicyConfig):
    """A policy behind `serve_policy.py` (or any server of its wire format), as a client."""

    name: str = "remote"
    # Server host name or address, or a full ws:// / wss:// URI (then `port` is ignored).
    host: str = "localhost"
    port: int = 8000
    # Seconds to wait for each reply; a later reply is discarded. Octo compiles on the first call of
    # each K (tens of seconds) unless the server warms up (serve_policy.py warmup_k=[1,10]).
    timeout_s: float = 30.0
    # Seconds to keep retrying while the server is not up yet.
    connect_timeout_s: float = 30.0
    # Sent as openpi's `Authorization: Api-Key <key>` header; must match the server's api_key.
    api_key: str | None = None


@dataclass
class OctoPolicyConfig(PolicyConfig):
    """Octo in its own JAX environment, served by `serve_policy.py policy=octo` (policies/octo.py)."""

    name: str = "octo"
    # `hf://rail-berkeley/octo-small-1.5` (also octo-base-1.5) or a checkpoint directory.
    checkpoint: str = "hf://rail-berkeley/octo-small-1.5"
    # Checkpoint step of a directory with several (null = the latest; not for hf://).
    step: int | None = None
    # Key of model.dataset_statistics whose action statistics un-normalise the actions (Bridge/WidowX).
    dataset: str = "bridge_dataset"
    # Observation history (Octo 1.5: up to 2) and actions per predicted chunk (Octo: 4).
    window: int = 2
    chunk: int = 4
    # Primary image side after resizing (Octo's primary camera: 256).
    image_size: int = 256
    # Seed of the diffusion head's noise (mixed with each episode's seed: Policy.episode_stream).
    seed: int = 0
    # `act`: re-plan every exec_horizon steps, or temporal ensembling (SimplerEnv's Octo setting:
    # exec_horizon 1, ensembling with uniform weights, ensemble_temp 0).
    exec_horizon: int = 1
    ensemble: bool = True
    ensemble_temp: float = 0.0


@dataclass
class ServePolicyConfig:
    """`python serve_policy.py policy=<name> port=8000` (policies/server.py)."""

    # The policy group: the policy that is served; each connection gets its own instance.
    policy: Any = MISSING
    # Interface to listen on (0.0.0.0: every interface; 127.0.0.1: this machine only) and port.
    host: str = "0.0.0.0"
    port: int = 8000
    # Largest request in bytes that gets an answer; a larger one gets an error reply, and one over
    # twice this closes its connection (code 1009). A 256 x 256 RGB observation is ~197 kB.
    max_size: int = 16 * 2**20
    # Connections served at once; more are refused (close code 1013).
    max_clients: int = 4
    # Largest K of a sample_actions request.
    max_k: int = 1024
    # If set, clients must send it (openpi's `Authorization: Api-Key <key>`); /healthz stays open.
    api_key: str | None = None
    # Run sample_actions once per K listed before serving (JAX compiles once per K: Octo takes tens of
    # seconds), e.g. [1, 10] for act and steering with K=10.
    warmup_k: list[int] = field(default_factory=list)


# --- training ------------------------------------------------------------------------------------


@dataclass
class TrainPolicyConfig:
    """`python train_policy.py policy=vla|flow data=<name>`."""

    data: DataConfig = MISSING
    # The policy group (vla or flow); its `model` section is the architecture trained.
    policy: Any = MISSING
    steps: int = 100_000
    batch_size: int = 64
    seed: int = 42
    # AdamW.
    lr: float = 3e-4
    weight_decay: float = 0.01
    # Linear warm-up, then cosine decay to min_lr_ratio * lr (or constant with lr_schedule=constant).
    warmup_steps: int = 1000
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    # Clip the gradient norm (0 = off).
    grad_clip: float = 1.0
    # Image augmentation (random resized crop + colour jitter, data/augment.py).
    augment: bool = False
    # Output: <run_root>/train_policy/<name or timestamp>/; rerunning with the same name resumes.
    run_root: str = "runs"
    name: str | None = None
    # Resume from this run directory's latest checkpoint (default: the run directory itself).
    resume: str | None = None
    log_every: int = 100
    val_every: int = 5000
    val_batches: int = 10
    ckpt_every: int = 10_000
    # Keep only the last N checkpoints.
    keep_checkpoints: int = 3
    # Device: auto (cuda if available), cuda, cpu.
    device: str = "auto"
    # bf16 autocast and channels-last convolutions (GPU only).
    bf16: bool = True
    channels_last: bool = True


def register(cs: Any) -> None:
    cs.store(group="policy", name="random_schema", node=RandomPolicyConfig)
    cs.store(group="policy", name="vla_schema", node=VLAPolicyConfig)
    cs.store(group="policy", name="flow_schema", node=FlowPolicyConfig)
    cs.store(name="train_policy_schema", node=TrainPolicyConfig)
    cs.store(group="policy", name="remote_schema", node=RemotePolicyConfig)
    cs.store(group="policy", name="octo_schema", node=OctoPolicyConfig)
    cs.store(name="serve_policy_schema", node=ServePolicyConfig)
    from policies.openvla.config import OpenVLAPolicyConfig  # its own module: policies/openvla/config.py

    cs.store(group="policy", name="openvla_schema", node=OpenVLAPolicyConfig)
