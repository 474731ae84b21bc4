"""Nothing is open by default: the metrics exporter listens on this machine only unless told otherwise, port
leases live in a directory of the user's own, and training checkpoints in the user's home, never in a shared
/tmp path another user could own."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from pathlib import Path

import psutil
import pytest
import tidal.cluster.port_lease as port_lease
from tidal.cluster.metrics import ArbiterMetrics
from tidal.cluster.policy_file import PolicyFileModel, parse_policy_file
from tidal.cluster.port_lease import PortLease
from tidal.cluster.user_dirs import UnsafeDirectoryError, ensure_private_dir, user_temp_root
from tidal.policies.config import PolicyConfigError
from tidal.training.spec import parse_spec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_addresses(port: int) -> set[str]:
    return {
        c.laddr.ip
        for c in psutil.Process().net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }


def test_the_metrics_exporter_listens_on_the_loopback_address_by_default():
    port = _free_port()
    ArbiterMetrics().serve(port)
    assert _listening_addresses(port) == {"127.0.0.1"}


def test_the_metrics_exporter_listens_where_it_is_told():
    port = _free_port()
    ArbiterMetrics().serve(port, addr="0.0.0.0")
    assert _listening_addresses(port) == {"0.0.0.0"}


def test_the_metrics_exporter_binds_this_machine_only_unless_the_policy_file_says_otherwise():
    assert PolicyFileModel().arbiter.metrics_host == "127.0.0.1"
    assert parse_policy_file({"arbiter": {"metrics_host": "0.0.0.0"}}).arbiter.metrics_host == "0.0.0.0"
    with pytest.raises(PolicyConfigError, match=r"arbiter\.metrics_host: metrics_host 'not a host' is not an IP"):
        parse_policy_file({"arbiter": {"metrics_host": "not a host"}})


def test_the_default_lease_directory_is_the_users_own_not_a_shared_tmp_path():
    if os.environ.get(port_lease.LEASE_DIR_ENV):
        pytest.skip(f"{port_lease.LEASE_DIR_ENV} chooses the directory here")
    assert port_lease.LEASE_DIR == Path(tempfile.gettempdir()) / f"tidal-{os.getuid()}" / "port-leases"
    assert user_temp_root() == Path(tempfile.gettempdir()) / f"tidal-{os.getuid()}"


def test_a_lease_directory_is_created_private_with_its_missing_parents(tmp_path, monkeypatch):
    monkeypatch.setattr(port_lease, "LEASE_DIR", tmp_path / "tidal-123" / "port-leases")
    PortLease.acquire(10, owner="t")
    for d in (tmp_path / "tidal-123", tmp_path / "tidal-123" / "port-leases"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700


def _owned_by_someone_else(path: Path) -> Path:
    if os.getuid() == 0:
        path.mkdir(mode=0o700)
        os.chown(path, 54321, 54321)
        return path
    return Path("/")  # root's, and not ours


def test_a_lease_directory_owned_by_another_user_is_refused(tmp_path, monkeypatch):
    theirs = _owned_by_someone_else(tmp_path / "theirs")
    monkeypatch.setattr(port_lease, "LEASE_DIR", theirs)
    with pytest.raises(UnsafeDirectoryError, match=r"port lease directory .* is owned by uid \d+, not by you"):
        PortLease.acquire(10, owner="t")
    with pytest.raises(UnsafeDirectoryError, match="set TIDAL_PORT_LEASE_DIR to a directory of your own"):
        PortLease.acquire(10, owner="t")


def test_a_directory_that_others_may_write_to_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UnsafeDirectoryError, match=r"is writable by others \(mode 777\).*chmod 700"):
        ensure_private_dir(shared, what="port lease directory")
    assert ensure_private_dir(tmp_path / "mine") == tmp_path / "mine"


_JOB = {
    "name": "j",
    "model": {"class": "tidal.training.models:DigitsMLP"},
    "data": {"factory": "tidal.training.data:digits"},
    "gpu_types": ["A100"],
    "global_batch_size": 8,
    "steps": 10,
}


def test_a_training_job_stores_its_checkpoints_in_the_users_home_by_default_not_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    spec = parse_spec(_JOB, source="job.yaml")
    assert spec.storage_path == str(tmp_path / ".tidal" / "train")


def test_the_shipped_job_specs_keep_checkpoints_out_of_tmp():
    from pathlib import Path

    import yaml

    jobs = Path(__file__).resolve().parents[2] / "training" / "jobs"
    for f in sorted(jobs.glob("*.yaml")):
        storage = yaml.safe_load(f.read_text()).get("storage_path", "")
        assert not storage.startswith("/tmp"), f"{f.name}: storage_path {storage}"
