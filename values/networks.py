"""Networks of value learning: FiLM ResNet encoder, ensemble Q heads, actor, value (reference/vgps.md).

V-GPS's critic (`resnetv1-34-bridge-film`, 25.6M parameters): a ResNet-34 with GroupNorm(4) and
swish, two coordinate channels appended to the RGB input (pixels in [-1, 1]), zero-initialised FiLM
`x * (1 + gamma(l)) + beta(l)` after every residual block, global average pooling; the embedding is
concatenated with the 7-D normalised action and fed to 2 MLP heads [256, 256] (swish, no LayerNorm)
with one scalar output each. Here the ResNet comes from timm and the heads of the ensemble are one
batched matmul.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import timm
import torch
from torch import nn
from torch.nn import functional as F

from configs.errors import UserError
from values.config import EncoderConfig, ValueConfig

ACTION_DIM = 7
STATE_DIM = 7  # the canonical observation state [x, y, z, roll, pitch, yaw, gripper] (DESIGN.md)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that keeps a bf16 / fp16 input's precision under autocast.

    CUDA autocast runs group_norm in float32 (PyTorch's autocast op reference lists it among the CUDA
    ops that autocast to float32), so in a bf16 network every norm casts its input up,
    everything after it until the next convolution (SiLU, the residual add, FiLM) runs in float32,
    and the convolution casts back: about 1,400 conversions per Cal-QL update on the H200 profile
    (docs/values.md). The kernel accumulates its statistics in float32 either way; here the output
    stays in the input's dtype, as batch norm's does under autocast (CPU autocast already does this).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 or not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            weight, bias = (None, None) if self.weight is None else (self.weight.to(x.dtype), self.bias.to(x.dtype))
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)


def _group_norm(groups: int):
    return lambda channels, **kw: GroupNorm(groups, channels, **kw)


def images_to_input(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    x = images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # HWC -> CHW
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def coordinate_channels(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(1, 2, H, W): x then y, each in [-1, 1] (V-GPS's coordinate channels)."""
    ys = torch.linspace(-1, 1, height, device=device).view(1, 1, height, 1).expand(1, 1, height, width)
    xs = torch.linspace(-1, 1, width, device=device).view(1, 1, 1, width).expand(1, 1, height, width)
    return torch.cat([xs, ys], dim=1)


class CoordStemConv(nn.Conv2d):
    """The encoder's first convolution over RGB + 2 coordinate channels, given the RGB image alone.

    A convolution is linear in its input channels, so conv([rgb, xy]) = conv_rgb(rgb) + conv_xy(xy)
    (zero padding included), and the coordinate term is the same for every image: it is computed on
    a batch of one and broadcast. That saves building and reading a (B, 5, H, W) input, and the
    convolution over the batch has 3 input channels, the ImageNet stem every convolution library
    tunes, instead of 5. The parameters are those of the 5-channel convolution (same names and
    shapes), so checkpoints are unchanged.
    """

    @classmethod
    def replacing(cls, conv: nn.Conv2d) -> CoordStemConv:
        stem = nn.utils.skip_init(  # no initialisation of its own: the random stream stays the network's
            cls, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
        )  # fmt: skip
        stem.load_state_dict(conv.state_dict())
        return stem

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        xy = coordinate_channels(rgb.shape[-2], rgb.shape[-1], rgb.device)
        return self._conv_forward(rgb, self.weight[:, :3], None) + self._conv_forward(xy, self.weight[:, 3:], self.bias)


class FiLM(nn.Module):
    """x * (1 + gamma) + beta with gamma, beta linear in the conditioning; zero-initialised (identity)."""

    def __init__(self, cond_dim: int, channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.proj(cond).to(x.dtype)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        return torch.addcmul(beta, x, 1 + gamma)  # one elementwise pass over x, not two


class FiLMResNet(nn.Module):
    """uint8 images (B, H, W, 3) + instruction embeddings (B, D) -> (B, out_dim) features.

    `proprio_dim` > 0 (value.proprio): the normalised state (B, proprio_dim) is appended to the pooled
    features, as jaxrl_m's encoder wrapper does with use_proprio, so every head reads it.
    """

    def __init__(self, cfg: EncoderConfig, cond_dim: int, channels_last: bool = False, proprio_dim: int = 0) -> None:
        super().__init__()
        self.channels_last, self.proprio_dim = channels_last, proprio_dim
        kwargs = {"act_layer": nn.SiLU if cfg.act == "silu" else nn.ReLU}
        if cfg.norm_groups:
            kwargs["norm_layer"] = _group_norm(cfg.norm_groups)
        if not timm.is_model(cfg.arch):
            raise UserError(f"value.encoder.arch={cfg.arch!r} is not a timm architecture; V-GPS uses resnet34 (also "
                            "resnet18, resnet10t; timm.list_models('resnet*') lists them).")  # fmt: skip
        self.net = timm.create_model(
            cfg.arch, pretrained=False, num_classes=0, global_pool="", in_chans=3 + 2 * cfg.coord_channels, **kwargs
        )
        if cfg.coord_channels:  # the first convolution of the stem (timm's deep stems are a Sequential)
            if isinstance(self.net.conv1, nn.Sequential):
                self.net.conv1[0] = CoordStemConv.replacing(self.net.conv1[0])
            else:
                self.net.conv1 = CoordStemConv.replacing(self.net.conv1)
        self.blocks = [block for name in ("layer1", "layer2", "layer3", "layer4") for block in getattr(self.net, name)]
        self.films = nn.ModuleList(FiLM(cond_dim, _out_channels(b)) for b in self.blocks)
        self.out_dim = int(self.net.num_features) + proprio_dim

    def forward(self, images: torch.Tensor, cond: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        net = self.net
        x = images_to_input(images, self.channels_last)
        x = net.maxpool(net.act1(net.bn1(net.conv1(x))))
        for block, film in zip(self.blocks, self.films, strict=True):
            x = film(block(x), cond)
        features = x.float().mean(dim=(2, 3))
        if not self.proprio_dim:
            return features
        if state is None or state.shape != (len(features), self.proprio_dim):
            got = None if state is None else tuple(state.shape)
            raise ValueError(f"this encoder reads the state (value.proprio=true): it needs a normalised state of "
                             f"shape ({len(features)}, {self.proprio_dim}), got {got}")  # fmt: skip
        return torch.cat([features, state.float()], dim=-1)


def value_encoder(cfg: ValueConfig, cond_dim: int, channels_last: bool = False) -> FiLMResNet:
    """The image encoder of a value config (a ValueConfig or its node; a config saved before
    value.proprio existed reads as proprio false)."""
    proprio = bool(getattr(cfg, "proprio", False))
    return FiLMResNet(cfg.encoder, cond_dim, channels_last, STATE_DIM if proprio else 0)


def _out_channels(block: nn.Module) -> int:
    last = getattr(block, "conv3", None) or block.conv2  # Bottleneck or BasicBlock
    return int(last.out_channels)


class EnsembleMLP(nn.Module):
    """E independent MLPs evaluated with batched matmuls: (E, N, in) or (N, in) -> (E, N, out).

    Always in float32, also under bf16 autocast: bf16 keeps 8 bits of mantissa, so a Q near -40 would
    come out in steps of 0.25, which ties candidates that steering must rank (their Qs often differ by
    less) and adds that much noise to the TD and CQL residuals. The heads cost little next to the encoder.
    """

    def __init__(self, ensemble: int, in_dim: int, hidden: Sequence[int], out_dim: int) -> None:
        super().__init__()
        dims = [in_dim, *hidden, out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in itertools.pairwise(dims):
            bound = 1 / math.sqrt(fan_in)  # torch.nn.Linear's default initialisation, per member
            self.weights.append(nn.Parameter(torch.empty(ensemble, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(ensemble, 1, fan_out).uniform_(-bound, bound)))
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.ensemble, -1, -1)
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
                x = torch.baddbmm(b, x, w)  # (E, N, in) @ (E, in, out) + (E, 1, out)
                if i < len(self.weights) - 1:
                    x = F.silu(x)
        return x


class Critic(nn.Module):
    """Q(s, a, l): FiLM encoder shared by an ensemble of heads over [embedding, normalised action]."""

    def __init__(self, encoder: FiLMResNet, hidden: Sequence[int], ensemble: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = EnsembleMLP(ensemble, encoder.out_dim + ACTION_DIM, hidden, 1)

    def embed(self, images: torch.Tensor, lang: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """(B, H, W, 3) uint8, (B, D) [, normalised state (B, 7) if the encoder reads it] -> (B, F)."""
        return self.encoder(images, lang, state)

    def q_from_embedding(self, emb: torch.Tensor, actions: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """(B, F) and (B, 7) -> (E, B); or (B, N, 7) -> (E, B, N) (N actions per state).

        `frozen`: use detached head weights, so a loss on the result trains only what produced
        `actions` (the actor), not the critic.
        """
        per_state = actions.dim() == 3
        B, N = actions.shape[0], actions.shape[1] if per_state else 1
        # every action sees its state's embedding: (B, F) -> (B * N, F)
        rows = emb.repeat_interleave(N, dim=0) if per_state else emb
        x = torch.cat([rows, actions.reshape(B * N, ACTION_DIM).to(rows.dtype)], dim=-1)
        if frozen:
            params = {name: p.detach() for name, p in self.heads.named_parameters()}
            q = torch.func.functional_call(self.heads, params, (x,))
        else:
            q = self.heads(x)
        return q.view(-1, B, N) if per_state else q.view(-1, B)

    def q(
        self, images: torch.Tensor, lang: torch.Tensor, actions: torch.Tensor, state: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The Critic contract: (B, H, W, 3), (B, D), normalised (B, 7) -> (ensemble, B); `state`: the
        normalised state (B, 7), for a critic trained with value.proprio=true."""
        return self.q_from_embedding(self.embed(images, lang, state), actions)


class Actor(nn.Module):
    """Gaussian policy over normalised actions, tanh-squashed (SAC / Cal-QL) or not (IQL's AWR).

    `encoder=None` (value.actor_encoder=critic): no encoder of its own; `head` reads an embedding
    given by the agent (the critic's), of size `in_dim`.
    """

    def __init__(
        self, encoder: FiLMResNet | None, hidden: Sequence[int], tanh_squash: bool = True, in_dim: int = 0
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.mlp = EnsembleMLP(1, encoder.out_dim if encoder is not None else in_dim, hidden, 2 * ACTION_DIM)
        self.tanh_squash = tanh_squash

    def forward(
        self, images: torch.Tensor, lang: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> mean (B, 7) and std (B, 7) of the pre-squash Gaussian ("exp" std, log-std in [-20, 2])."""
        return self.head(self.encoder(images, lang, state))

    def head(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same from an embedding (B, F)."""
        mean, log_std = self.mlp(emb)[0].float().chunk(2, dim=-1)
        return mean, log_std.clamp(-20.0, 2.0).exp()

    def sample(
        self, mean: torch.Tensor, std: torch.Tensor, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """n reparameterised samples: actions (n, B, 7) and their log-probabilities (n, B)."""
        noise = torch.randn((n, *mean.shape), device=mean.device, generator=generator)
        u = mean + std * noise
        log_prob = (-0.5 * noise**2 - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
        if not self.tanh_squash:
            return u, log_prob
        # log|d tanh(u)/du| = log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), stable for large |u|
        log_prob = log_prob - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)
        return torch.tanh(u), log_prob

    def log_prob(self, mean: torch.Tensor, std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi(a|s) of given actions (B, 7) -> (B,) (un-squashed Gaussian only)."""
        if self.tanh_squash:
            raise ValueError("log_prob of dataset actions is only used by IQL's Gaussian actor")
        z = (actions - mean) / std
        return (-0.5 * z**2 - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


class ValueNet(nn.Module):
    """V(s, l) for IQL: FiLM encoder + MLP -> (B,); `encoder=None`: `head` over a given embedding (see Actor)."""

    def __init__(self, encoder: FiLMResNet | None, hidden: Sequence[int], in_dim: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        self.mlp = EnsembleMLP(1, encoder.out_dim if encoder is not None else in_dim, hidden, 1)

    def forward(self, images: torch.Tensor, lang: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(images, lang, state))

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        return self.mlp(emb)[0, :, 0].float()


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, rate: float) -> None:
    """Polyak averaging: target <- (1 - rate) target + rate source (parameters; buffers copied).

    Only the source's trained parameters move: a frozen one (e.g. a LoRA base weight) was copied into
    the target with the rest and never changes. FSDP-sharded parameters (DTensors) are averaged shard
    by shard, each rank its own.
    """
    pairs = [(t, s) for t, s in zip(target.parameters(), source.parameters(), strict=True) if s.requires_grad]
    if pairs:
        torch._foreach_lerp_([_local(t) for t, _ in pairs], [_local(s) for _, s in pairs], rate)
    for t, s in zip(target.buffers(), source.buffers(), strict=True):
        t.copy_(s)


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP-sharded parameter (a DTensor), or the parameter itself."""
    return param.to_local() if hasattr(param, "to_local") else param
