"""The deciding code imports neither ray nor torch: it runs in tests, the simulator and on Ray alike."""

import subprocess
import sys

PURE_MODULES = [
    "tidal.cluster.model",
    "tidal.cluster.arbiter",
    "tidal.cluster.specs",
    "tidal.cluster.cluster_spec",
    "tidal.policies.base",
    "tidal.policies.packing",
    "tidal.policies.workspace",
    "tidal.policies.priority",
    "tidal.policies.static_split",
    "tidal.policies.fcfs",
    "tidal.policies.guards",
    "tidal.policies.config",
]


def test_policies_and_the_pure_cluster_modules_import_neither_ray_nor_torch():
    code = (
        "import importlib, sys\n"
        f"for m in {PURE_MODULES!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in ('ray', 'torch') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"pure modules pulled in: {out.stdout.strip()}"


def test_the_local_cluster_module_imports_ray_only_when_it_starts_a_node():
    code = "import sys, tidal.cluster.local; assert 'ray' not in sys.modules, 'ray imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
