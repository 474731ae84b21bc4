"""Port leases: contiguous port ranges reserved for one local cluster each, among all on this machine.

Several clusters may run on one machine at once (other test sessions, other users), and every port Ray opens
for a cluster comes from its lease. Leases are taken in 20000-32699: below the kernel's ephemeral range (so
outgoing connections never take them) and above Ray's default worker ports (10002-19999, used by every plain
``ray.init()``). They are recorded in a directory of the user's own, ``<tempdir>/tidal-<uid>/port-leases``
(mode 0700; ``TIDAL_PORT_LEASE_DIR`` chooses another, which must be the user's too), and guarded by a file
lock. Another user's clusters are seen through the ports they have bound: a range is taken only if every
port of it is free.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from tidal.cluster.processes import pid_alive
from tidal.cluster.user_dirs import ensure_private_dir, user_temp_root

logger = logging.getLogger(__name__)

PORT_POOL_START = 20000
PORT_POOL_END = 32700  # exclusive; the kernel's ephemeral range starts at 32768 here
LEASE_DIR_ENV = "TIDAL_PORT_LEASE_DIR"
LEASE_DIR = Path(os.environ.get(LEASE_DIR_ENV) or user_temp_root() / "port-leases")
_LEASE_GRACE_S = 300.0  # a lease whose owners are all gone is stale after this long (start-up time)


class PortLease:
    """A contiguous range of ports reserved for one cluster on this machine.

    Leases are JSON files under ``LEASE_DIR`` (``<start>-<end>.json``) that name the pids which keep them
    alive; a lease whose pids have all exited (and which is older than its start-up grace) is stale and
    taken over. A file lock makes look-up-and-create atomic between processes.
    """

    def __init__(self, start: int, end: int, path: Path) -> None:
        self.start = start
        self.end = end
        self.path = path
        self._next = start

    @classmethod
    def acquire(cls, num_ports: int, owner: str, *, attempts: int = 50) -> PortLease:
        if num_ports > PORT_POOL_END - PORT_POOL_START:
            raise ValueError(f"cannot lease {num_ports} ports: the pool has {PORT_POOL_END - PORT_POOL_START}")
        ensure_private_dir(LEASE_DIR, what="port lease directory", env_var=LEASE_DIR_ENV)
        with _locked(LEASE_DIR / ".lock"):
            taken = []
            for f in LEASE_DIR.glob("*.json"):
                info = _read_json(f)
                if info is None or _lease_is_stale(info, f):
                    logger.info("removing stale port lease %s", f.name)
                    f.unlink(missing_ok=True)
                    continue
                taken.append((int(info["start"]), int(info["end"])))
            rng = random.Random()
            for _ in range(attempts):
                start = rng.randrange(PORT_POOL_START, PORT_POOL_END - num_ports)
                end = start + num_ports
                if any(s < end and start < e for s, e in taken):
                    continue
                if not _all_ports_free(start, end):
                    taken.append((start, end))
                    continue
                path = LEASE_DIR / f"{start}-{end}.json"
                info = {"start": start, "end": end, "owner": owner, "pids": [os.getpid()], "created_s": time.time()}
                path.write_text(json.dumps(info))
                return cls(start, end, path)
        raise RuntimeError(f"no free range of {num_ports} ports in {PORT_POOL_START}-{PORT_POOL_END}")

    @classmethod
    def from_range(cls, start: int, end: int, next_port: int | None = None) -> PortLease:
        """A handle on a lease recorded elsewhere; ``next_port`` unknown: it hands out no more ports."""
        lease = cls(start, end, LEASE_DIR / f"{start}-{end}.json")
        lease._next = end if next_port is None else next_port
        return lease

    @property
    def remaining(self) -> int:
        return self.end - self._next

    def take(self, n: int = 1) -> int:
        """The next ``n`` consecutive ports of the lease; returns the first."""
        if self._next + n > self.end:
            raise RuntimeError(f"port lease {self.start}-{self.end} is exhausted")
        port = self._next
        self._next += n
        return port

    def keep_alive_with(self, pids: list[int]) -> None:
        """Ties the lease to the cluster's processes, so that it outlives the process that started them."""
        info = _read_json(self.path) or {"start": self.start, "end": self.end, "created_s": time.time()}
        info["pids"] = sorted(set(pids))
        self.path.write_text(json.dumps(info))

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _lease_is_stale(info: dict, path: Path) -> bool:
    if any(pid_alive(p) for p in info.get("pids", [])):
        return False
    return time.time() - float(info.get("created_s", 0.0)) > _LEASE_GRACE_S or not info.get("pids")


def _all_ports_free(start: int, end: int) -> bool:
    for port in range(start, end):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                return False
    return True


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
