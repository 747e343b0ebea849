"""The installed environment: torchvision imports beside the torch that `make install` chose.

With the CPU torch (CI, machines without an NVIDIA GPU), PyPI's torchvision cannot load its C++ ops;
.ci/site/_robosteer_cpu_torchvision.py then lets it import with those ops reported unavailable.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_torchvision_and_timm_import_and_ops_fail_clearly() -> None:
    code = (
        "import torch, torchvision, timm\n"
        "from torchvision.ops.misc import FrozenBatchNorm2d\n"  # what timm needs from torchvision
        "m = timm.create_model('resnet18', pretrained=False, num_classes=0)\n"
        "print('features', m.eval()(torch.zeros(1, 3, 64, 64)).shape[-1])\n"
        "try:\n"
        "    torchvision.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5)\n"
        "    print('nms ok')\n"
        "except RuntimeError as e:\n"
        "    print('nms unavailable:', str(e).split('.')[0])\n"
    )
    out = _fresh(code)
    assert out.returncode == 0, out.stderr
    assert "features 512" in out.stdout
    # either the ops load (a matching torch/torchvision pair) or torchvision's own clear error
    assert "nms ok" in out.stdout or "nms unavailable: Couldn't load custom C++ ops" in out.stdout, out.stdout


def test_hook_defines_nothing_when_torchvision_is_already_importable() -> None:
    """The hook is idempotent and never defines the schemas twice (a second define would raise)."""
    code = (
        f"import sys; sys.path.insert(0, {str(REPO / '.ci' / 'site')!r})\n"
        "import _robosteer_cpu_torchvision as hook\n"
        "import torchvision\n"
        "hook.install()\n"  # torchvision already imported: no finder is added
        "print('finders', sum(isinstance(f, hook._BeforeTorchvision) for f in sys.meta_path))\n"
        "print('defined again', hook.define_missing_schemas())\n"
    )
    out = _fresh(code)
    assert out.returncode == 0, out.stderr
    assert "finders 0" in out.stdout and "defined again False" in out.stdout, out.stdout
