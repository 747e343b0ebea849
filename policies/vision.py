"""Image side of the project's policies: a timm encoder that turns uint8 images into tokens.

CNNs give a (B, C, h, w) feature map, read as h * w tokens (optionally average-pooled to a
grid x grid map first); ViTs give patch tokens, from which the class/register tokens are dropped.
Pixels are scaled to [0, 1] and standardised with the model's own timm mean/std.
"""

from __future__ import annotations

import numpy as np
import timm
import torch
from torch import nn
from torch.nn import functional as F

from configs.errors import UserError
from data.images import resize
from policies.config import VisionConfig


class VisionEncoder(nn.Module):
    """uint8 images (B, H, W, 3) -> tokens (B, T, dim)."""

    def __init__(self, cfg: VisionConfig, image_size: int) -> None:
        super().__init__()
        try:
            self.net = timm.create_model(
                cfg.arch, pretrained=cfg.pretrained, num_classes=0, global_pool="", **dict(cfg.kwargs)
            )
        except RuntimeError as err:  # timm: "Unknown model (...)"
            raise UserError(f"policy vision encoder: {err}. List architectures with timm.list_models().") from None
        self.image_size, self.grid = int(image_size), cfg.grid
        self.dim = int(self.net.num_features)
        self.prefix_tokens = int(getattr(self.net, "num_prefix_tokens", 0))
        data_cfg = timm.data.resolve_data_config({}, model=self.net)
        self.register_buffer("mean", torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.channels_last = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (B, H, W, 3), got shape {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float().div(255.0)  # (B, H, W, 3) -> (B, 3, H, W) in [0, 1]
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.net.forward_features(x)
        if features.dim() == 4:  # CNN feature map (B, C, h, w)
            if self.grid and max(features.shape[-2:]) > self.grid:
                features = F.adaptive_avg_pool2d(features, self.grid)
            return features.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h * w, C)
        return features[:, self.prefix_tokens :]  # ViT (B, prefix + patches, C) -> patch tokens

    def num_tokens(self) -> int:
        """Tokens per image (runs the encoder once on a blank image, in eval mode: a training-mode
        batch norm would move its running statistics, pretrained ones included, towards the blank
        image's, and fails on a 1x1 feature map of one image)."""
        training = self.training
        self.eval()
        try:
            with torch.no_grad():
                blank = torch.zeros(1, self.image_size, self.image_size, 3, dtype=torch.uint8, device=self.mean.device)
                return int(self.forward(blank).shape[1])
        finally:
            self.train(training)


def stack_images(images: list[np.ndarray], size: int) -> torch.Tensor:
    """Observation images (H, W, 3) uint8 -> (N, size, size, 3) uint8, Lanczos-resized as data stores are."""
    out = []
    for image in images:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise UserError(f"obs['image_primary'] must be uint8 (H, W, 3), got {image.dtype} {image.shape}.")
        out.append(resize(image, size) if image.shape[:2] != (size, size) else image)
    return torch.from_numpy(np.stack(out))
