"""Tidal installs one top-level package, ``tidal`` (issue 22): a user's ``training/`` or ``serving/`` never meets
Tidal's, in this environment's editable install and in a wheel installed into a clean virtual environment.

The wheel is built offline (``pip wheel --no-deps --no-build-isolation --no-index``) from a copy of the
source folders that pyproject.toml maps, so that what it holds comes from the sources, not from a ``build/``
folder an earlier build left in the checkout (setuptools packs whatever lies in ``build/lib``, stale
top-level packages included). It is installed with ``--no-deps`` into a venv without pip; nothing there but
the standard library and Tidal, so only the imports that need neither are tried.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from user_project import clean_env, write_user_project

PROJECT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((PROJECT / "pyproject.toml").read_text())
GENERIC_NAMES = ("training", "serving", "cluster", "policies", "demo")
# Where each installed package's files come from in the repository (pyproject.toml's package-dir).
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]


def run_python(python: Path | str, code: str, cwd: Path) -> Any:
    """Runs ``code`` with ``python`` in ``cwd`` (which leads sys.path, as for any script) and returns the
    JSON of its last output line."""
    out = subprocess.run(
        [str(python), "-c", code], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def source_files(suffix: str) -> set[str]:
    """Every file ending in ``suffix`` under the mapped top-level folders, by the path it installs at.

    ``{"tidal/training/run.py", "tidal/cluster/sim/engine.py", "tidal/cluster/configs/local.yaml", ...}``:
    the whole tree of each top-level folder, so a new sub-folder that pyproject.toml does not list as a
    package shows up here and not in the wheel.
    """
    tops = {folder: package for package, folder in PACKAGE_DIRS.items() if "/" not in folder}
    files = set()
    for folder, package in tops.items():
        for f in (PROJECT / folder).rglob(f"*{suffix}"):
            if f.is_file() and "__pycache__" not in f.parts:
                files.add(f"{package.replace('.', '/')}/{f.relative_to(PROJECT / folder).as_posix()}")
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tidal's wheel, built offline from a clean copy of the sources (removed with them at the end)."""
    pytest.importorskip(
        "setuptools", minversion="77", reason="--no-build-isolation needs pyproject's build backend"
    )
    root = tmp_path_factory.mktemp("tidal-wheel")
    src = root / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for folder in sorted({f for f in PACKAGE_DIRS.values() if "/" not in f}):
        shutil.copytree(PROJECT / folder, src / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(PROJECT / name, src / name)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(root / "dist"), str(src)],
        env=clean_env(PIP_NO_INDEX="1"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    (built,) = (root / "dist").glob("tidal-*.whl")
    yield built
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def clean_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A new venv (no system site-packages, no pip) with the wheel installed and nothing else; removed at the
    end."""
    root = tmp_path_factory.mktemp("tidal-venv")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        env=clean_env(PIP_NO_INDEX="1"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    site = Path(
        run_python(
            python, "import json, sysconfig; print(json.dumps(sysconfig.get_paths()['purelib']))", root
        )
    )
    empty = root / "empty"
    empty.mkdir()
    yield {"python": python, "site": site, "empty": empty, "root": root}
    shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ the wheel


def test_the_wheel_holds_one_top_level_package_tidal(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        top_level = z.read(f"{dist_info}/top_level.txt").decode().split()
    assert top_level == ["tidal"]
    assert {n.split("/")[0] for n in names} == {"tidal", dist_info}


def test_the_wheel_holds_every_module_and_yaml_file_of_the_mapped_folders(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    shipped_py = {n for n in names if n.endswith(".py")}
    shipped_yaml = {n for n in names if n.endswith(".yaml")}
    assert shipped_py == source_files(".py")
    assert shipped_yaml == source_files(".yaml")
    # The folders the docs and the CLI read configs from.
    for folder in ("tidal/cluster/configs/", "tidal/demo/configs/", "tidal/training/jobs/"):
        assert any(n.startswith(folder) for n in shipped_yaml), folder
    assert "tidal/serving/config.yaml" in shipped_yaml


@pytest.fixture()
def user_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


# ---------------------------------------------------------------------------------------- the clean venv


def test_generic_names_do_not_import_in_a_clean_venv_with_tidal_installed(clean_venv):
    code = f"""
import importlib, json
result = {{}}
for name in {list(GENERIC_NAMES)!r}:
    try:
        importlib.import_module(name)
        result[name] = "imported"
    except ModuleNotFoundError as e:
        result[name] = "ModuleNotFoundError: " + e.name
print(json.dumps(result))
"""
    result = run_python(clean_venv["python"], code, clean_venv["empty"])
    assert result == {name: f"ModuleNotFoundError: {name}" for name in GENERIC_NAMES}


def test_tidal_imports_from_the_venv_and_reports_the_projects_version(clean_venv):
    code = "import json, tidal, tidal.training, tidal.serving; print(json.dumps([tidal.__version__, tidal.__file__]))"
    version, file = run_python(clean_venv["python"], code, clean_venv["empty"])
    assert version == PYPROJECT["project"]["version"]
    assert Path(file) == clean_venv["site"] / "tidal" / "__init__.py"


def test_the_yaml_configs_are_package_resources_in_the_venv(clean_venv):
    code = """
import importlib.resources as r, json
found = {}
for package in ("tidal.cluster.configs", "tidal.demo.configs", "tidal.training.jobs", "tidal.serving"):
    found[package] = sorted(f.name for f in r.files(package).iterdir() if f.name.endswith(".yaml"))
print(json.dumps(found))
"""
    found = run_python(clean_venv["python"], code, clean_venv["empty"])
    expected: dict[str, list[str]] = {}
    for path in source_files(".yaml"):
        package, _, name = path.rpartition("/")
        expected.setdefault(package.replace("/", "."), []).append(name)
    assert found == {k: sorted(v) for k, v in expected.items()}
    assert found["tidal.serving"] == ["config.yaml"] and found["tidal.cluster.configs"]


def test_a_user_repo_imports_its_own_training_beside_tidals_in_the_venv(clean_venv):
    root = write_user_project(clean_venv["root"] / "userproj", clean_venv["root"] / "markers")
    code = (
        "import json, tidal.training, tidal.serving, training, serving; "
        "print(json.dumps([training.__file__, serving.__file__, tidal.training.__file__, tidal.serving.__file__]))"
    )
    user_training, user_serving, tidal_training, tidal_serving = run_python(clean_venv["python"], code, root)
    assert Path(user_training) == root / "training" / "__init__.py"
    assert Path(user_serving) == root / "serving" / "__init__.py"
    assert Path(tidal_training) == clean_venv["site"] / "tidal" / "training" / "__init__.py"
    assert Path(tidal_serving) == clean_venv["site"] / "tidal" / "serving" / "__init__.py"


def test_a_checkout_in_the_working_directory_still_finds_the_installed_subpackages(clean_venv):
    """From a Tidal checkout (its ``tidal/`` folder leads sys.path) with a regular install, ``tidal.training``
    is the installed one: ``tidal/__init__.py`` extends its ``__path__`` with every ``tidal/`` on sys.path."""
    code = "import json, tidal, tidal.training; print(json.dumps([tidal.__file__, tidal.training.__file__]))"
    tidal_file, tidal_training = run_python(clean_venv["python"], code, PROJECT)
    assert Path(tidal_file) == PROJECT / "tidal" / "__init__.py"
    assert Path(tidal_training) == clean_venv["site"] / "tidal" / "training" / "__init__.py"


# ------------------------------------------------------------------------------- this environment's install


def test_a_user_repo_imports_its_own_training_beside_tidals_with_this_install(user_dir):
    """This environment's (editable) install: a process started in the user's repository imports both."""
    root = write_user_project(user_dir / "userproj", user_dir / "markers")
    code = (
        "import json, training, training.models, tidal.training, tidal.training.models; "
        "print(json.dumps([training.__file__, tidal.training.__file__, "
        "hasattr(training.models, 'UserDigitsNet'), hasattr(tidal.training.models, 'DigitsMLP')]))"
    )
    user_training, tidal_training, has_user_model, has_tidal_model = run_python(sys.executable, code, root)
    assert Path(user_training) == root / "training" / "__init__.py"
    import tidal.training

    assert tidal_training == tidal.training.__file__
    assert has_user_model and has_tidal_model
