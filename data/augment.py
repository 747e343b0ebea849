"""Batched image augmentation on the training device (V-GPS / Octo recipe, reference/vgps.md).

Random resized crop (area scale [0.8, 1], aspect ratio [0.9, 1.1], resized back to the input size),
brightness +-0.1, contrast and saturation factors in [0.9, 1.1], hue shift +-0.05 turns. Each sample
draws its own parameters; `augment_pair` applies the same ones to an image and its next image, so a
transition stays consistent (`augment`: one image batch). Randomness comes only from the given
generator, so a training step augments identically after a resume.

The four colour operations are affine in RGB and the clamp to [0, 1] comes only at the end, so
they compose into one map per sample, x -> M x + t (`colour_map`); only contrast needs the image's
mean. An augmentation is then a crop (grid_sample), a mean, and one 3x3 map per pixel, not a dozen
passes over the batch.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

# RGB <-> YIQ: hue is a rotation of the (I, Q) plane.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)
_GRAY = _RGB_TO_YIQ[0]  # luma weights
_CONSTANTS: dict[torch.device, tuple[torch.Tensor, ...]] = {}  # per device: no host-to-device copy per call


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
    theta, jitter = _draw(image.shape[0], image.device, generator, scale, ratio, brightness, contrast, saturation, hue)
    return _apply(image, theta, jitter), _apply(next_image, theta, jitter)


def augment(images: torch.Tensor, generator: torch.Generator, **ranges: tuple[float, float] | float) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> augmented uint8 (B, H, W, 3); the parameters `augment_pair` would draw."""
    theta, jitter = _draw(images.shape[0], images.device, generator, **ranges)
    return _apply(images, theta, jitter)


def _draw(
    B: int, dev: torch.device, g: torch.Generator, scale: tuple[float, float] = (0.8, 1.0),
    ratio: tuple[float, float] = (0.9, 1.1), brightness: float = 0.1, contrast: tuple[float, float] = (0.9, 1.1),
    saturation: tuple[float, float] = (0.9, 1.1), hue: float = 0.05,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:  # fmt: skip
    """Per-sample crop (affine_grid theta (B, 2, 3)) and colour jitter (brightness, contrast, saturation, hue)."""
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
    return theta, jitter


def colour_map(jitter: tuple[torch.Tensor, ...], mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, 3) M and (B, 3) t with M x + t = the four colour operations on RGB x in [0, 1] (before the clamp).

    With `mean` (B,) the image's mean over pixels and channels, and b, c, s, h a sample's brightness,
    contrast, saturation and hue: x1 = x + b; x2 = c (x1 - m) + m with m = mean + b; x3 = s x2 +
    (1 - s) gray(x2) (gray = luma weights . x); x4 = YIQ^-1 R(h) YIQ x3, R rotating (I, Q) by h.
    So x4 = T (c x + (c b + (1 - c) m) 1) with T = YIQ^-1 R(h) YIQ S, S = s I + (1 - s) 1 gray^T.
    """
    bright, contrast, sat, hue = jitter
    to_yiq, to_rgb, gray = _constants(mean.device)
    eye = torch.eye(3, device=mean.device)
    S = sat[:, None, None] * eye + (1 - sat)[:, None, None] * gray.expand(3, 3)  # every row: the luma weights
    cos, sin = hue.cos(), hue.sin()
    R = eye.repeat(len(hue), 1, 1)
    R[:, 1, 1], R[:, 1, 2], R[:, 2, 1], R[:, 2, 2] = cos, -sin, sin, cos
    T = to_rgb @ R @ to_yiq @ S
    m = mean + bright
    t = T.sum(-1) * (contrast * bright + (1 - contrast) * m)[:, None]  # T 1 times the shift
    return contrast[:, None, None] * T, t


def _constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if device not in _CONSTANTS:
        _CONSTANTS[device] = tuple(c.to(device) for c in (_RGB_TO_YIQ, _YIQ_TO_RGB, _GRAY))
    return _CONSTANTS[device]


def _apply(images: torch.Tensor, theta: torch.Tensor, jitter: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x = images.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    M, t = colour_map(jitter, x.mean(dim=(1, 2, 3)))
    x = torch.baddbmm((t * 255.0)[:, :, None], M * 255.0, x.flatten(2))  # (B, 3, H * W), in [0, 255] units
    return x.clamp_(0, 255).round_().to(torch.uint8).view(images.shape[0], 3, *images.shape[1:3]).permute(0, 2, 3, 1)
