"""Batched image augmentation on the training device (V-GPS / Octo recipe, reference/vgps.md).

Random resized crop (area scale [0.8, 1], aspect ratio [0.9, 1.1], resized back to the input size),
brightness +-0.1, contrast and saturation factors in [0.9, 1.1], hue shift +-0.05 turns. Each sample
draws its own parameters; `augment_pair` applies the same ones to an image and its next image, so a
transition stays consistent. Randomness comes only from the given generator, so a training step
augments identically after a resume.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

# RGB <-> YIQ: hue is a rotation of the (I, Q) plane.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def _uniform(n: int, low: float, high: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def augment_pair(
    image: torch.Tensor,
    next_image: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.8, 1.0),
    ratio: tuple[float, float] = (0.9, 1.1),
    brightness: float = 0.1,
    contrast: tuple[float, float] = (0.9, 1.1),
    saturation: tuple[float, float] = (0.9, 1.1),
    hue: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, H, W, 3) twice -> augmented uint8 (B, H, W, 3) twice, same parameters per sample."""
    B, _H, _W, _ = image.shape
    dev, g = image.device, generator
    area = _uniform(B, *scale, g, dev)
    aspect = torch.exp(_uniform(B, math.log(ratio[0]), math.log(ratio[1]), g, dev))
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # crop size as fractions of the image
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(B, generator=g, device=dev) * 2 - 1) * (1 - w)  # crop centre in [-1, 1] coords
    cy = (torch.rand(B, generator=g, device=dev) * 2 - 1) * (1 - h)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    jitter = (
        _uniform(B, -brightness, brightness, g, dev),
        _uniform(B, *contrast, g, dev),
        _uniform(B, *saturation, g, dev),
        _uniform(B, -hue, hue, g, dev) * 2 * math.pi,
    )
    return tuple(_apply(x, theta, jitter) for x in (image, next_image))  # type: ignore[return-value]


def _apply(images: torch.Tensor, theta: torch.Tensor, jitter: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x = images.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    bright, contrast, sat, hue = (j.view(-1, 1, 1, 1) for j in jitter)
    x = x + bright
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    gray = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = (x - gray) * sat + gray
    yiq = torch.einsum("ij,bjhw->bihw", _RGB_TO_YIQ.to(x.device), x)
    cos, sin = hue.cos().view(-1, 1, 1), hue.sin().view(-1, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], i * cos - q * sin, i * sin + q * cos], dim=1)
    x = torch.einsum("ij,bjhw->bihw", _YIQ_TO_RGB.to(x.device), yiq)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
