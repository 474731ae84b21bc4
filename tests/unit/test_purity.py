"""Modules that import ray or torch only inside the functions that need them pull in neither when imported.

The layers and the pure modules are import-linter contracts (tests/unit/test_layers.py), which count an import
inside a function as an import: these modules break them on purpose, and are checked here at import time.
"""

import subprocess
import sys


def imported_on_import(module: str) -> list[str]:
    code = f"import sys, {module}; print(','.join(m for m in ('ray', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_the_local_cluster_module_imports_ray_only_when_it_starts_a_node():
    assert imported_on_import("tidal.cluster.local") == []


def test_the_checkpoint_manifest_validates_without_torch():
    # torch is imported by write_model_checkpoint and load_model only.
    assert imported_on_import("tidal.serving.manifest") == []


def test_the_serve_autoscaling_hook_imports_ray_only_when_it_talks_to_the_arbiter():
    # ray comes with tidal.cluster.client, which default_client_factory imports when a link first needs it.
    assert imported_on_import("tidal.serving.autoscale") == []
