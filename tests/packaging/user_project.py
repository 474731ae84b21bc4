"""A user's repository with packages named like Tidal's folders, for the namespace tests (issue 22).

``write_user_project(root, markers)`` writes ``root/`` with its own ``training/``, ``serving/``, ``cluster/``,
``policies/`` and ``demo/`` packages: the names a user's repository often has, which ``ray job submit
--working-dir .`` puts first on ``sys.path``. Tidal installs under ``tidal.*`` only, so both must import side
by side. Every user package writes a marker file (JSON, one per import or model build) into ``markers``,
saying which file was imported, in which process, and where Tidal's packages came from in that process; the
tests read the markers back to tell who imported what.

(A plain module, imported by name from the tests next to it.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

USER_MODEL_CLASS = "training.models:UserDigitsNet"
USER_PACKAGES = ("training", "serving", "cluster", "policies", "demo")

# Written into every user package: one JSON file per event, named so that no two processes collide.
_RECORD = '''
import json as _json
import os as _os
import sys as _sys
import uuid as _uuid

MARKERS = {markers!r}


def record(event, **fields):
    """Writes one marker: what happened, in which process, and where Tidal's packages came from there."""
    tidal_training = _sys.modules.get("tidal.training")
    tidal_serving = _sys.modules.get("tidal.serving")
    body = {{
        "event": event,
        "pid": _os.getpid(),
        "argv0": _os.path.basename(_sys.argv[0]) if _sys.argv else "",
        "cwd": _os.getcwd(),
        "tidal.training": getattr(tidal_training, "__file__", None),
        "tidal.serving": getattr(tidal_serving, "__file__", None),
        **fields,
    }}
    _os.makedirs(MARKERS, exist_ok=True)
    path = _os.path.join(MARKERS, f"{{event}}-{{_os.getpid()}}-{{_uuid.uuid4().hex[:8]}}.json")
    with open(path + ".tmp", "w") as f:
        _json.dump(body, f)
    _os.replace(path + ".tmp", path)
'''

_PACKAGE_INIT = '''
"""The user's own ``{name}`` package (not Tidal's)."""

from {name}._record import record

OWNER = "user"
record("import-{name}", file=__file__)
'''

_MODELS = '''
"""The user's own model, in a module named like Tidal's ``tidal.training.models``."""

import torch
from torch import nn

import training
from training._record import record


class UserDigitsNet(nn.Module):
    """A digits classifier of the user's: its parameters are named ``user_*`` (Tidal's DigitsMLP has ``net.*``)."""

    def __init__(self, in_features: int = 64, hidden: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.user_body = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh())
        self.user_head = nn.Linear(hidden, num_classes)
        record("build-model", training=training.__file__, owner=training.OWNER)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.user_head(self.user_body(x / 16.0))
'''

_SERVING_APP = '''
"""The user's own Serve application, in a module named like Tidal's ``tidal.serving.app``."""

import sys

from ray import serve
from starlette.requests import Request

import serving
import training


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class UserGreeter:
    async def __call__(self, request: Request) -> dict:
        return {
            "owner": serving.OWNER,
            "serving": serving.__file__,
            "training": training.__file__,
            "tidal_serving_loaded": "tidal.serving" in sys.modules,
        }


app = UserGreeter.bind()
'''


def write_user_project(root: Path, markers: Path) -> Path:
    """Writes the user's repository at ``root`` (created) and returns it; markers go to ``markers``."""
    root.mkdir(parents=True, exist_ok=True)
    for name in USER_PACKAGES:
        pkg = root / name
        pkg.mkdir()
        (pkg / "_record.py").write_text(textwrap.dedent(_RECORD).format(markers=str(markers)).lstrip())
        (pkg / "__init__.py").write_text(textwrap.dedent(_PACKAGE_INIT).format(name=name).lstrip())
    (root / "training" / "models.py").write_text(textwrap.dedent(_MODELS).lstrip())
    (root / "serving" / "app.py").write_text(textwrap.dedent(_SERVING_APP).lstrip())
    return root


def zip_user_project(root: Path, zip_path: Path) -> Path:
    """The project as a zip with one top-level folder, the form of a remote ``working_dir`` (s3://, file://)."""
    base = zip_path.with_suffix("")
    return Path(shutil.make_archive(str(base), "zip", root_dir=root.parent, base_dir=root.name))


def markers(directory: Path, event: str | None = None) -> list[dict[str, Any]]:
    """The markers written so far (of one ``event`` when given), in no particular order."""
    if not directory.is_dir():
        return []
    found = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]
    return [m for m in found if event is None or m["event"] == event]


def write_user_checkpoint(root: Path, path: Path, instances: list[list[float]]) -> list[list[float]]:
    """Builds the user's model in a process started in ``root`` (so ``training`` is the user's package and
    ``tidal.serving`` Tidal's, side by side), writes it as a Tidal checkpoint at ``path`` naming
    ``training.models:UserDigitsNet``, and returns its outputs on ``instances`` (what serving must answer)."""
    script = textwrap.dedent(
        """
        import json, sys
        import torch
        from training.models import UserDigitsNet
        from tidal.serving.manifest import write_model_checkpoint

        path, instances = sys.argv[1], json.loads(sys.argv[2])
        torch.manual_seed(3)
        model = UserDigitsNet(hidden=24).eval()
        write_model_checkpoint(
            model, path, model_class="training.models:UserDigitsNet", model_kwargs={"hidden": 24},
            version="user-digits-v1", input_shape=[64], labels=[str(i) for i in range(10)],
        )
        with torch.no_grad():
            print(json.dumps(model(torch.tensor(instances, dtype=torch.float32)).tolist()))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(path), json.dumps(instances)],
        cwd=root, env=clean_env(), check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without PYTHONPATH (a child must find packages the way a user's would)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env
