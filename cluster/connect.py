"""The cluster a driver talks to: the local cluster ``tidal up`` recorded, else ``--address`` or ``$RAY_ADDRESS``.

What ``tidal up`` started is recorded in ``$TIDAL_HOME/local-cluster.json`` (default ``~/.tidal``), which
points at the cluster's own state file (``tidal.cluster.local.LocalCluster.attach`` reads it). The ``tidal``,
``tidal serve`` and ``tidal train`` commands find their cluster here. Ray and the process manager are imported
only when a record is read or a driver connects, so that a command's ``--help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

POINTER_FILE = "local-cluster.json"


def tidal_home() -> Path:
    """``$TIDAL_HOME``, default ``~/.tidal``."""
    return Path(os.environ.get("TIDAL_HOME") or Path.home() / ".tidal").expanduser()


def recorded_cluster() -> Any | None:
    """The local cluster recorded in TIDAL_HOME (a ``LocalCluster`` handle), or None."""
    from tidal.cluster.local import LocalCluster

    pointer = tidal_home() / POINTER_FILE
    if not pointer.exists():
        return None
    try:
        state_path = json.loads(pointer.read_text())["state_path"]
        return LocalCluster.attach(state_path)
    except (OSError, ValueError, KeyError) as e:
        logger.warning("ignoring an unreadable record %s: %s", pointer, e)
        return None


def record_cluster(state_path: str | os.PathLike) -> None:
    """Records a local cluster (its state file) as the one the commands talk to."""
    home = tidal_home()
    home.mkdir(parents=True, exist_ok=True)
    (home / POINTER_FILE).write_text(json.dumps({"state_path": str(state_path)}, indent=2))


def forget_recorded() -> None:
    (tidal_home() / POINTER_FILE).unlink(missing_ok=True)


def connect(address: str | None) -> str:
    """``ray.init`` to ``address``, else the recorded local cluster, else ``$RAY_ADDRESS``; returns the address."""
    cluster = None
    if address is None:
        cluster = recorded_cluster()
        if cluster is not None and cluster.pids():
            address = cluster.address
        else:
            cluster = None
            address = os.environ.get("RAY_ADDRESS")
    if address is None:
        raise RuntimeError(
            "no cluster to talk to: run `tidal up`, or pass --address (or set RAY_ADDRESS) for a running cluster"
        )
    if cluster is not None:
        cluster.activate()
    import ray

    ray.init(address=address, namespace="tidal", log_to_driver=False, logging_level=logging.WARNING)
    return address
