"""Image encode / decode / resize used by the store and the loader (CPU, libjpeg-turbo)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

try:  # libjpeg-turbo without PIL's overhead: ~2x faster decode of small JPEGs.
    import simplejpeg
except ImportError:  # pragma: no cover - optional dependency
    simplejpeg = None


def decode(data: bytes | memoryview) -> np.ndarray:
    """JPEG or PNG bytes -> (H, W, 3) uint8 RGB."""
    data = bytes(data)
    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """(H, W, 3) uint8 -> JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def encoded_shape(data: bytes | memoryview) -> tuple[int, int, int]:
    """(H, W, C) of encoded image bytes, read from the header only."""
    with Image.open(io.BytesIO(bytes(data))) as img:
        return img.height, img.width, len(img.getbands())


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Square resize with Lanczos (antialiased), as the Bridge builder and Octo do."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.LANCZOS))
