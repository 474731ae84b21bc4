"""Tidal: training and inference on one heterogeneous GPU cluster, GPUs moved between them by demand.

The installed packages, one import namespace (the folders of the repository, mapped in pyproject.toml):

- ``tidal.cluster``: the vocabulary (``tidal.cluster.model``), the arbiter, its Ray actor and client, the
  local cluster's process manager, the CLI and the simulator (``tidal.cluster.sim``);
- ``tidal.policies``: the pure decision rules (Tidal's, the static split, Ray alone) and their guards;
- ``tidal.training``: elastic Ray Train jobs that yield GPUs at a step boundary;
- ``tidal.serving``: the Serve model server and the autoscaling hook that keeps replicas within a grant;
- ``tidal.demo``: ``make demo`` and the spike benchmark's runtime.

What a user's own code imports is named here; each name loads its module on first use, so
``import tidal`` pulls in neither Ray nor torch.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

# Run from a checkout of this repository with a regular (not editable) install, ``import tidal`` finds this
# folder first (the working directory leads ``sys.path``) and the installed subpackages would be hidden:
# extend the package's path with every ``tidal/`` on ``sys.path``, the installed one included.
__path__ = pkgutil.extend_path(__path__, __name__)

__version__ = "0.1.0"

_EXPORTS = {
    # The vocabulary: what the arbiter knows about a workload.
    "ServiceSpec": "tidal.cluster.model",
    "TrainingJobSpec": "tidal.cluster.model",
    "GrantView": "tidal.cluster.model",
    # Talking to the arbiter from any Ray driver, actor or worker.
    "ArbiterClient": "tidal.cluster.client",
    "ArbiterUnavailableError": "tidal.cluster.client",
    "get_or_create_arbiter": "tidal.cluster.actor",
    "get_arbiter": "tidal.cluster.actor",
    # A user's own Ray Train script, sized by the arbiter (``tidal.train`` has should_yield() and stop() too).
    "TidalTrainer": "tidal.training.trainer",
    "TidalConfig": "tidal.training.trainer_config",
    # The policy file (the policy's part builds the policy).
    "load_policy_file": "tidal.cluster.policy_file",
    "build_policy": "tidal.policies.config",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tidal' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
