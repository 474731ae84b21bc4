"""Serving's deciding and validating parts import neither ray nor torch (they run anywhere, fast)."""

import subprocess
import sys

PURE_SERVING_MODULES = [
    "tidal.serving.autoscale_math",
    "tidal.serving.config",
    "tidal.serving.schemas",
    "tidal.serving.manifest",
    "tidal.serving.autoscale",
]


def test_serving_pure_modules_import_neither_ray_nor_torch():
    code = (
        "import importlib, sys\n"
        f"for m in {PURE_SERVING_MODULES!r}: importlib.import_module(m)\n"
        "print(','.join(sorted(m for m in ('ray', 'torch') if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"pure serving modules pulled in: {out.stdout.strip()}"
