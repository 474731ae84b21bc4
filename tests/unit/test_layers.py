"""The layers point one way, and the pure ones import neither ray nor torch (pyproject.toml, [tool.importlinter]).

import-linter finds a package by its one folder, while the ``tidal.*`` namespace spans the repository's
folders (pyproject.toml's package-dir): the tests lay the installed layout out as links and run the venv's
``lint-imports`` over it. A broken contract fails with import-linter's report, which names the import chain.
"""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def installed_layout(dest: Path) -> Path:
    """``dest/tidal/...`` as installed: a link per folder of package-dir (the face package's own files linked)."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for name, folder in sorted(package_dir.items()):  # parents before their subpackages
        target, source = dest.joinpath(*name.split(".")), ROOT / folder
        if name == "tidal":
            target.mkdir(parents=True)
            for entry in source.iterdir():
                if entry.name != "__pycache__":
                    (target / entry.name).symlink_to(entry)
        elif target.exists():  # a subpackage inside its parent's folder (tidal.cluster.sim in cluster/sim)
            assert target.resolve() == source.resolve(), f"{name}: {target} is not {source}"
        else:
            target.symlink_to(source, target_is_directory=True)
    return dest


def lint_imports(layout: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(layout)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_no_layer_imports_a_higher_one_and_the_pure_modules_import_neither_ray_nor_torch(tmp_path):
    r = lint_imports(installed_layout(tmp_path / "layout"), tmp_path)
    assert r.returncode == 0, f"lint-imports found imports against the layers:\n{r.stdout}{r.stderr}"
    assert "0 broken" in r.stdout


def test_a_policy_that_imports_the_actor_breaks_the_layers_and_the_purity_of_the_policies(tmp_path):
    layout = installed_layout(tmp_path / "layout")
    policies = layout / "tidal" / "policies"
    policies.unlink()
    shutil.copytree(ROOT / "policies", policies, ignore=shutil.ignore_patterns("__pycache__"))
    with (policies / "base.py").open("a") as f:
        f.write("\nfrom tidal.cluster import actor  # noqa: E402,F401\n")
    r = lint_imports(layout, tmp_path)
    assert r.returncode != 0
    assert "tidal.policies is not allowed to import tidal.cluster.actor" in r.stdout
    assert "tidal.policies.base -> tidal.cluster.actor" in r.stdout
    # Two contracts break (the layers, and the purity of the policies); how many others are kept does not matter.
    assert re.search(r"Contracts: \d+ kept, 2 broken\.", r.stdout), r.stdout
