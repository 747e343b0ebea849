"""Let PyPI's torchvision import next to a CPU-only torch (loaded at interpreter start by a .pth file).

Why: the CPU build of torch (2.13.0+cpu, about 0.9 GB installed) saves about 4.5 GB of disk over
the CUDA build with its NVIDIA libraries, which matters on CI machines. PyPI has no CPU torchvision
for Linux, and PyPI's torchvision links its C++ ops (`_C.so`) against `libtorch_cuda.so`, so next to
a CPU torch those ops fail to load. torchvision handles a missing `_C` everywhere (its ops then raise
"Couldn't load custom C++ ops") except in two unguarded `register_fake("torchvision::nms" | "qnms")`
calls, which make `import torchvision` itself fail with "operator torchvision::nms does not exist".
timm imports torchvision (`torchvision.ops.misc.FrozenBatchNorm2d`), so robosteer cannot start.

What: the first time anything imports torchvision, try to load its `_C` library exactly as
torchvision would. If that works (any matching torch/torchvision pair), do nothing more. If it
fails, define the schemas of those two operators, so that torchvision imports with its C++ ops
reported as unavailable; robosteer uses none of them (no detection ops, no video decoding).

`make install` writes the .pth file only when it installs the CPU torch (see the Makefile).
Importing this module costs nothing: torch is imported only when torchvision is.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_fragment = None  # the torch.library.Library holding the schemas; kept alive for the process


def _torchvision_ops_load() -> bool:
    """Load torchvision's `_C` as torchvision's extension.py does; True when it loads."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision: nothing to fix
    for folder in spec.submodule_search_locations:
        for lib in sorted(Path(folder).glob("_C.*so")):
            try:
                torch.ops.load_library(str(lib))
                return True
            except OSError:
                return False
    return False


def define_missing_schemas() -> bool:
    """Define torchvision's nms/qnms schemas if its `_C` cannot load. True when it defined them."""
    global _fragment
    if _fragment is not None or _torchvision_ops_load():
        return False
    import torch

    _fragment = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        _fragment.define(schema)
    return True


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs `define_missing_schemas` once, just before the first `import torchvision`."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            define_missing_schemas()
        return None  # the normal finders import torchvision itself


def install() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
