"""cluster.yaml and its fake multi-node variant pass Ray's own cluster launcher schema validation."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from tidal.cluster.local import SERVE_CONTROLLER_ENV

ROOT = Path(__file__).resolve().parents[2]
GPU_TYPES = {"H100", "H200", "A100", "RTX4090"}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_cluster_yaml_passes_rays_launcher_validation_with_one_worker_type_per_gpu_type():
    cfg = _load(ROOT / "cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(cfg)))  # raises on any schema error
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    labelled = {t["labels"]["ray.io/accelerator-type"]: t for t in types.values() if "labels" in t}
    assert set(labelled) == GPU_TYPES
    for t in labelled.values():
        assert t["resources"]["GPU"] > 0 and t["min_workers"] <= t["max_workers"]


def test_cluster_yaml_installs_tidal_and_starts_the_arbiter_on_the_head():
    cfg = _load(ROOT / "cluster.yaml")
    assert any("pip install" in c and "tidal" in c for c in cfg["setup_commands"])
    assert any("tidal arbiter start" in c for c in cfg["head_start_ray_commands"])
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["head_start_ray_commands"] if "ray start" in c)


def test_cluster_yaml_starts_the_head_with_the_serve_controller_env_of_the_local_cluster():
    cfg = _load(ROOT / "cluster.yaml")
    (start,) = [c for c in cfg["head_start_ray_commands"] if "ray start --head" in c]
    for k, v in SERVE_CONTROLLER_ENV.items():
        assert f"{k}={v}" in start.split(), (k, start)


def test_fake_multinode_variant_has_the_same_gpu_types_and_validates():
    fake = _load(ROOT / "cluster" / "configs" / "fake-multinode.yaml")
    validate_config(fake)
    real = _load(ROOT / "cluster.yaml")
    label = "ray.io/accelerator-type"
    fake_types = {t["labels"][label]: t["resources"]["GPU"] for t in fake["available_node_types"].values() if "labels" in t}
    real_types = {t["labels"][label]: t["resources"]["GPU"] for t in real["available_node_types"].values() if "labels" in t}
    assert fake_types == real_types


def test_a_node_type_with_a_non_integer_gpu_count_is_refused_by_the_schema():
    cfg = _load(ROOT / "cluster.yaml")
    cfg["available_node_types"]["gpu-h100"]["resources"]["GPU"] = "eight"
    with pytest.raises(jsonschema.ValidationError, match="'eight' is not of type 'integer'"):
        validate_config(prepare_config(cfg))


def test_cluster_yaml_head_keeps_its_gcs_tables_in_the_external_redis_of_its_env_file():
    cfg = _load(ROOT / "cluster.yaml")
    assert cfg["file_mounts"]["~/.tidal/redis.env"] == "~/.tidal/redis.env"
    (start,) = [c for c in cfg["head_start_ray_commands"] if "ray start --head" in c]
    # The env file is read before `ray start`, and a head without RAY_REDIS_ADDRESS refuses to start.
    assert start.index(". ~/.tidal/redis.env") < start.index('test -n "$RAY_REDIS_ADDRESS"') < start.index("ray start")
    words = start.split()
    assert "RAY_external_storage_namespace=tidal" in words
    assert '--redis-password="$TIDAL_REDIS_PASSWORD"' in words
    for cmd in (start, *(c for c in cfg["worker_start_ray_commands"] if "ray start" in c)):
        assert "RAY_gcs_rpc_server_reconnect_timeout_s=300" in cmd.split(), cmd


def test_cluster_yaml_has_a_cpu_node_type_for_job_drivers_off_the_head():
    cfg = _load(ROOT / "cluster.yaml")
    types = cfg["available_node_types"]
    with_drivers = [name for name, t in types.items() if t["resources"].get("job_driver", 0) > 0]
    assert with_drivers == ["driver"]
    driver = types["driver"]
    assert driver["resources"]["GPU"] == 0 and "labels" not in driver and driver["min_workers"] >= 1
    assert "job_driver" not in types[cfg["head_node_type"]]["resources"]
