"""What OpenVLA's PUBLISHED code computes on a checkpoint, for tests/openvla/test_parity.py.

    OPENVLA_REPO=<openvla/openvla checkout> <python with the pinned versions> parity_reference.py REQUEST OUT

Runs in a separate environment with the published pins (transformers 4.40.1, tokenizers 0.19.1,
timm 0.9.10) and imports `prismatic/extern/hf/*.py` from the user's checkout of openvla/openvla
(never copied into robosteer). It imports nothing from robosteer. REQUEST (json) names the
checkpoints, an image, an instruction, the unnorm_key, the tiny ViT architectures (made known to
timm.create_model, which the published code calls by name) and the real config; OUT (json) gets the
processor's input_ids / pixel_values, the first action token's logits, the greedy ids of
`generate`, `predict_action`'s action, the loading info, and the {key: shape} of the published
model built at full size (the language model on the meta device, the ViTs on the CPU).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image


def published_modules(repo: Path) -> tuple[Any, Any, Any]:
    """configuration_, modeling_ and processing_prismatic as a package of their own (relative imports work)."""
    hf = repo / "prismatic" / "extern" / "hf"
    spec = importlib.util.spec_from_file_location(
        "openvla_hf", hf / "__init__.py", submodule_search_locations=[str(hf)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules["openvla_hf"] = package
    spec.loader.exec_module(package)
    names = ("configuration_prismatic", "modeling_prismatic", "processing_prismatic")
    return tuple(importlib.import_module(f"openvla_hf.{n}") for n in names)


def know_tiny_vits(archs: dict[str, dict[str, Any]]) -> None:
    """timm.create_model(<tiny id>, ...) -> VisionTransformer(**arch, ...); other ids as timm has them; on the CPU."""
    from timm.models.vision_transformer import VisionTransformer

    create = timm.create_model

    def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> Any:
        with torch.device("cpu"):  # timm 0.9.10 cannot build on the meta device (Tensor.item in __init__)
            if name in archs:
                return VisionTransformer(**archs[name], **kwargs)
            return create(name, pretrained=pretrained, **kwargs)

    timm.create_model = create_model


def published_outputs(modeling: Any, processing: Any, directory: str, request: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    model, info = modeling.OpenVLAForActionPrediction.from_pretrained(
        directory, torch_dtype=torch.float32, output_loading_info=True
    )
    model.eval()
    processor = processing.PrismaticProcessor(
        processing.PrismaticImageProcessor.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    )
    prompt = f"In: What action should the robot take to {request['instruction'].lower()}?\nOut:"
    image = Image.fromarray(np.array(request["image"], dtype=np.uint8)).convert("RGB")
    inputs = processor(prompt, image)
    with torch.no_grad():
        action = model.predict_action(**inputs, unnorm_key=request["unnorm_key"], do_sample=False)
        input_ids = torch.cat([inputs["input_ids"], torch.tensor([[29871]])], dim=1)  # as predict_action does
        generated = model.generate(input_ids, pixel_values=inputs["pixel_values"], max_new_tokens=7, do_sample=False)
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                       pixel_values=inputs["pixel_values"]).logits[0, -1]  # fmt: skip
    return {
        "loading_info": {k: list(map(str, v)) for k, v in info.items()},
        "input_ids": input_ids[0].tolist(),
        "pixel_values": inputs["pixel_values"][0].tolist(),
        "first_logits": logits.tolist(),
        "generated": generated[0, -7:].tolist(),
        "action": np.asarray(action, dtype=np.float64).tolist(),
    }


def main(request_path: str, out_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    know_tiny_vits(request["tiny_archs"])
    config_module, modeling, processing = published_modules(Path(os.environ["OPENVLA_REPO"]))
    checkpoints = {d: published_outputs(modeling, processing, d, request) for d in request["checkpoints"]}
    with torch.device("meta"):
        real = modeling.OpenVLAForActionPrediction(config_module.OpenVLAConfig(**request["real_config"]))
    out = {
        "versions": {"transformers": __import__("transformers").__version__, "timm": timm.__version__,
                     "torch": torch.__version__},
        "checkpoints": checkpoints,
        "real_shapes": {k: list(v.shape) for k, v in real.state_dict().items()},
    }  # fmt: skip
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
