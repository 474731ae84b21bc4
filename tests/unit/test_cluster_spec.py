"""The cluster spec (pure): the default file, validation messages, node naming."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from tidal.cluster.cluster_spec import (
    DEFAULT_SPEC_PATH,
    LocalClusterSpec,
    load_cluster_spec,
    parse_cluster_spec,
)


def test_default_spec_has_four_h100_two_a100_two_rtx4090_on_three_nodes():
    spec = load_cluster_spec()
    assert spec.gpus_by_type() == {"H100": 4, "A100": 2, "RTX4090": 2}
    assert [n.name for n in spec.nodes()] == ["h100-0", "a100-0", "rtx4090-0"]
    assert all(n.labels["ray.io/accelerator-type"] == n.gpu_type for n in spec.nodes())


def test_a_group_of_two_nodes_gets_numbered_names_and_default_cpus():
    spec = parse_cluster_spec({"node_groups": [{"gpu_type": "H200", "count": 2, "num_gpus": 8}]})
    nodes = spec.nodes()
    assert [n.name for n in nodes] == ["h200-0", "h200-1"]
    assert [n.num_cpus for n in nodes] == [9, 9]
    assert spec.gpus_by_type() == {"H200": 16}


def test_negative_gpu_count_is_refused_naming_the_field_and_value():
    with pytest.raises(ValueError) as e:
        parse_cluster_spec({"node_groups": [{"gpu_type": "A100", "num_gpus": -2}]})
    msg = str(e.value)
    assert "node_groups[0].num_gpus" in msg and "-2" in msg and "greater than or equal to 0" in msg


def test_unknown_field_is_refused_by_name():
    with pytest.raises(ValueError, match=r"node_groups\[0\]\.gpus: unknown field"):
        parse_cluster_spec({"node_groups": [{"gpu_type": "A100", "num_gpus": 2, "gpus": 2}]})


def test_gpu_type_that_is_not_a_label_value_is_refused():
    with pytest.raises(ValueError, match="not a valid Ray label value"):
        parse_cluster_spec({"node_groups": [{"gpu_type": "A100 80GB", "num_gpus": 2}]})


def test_two_groups_with_one_name_are_refused():
    with pytest.raises(ValueError, match="used twice"):
        parse_cluster_spec(
            {"node_groups": [{"gpu_type": "A100", "num_gpus": 2}, {"gpu_type": "A100", "num_gpus": 4}]}
        )


def test_labels_cannot_override_the_gpu_type():
    with pytest.raises(ValueError, match="comes from gpu_type"):
        parse_cluster_spec(
            {"node_groups": [{"gpu_type": "A100", "num_gpus": 2, "labels": {"ray.io/accelerator-type": "H100"}}]}
        )


def test_unreadable_and_invalid_yaml_files_are_reported_with_their_path(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_cluster_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("node_groups: [\n")
    with pytest.raises(ValueError, match=f"{re.escape(str(bad))} is not valid YAML"):
        load_cluster_spec(bad)


def test_spec_survives_a_round_trip_through_the_state_file_format():
    spec = load_cluster_spec()
    again = LocalClusterSpec.model_validate(json.loads(json.dumps(spec.model_dump())))
    assert again == spec


def test_default_spec_path_points_at_the_shipped_file():
    assert DEFAULT_SPEC_PATH.name == "local.yaml" and DEFAULT_SPEC_PATH.exists()


def test_the_spec_module_imports_neither_ray_nor_the_process_manager():
    # The simulator reads cluster specs too, and must not depend on the code that starts processes.
    code = (
        "import sys, tidal.cluster.cluster_spec\n"
        "bad = ('ray', 'torch', 'psutil', 'tidal.cluster.local', 'tidal.cluster.processes', 'tidal.cluster.port_lease')\n"
        "print(','.join(sorted(m for m in bad if m in sys.modules)))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "", f"the spec module pulled in: {r.stdout.strip()}"


def test_gcs_fault_tolerance_takes_a_redis_host_and_port_and_refuses_anything_else():
    spec = parse_cluster_spec({"gcs_fault_tolerance": {"redis_address": "127.0.0.1:6390"}})
    assert spec.gcs_fault_tolerance is not None
    assert spec.gcs_fault_tolerance.reconnect_timeout_s == 60
    assert spec.gcs_fault_tolerance.external_storage_namespace is None
    assert parse_cluster_spec({}).gcs_fault_tolerance is None
    for good in ("redis://10.0.0.5:6379", "rediss://my-redis.example.com:6380"):
        parse_cluster_spec({"gcs_fault_tolerance": {"redis_address": good}})
    for bad in ("127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", ":6379", "host:port"):
        with pytest.raises(ValueError, match=r"gcs_fault_tolerance\.redis_address: .*is not host:port"):
            parse_cluster_spec({"gcs_fault_tolerance": {"redis_address": bad}})
    with pytest.raises(ValueError, match=r"gcs_fault_tolerance\.reconnect_timeout_s"):
        parse_cluster_spec({"gcs_fault_tolerance": {"redis_address": "h:1", "reconnect_timeout_s": 0}})
