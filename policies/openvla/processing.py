"""OpenVLA's inputs: the image preprocessing of `PrismaticImageProcessor` and the prompt of `predict_action`.

Image (processing_prismatic.py, reimplemented): the uint8 RGB image becomes a PIL image, then
  letterbox    (if image_resize_strategy == "letterbox") pad to a square with the fill colour
               int(255 * mean) of the LAST backbone, int((side - w) / 2) pixels on each side;
  resize       resize-naive: to (224, 224), ignoring the aspect ratio (OpenVLA-7B's setting);
               letterbox / resize-crop: the short side to 224 (long side int(224 * long / short));
  crop         centre crop to 224 (top = round((h - 224) / 2)), a no-op after resize-naive;
  normalise    to float32 in [0, 1], then (x - mean) / std with each backbone's own statistics:
               DINOv2 ImageNet (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225), SigLIP 0.5 / 0.5;
and the per-backbone results are stacked along channels: (6, 224, 224) for the fused backbone.
Resizing is PIL's (bicubic by default), as torchvision's functional resize on a PIL image does.
`preprocessor_config.json` supplies sizes, interpolations, means and stds when the checkpoint has
one; otherwise they come from the vision backbones' timm configs (policies/openvla/model.py).

Prompt (modeling_prismatic.py / vla-scripts/deploy.py): `In: What action should the robot take to
{instruction.lower()}?\\nOut:` (v0.1 Vicuna models: the system-prompt form), tokenized with BOS, then
token 29871 (the empty "▁" piece that precedes action tokens in training) appended if missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from configs.errors import UserError
from policies.openvla.model import OpenVLAArch, vit_arch

PROMPT = "In: What action should the robot take to {instruction}?\nOut:"
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
V01_PROMPT = SYSTEM_PROMPT + " USER: What action should the robot take to {instruction}? ASSISTANT:"
EMPTY_PIECE = "▁"  # Llama-2 id 29871
STRATEGIES = ("resize-naive", "letterbox", "resize-crop")
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}


def prompt_text(instruction: str, llm_backbone_id: str = "llama2-7b-pure") -> str:
    """The prompt OpenVLA was trained with (Vicuna-based v0.1 models use the system-prompt form)."""
    template = V01_PROMPT if llm_backbone_id.startswith("vicuna") else PROMPT
    return template.format(instruction=instruction.lower())


def prompt_ids(tokenizer: Any, instruction: str, llm_backbone_id: str = "llama2-7b-pure") -> list[int]:
    """Token ids of the prompt: BOS + text, then the empty piece (29871) if it is not already last."""
    ids = list(tokenizer(prompt_text(instruction, llm_backbone_id)).input_ids)
    empty = tokenizer.convert_tokens_to_ids(EMPTY_PIECE)
    if ids[-1] != empty:
        ids.append(empty)
    return ids


@dataclass
class ImageProcessor:
    """uint8 (H, W, 3) RGB -> float32 (3 * n_backbones, S, S), as PrismaticImageProcessor computes it."""

    sizes: Sequence[int]
    means: Sequence[Sequence[float]]
    stds: Sequence[Sequence[float]]
    interpolations: Sequence[str]
    strategy: str = "resize-naive"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise UserError(f"Unknown image_resize_strategy {self.strategy!r}; known: {', '.join(STRATEGIES)}.")
        unknown = set(self.interpolations) - set(_RESAMPLE)
        if unknown:
            raise UserError(f"Unknown image interpolation(s) {sorted(unknown)}; known: {', '.join(_RESAMPLE)}.")

    @classmethod
    def create(cls, arch: OpenVLAArch, strategy: str, preprocessor: dict[str, Any] | None = None) -> ImageProcessor:
        """From preprocessor_config.json if given, else from the backbones' timm normalisation."""
        if preprocessor:
            sizes = [int(s[-1]) for s in preprocessor["input_sizes"]]
            return cls(sizes, preprocessor["means"], preprocessor["stds"], preprocessor["interpolations"],
                       preprocessor.get("image_resize_strategy", strategy))  # fmt: skip
        archs = [vit_arch(t) for t in arch.timm_model_ids]
        return cls(list(arch.image_sizes), [a.mean for a in archs], [a.std for a in archs],
                   [a.interpolation for a in archs], strategy)  # fmt: skip

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise UserError(f"obs['image_primary'] must be uint8 (H, W, 3), got {image.dtype} {image.shape}.")
        pil = Image.fromarray(image).convert("RGB")
        if self.strategy == "letterbox":
            pil = _letterbox(pil, tuple(int(255 * m) for m in self.means[-1]))
        planes = []
        for size, mean, std, interpolation in zip(self.sizes, self.means, self.stds, self.interpolations, strict=True):
            resized = _center_crop(_resize(pil, size, self.strategy == "resize-naive", _RESAMPLE[interpolation]), size)
            x = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
            planes.append((x - _column(mean)) / _column(std))  # (3, S, S), float32 as torchvision computes
        return torch.cat(planes, dim=0)


def _column(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)


def _letterbox(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """Pad to a square around the image (int((side - w) / 2) per side: an odd difference stays one short)."""
    (w, h), side = image.size, max(image.size)
    dx, dy = int((side - w) / 2), int((side - h) / 2)
    out = Image.new("RGB", (w + 2 * dx, h + 2 * dy), fill)
    out.paste(image, (dx, dy))
    return out


def _resize(image: Image.Image, size: int, square: bool, resample: int) -> Image.Image:
    """torchvision's resize on a PIL image: to (size, size), or the short side to `size`."""
    w, h = image.size
    if square:
        target = (size, size)
    elif w <= h:
        target = (size, int(size * h / w))
    else:
        target = (int(size * w / h), size)
    return image if target == (w, h) else image.resize(target, resample)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    if (w, h) == (size, size):
        return image
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)  # torchvision's int(round(...))
    return image.crop((left, top, left + size, top + size))
