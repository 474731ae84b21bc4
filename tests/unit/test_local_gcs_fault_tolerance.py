"""The local cluster's GCS fault tolerance settings, without starting anything (the real run:
tests/integration/test_runtime_gcs_fault_tolerance.py)."""

from __future__ import annotations

import pytest
from tidal.cluster.cluster_spec import parse_cluster_spec
from tidal.cluster.local import LocalCluster, LocalClusterError


def _cluster(ft: dict | None) -> LocalCluster:
    c = LocalCluster(parse_cluster_spec({"gcs_fault_tolerance": ft} if ft else {}))
    c.cluster_id = "tidal-rt-abc-1234"
    return c


def test_head_gets_rays_external_redis_settings_with_the_cluster_id_as_its_namespace():
    c = _cluster({"redis_address": "127.0.0.1:6390", "reconnect_timeout_s": 45})
    assert c._gcs_ft_env() == {
        "RAY_REDIS_ADDRESS": "127.0.0.1:6390",
        "RAY_external_storage_namespace": "tidal-rt-abc-1234",
    }
    assert c._gcs_ft_system_config() == {"gcs_rpc_server_reconnect_timeout_s": 45}


def test_a_namespace_in_the_spec_wins_over_the_cluster_id():
    c = _cluster({"redis_address": "127.0.0.1:6390", "external_storage_namespace": "shared-ns"})
    assert c._gcs_ft_env()["RAY_external_storage_namespace"] == "shared-ns"


def test_without_fault_tolerance_the_head_starts_as_before_and_a_gcs_restart_is_refused():
    c = _cluster(None)
    assert c._gcs_ft_env() == {} and c._gcs_ft_system_config() == {}
    with pytest.raises(LocalClusterError, match="needs gcs_fault_tolerance"):
        c.restart_gcs()


def test_a_gcs_restart_without_a_killed_gcs_is_refused():
    with pytest.raises(LocalClusterError, match="no GCS was killed"):
        _cluster({"redis_address": "127.0.0.1:6390"}).restart_gcs()
