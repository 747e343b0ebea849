"""OpenVLA's inputs: the prompt and its tokens, and the image preprocessing against torchvision's functional ops."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TVF
from PIL import Image

from configs.errors import UserError
from policies.openvla.checkpoint import load_tokenizer
from policies.openvla.model import IMAGENET_MEAN, IMAGENET_STD
from policies.openvla.processing import ImageProcessor, prompt_ids, prompt_text

MEANS, STDS = [IMAGENET_MEAN, (0.5, 0.5, 0.5)], [IMAGENET_STD, (0.5, 0.5, 0.5)]


def test_prompt_text() -> None:
    text = "In: What action should the robot take to put the spoon on the towel?\nOut:"
    assert prompt_text("Put the Spoon on the towel") == text
    v01 = prompt_text("Go", "vicuna-v15-7b")
    assert v01.startswith("A chat between a curious user") and v01.endswith(
        " USER: What action should the robot take to go? ASSISTANT:"
    )


def test_prompt_tokens_end_with_the_empty_piece(loaded: Any) -> None:
    ids = prompt_ids(loaded.tokenizer, "Put the spoon on the towel")
    tokens = loaded.tokenizer.convert_ids_to_tokens(ids)
    words = ["▁put", "▁the", "▁spoon", "▁on", "▁the", "▁towel"]
    expected = ["<s>", "▁In", ":", "▁What", "▁action", "▁should", "▁the", "▁robot", "▁take", "▁to", *words, "?",
                "<0x0A>", "Out", ":", "▁"]  # fmt: skip
    assert tokens == expected
    assert ids[0] == 1 and ids[-4] == 13 and ids[-1] == 29871  # BOS, "\n" (byte fallback), the appended empty piece


class EndsWithEmptyPiece:
    """A tokenizer whose text already ends with the empty piece: nothing is appended."""

    def __call__(self, text: str) -> Any:
        return type("Encoding", (), {"input_ids": [1, 5, 29871]})()

    def convert_tokens_to_ids(self, token: str) -> int:
        return 29871


def test_the_empty_piece_is_not_appended_twice() -> None:
    assert prompt_ids(EndsWithEmptyPiece(), "go") == [1, 5, 29871]


def test_the_tokenizer_is_checked_against_its_tokenizer_json(
    loaded: Any, tiny_dir: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Shifted:
        def encode(self, text: str) -> Any:
            return type("Encoding", (), {"ids": [1, 2, 3]})()

    monkeypatch.setattr("tokenizers.Tokenizer.from_file", lambda path: Shifted())
    with pytest.raises(UserError, match="tokenizes OpenVLA's prompt differently"):
        load_tokenizer(tiny_dir, loaded.model.arch)


def published_transform(image: np.ndarray, strategy: str, size: int = 224) -> torch.Tensor:
    """processing_prismatic.py's steps with torchvision's functional ops on a PIL image (the reference)."""
    pil = Image.fromarray(image).convert("RGB")
    if strategy == "letterbox":
        (w, h), side = pil.size, max(pil.size)
        pad = (int((side - w) / 2), int((side - h) / 2)) * 2
        pil = TVF.pad(pil, list(pad), fill=(127, 127, 127), padding_mode="constant")
    planes = []
    for mean, std in zip(MEANS, STDS, strict=True):
        target = (size, size) if strategy == "resize-naive" else size
        x = TVF.resize(pil, target, interpolation=TVF.InterpolationMode.BICUBIC, max_size=None, antialias=True)
        x = TVF.to_tensor(TVF.center_crop(x, [size, size]))
        planes.append(TVF.normalize(x, list(mean), list(std)))
    return torch.vstack(planes)


@pytest.mark.parametrize("strategy", ["resize-naive", "letterbox", "resize-crop"])
@pytest.mark.parametrize("shape", [(256, 256), (240, 321), (224, 224)])
def test_image_preprocessing_matches_the_published_transform(strategy: str, shape: tuple[int, int]) -> None:
    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    processor = ImageProcessor([224, 224], MEANS, STDS, ["bicubic", "bicubic"], strategy)
    out = processor(image)
    assert out.shape == (6, 224, 224) and out.dtype == torch.float32
    torch.testing.assert_close(out, published_transform(image, strategy), rtol=0, atol=0)


def test_image_normalisation_values() -> None:
    """A constant image: (value / 255 - mean) / std per backbone, DINOv2 then SigLIP channels."""
    image = np.zeros((100, 150, 3), np.uint8) + np.array([10, 128, 250], np.uint8)
    out = ImageProcessor([224, 224], MEANS, STDS, ["bicubic", "bicubic"])(image)
    rgb = np.array([10, 128, 250]) / 255
    expected = np.concatenate([(rgb - IMAGENET_MEAN) / IMAGENET_STD, (rgb - 0.5) / 0.5])
    np.testing.assert_allclose(out.mean(dim=(1, 2)).numpy(), expected, rtol=0, atol=1e-6)
    assert out.std(dim=(1, 2)).max() < 1e-6


def test_tiny_preprocessor_config_is_used(loaded: Any) -> None:
    assert loaded.processor.sizes == [56, 56] and loaded.processor.strategy == "resize-naive"
    assert loaded.processor(np.zeros((64, 64, 3), np.uint8)).shape == (6, 56, 56)


def test_bad_images_and_options_are_refused() -> None:
    processor = ImageProcessor([224], [MEANS[0]], [STDS[0]], ["bicubic"])
    with pytest.raises(UserError, match="uint8"):
        processor(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(UserError, match=r"\(H, W, 3\)"):
        processor(np.zeros((32, 32), np.uint8))
    with pytest.raises(UserError, match="image_resize_strategy 'stretch'"):
        ImageProcessor([224], [MEANS[0]], [STDS[0]], ["bicubic"], "stretch")
