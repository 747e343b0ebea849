"""data/augment.py: the composed colour map against the operations one by one; one batch or a pair.

(The identity and determinism checks are in tests/values/test_losses.py.)
"""

from __future__ import annotations

import math

import torch

from data.augment import _RGB_TO_YIQ, _YIQ_TO_RGB, augment, augment_pair, colour_map


def colour_steps(x: torch.Tensor, jitter: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The four colour operations one after the other (the recipe's definition), on RGB x (B, 3, H, W) in [0, 1]."""
    bright, contrast, sat, hue = (j.view(-1, 1, 1, 1) for j in jitter)
    x = x + bright
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    gray = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = (x - gray) * sat + gray
    yiq = torch.einsum("ij,bjhw->bihw", _RGB_TO_YIQ, x)
    cos, sin = hue.cos().view(-1, 1, 1), hue.sin().view(-1, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], i * cos - q * sin, i * sin + q * cos], dim=1)
    return torch.einsum("ij,bjhw->bihw", _YIQ_TO_RGB, yiq)


def test_the_colour_map_composes_the_four_operations() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 7, 6, generator=g)
    jitter = (
        torch.rand(5, generator=g) * 0.2 - 0.1,
        torch.rand(5, generator=g) * 0.2 + 0.9,
        torch.rand(5, generator=g) * 0.2 + 0.9,
        (torch.rand(5, generator=g) * 0.1 - 0.05) * 2 * math.pi,
    )
    M, t = colour_map(jitter, x.mean(dim=(1, 2, 3)))
    composed = torch.einsum("bij,bjhw->bihw", M, x) + t[:, :, None, None]
    torch.testing.assert_close(composed, colour_steps(x, jitter), rtol=0, atol=1e-6)
    identity = (torch.zeros(5), torch.ones(5), torch.ones(5), torch.zeros(5))
    M, t = colour_map(identity, x.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(M, torch.eye(3).expand(5, 3, 3), rtol=0, atol=1e-6)
    assert t.abs().max() < 1e-6


def test_augment_draws_what_augment_pair_draws() -> None:
    img, nxt = (torch.randint(0, 256, (4, 24, 24, 3), dtype=torch.uint8) for _ in range(2))
    pair = augment_pair(img, nxt, torch.Generator().manual_seed(5))
    assert torch.equal(augment(img, torch.Generator().manual_seed(5)), pair[0])
    assert torch.equal(augment(nxt, torch.Generator().manual_seed(5)), pair[1])
    assert pair[0].shape == img.shape and pair[0].dtype == torch.uint8
