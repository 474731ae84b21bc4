"""NaN, infinities and out-of-range numbers are refused wherever users write numbers in files: the policy file,
the cluster spec, workload specs, training job specs and the simulator's config. Each error names the field
and the value, and says what is valid."""

from __future__ import annotations

import math

import pytest
from tidal.cluster.cluster_spec import parse_cluster_spec
from tidal.cluster.policy_file import parse_policy_file
from tidal.cluster.sim.config import parse_sim_config
from tidal.cluster.specs import parse_service_spec, parse_training_job_spec
from tidal.policies.config import PolicyConfigError
from tidal.training.spec import parse_spec

NAN, INF = math.nan, math.inf
FINITE = "Input should be a finite number"


@pytest.mark.parametrize(
    ("data", "field", "shown"),
    [
        ({"speeds": {"H100": NAN}}, "speeds.H100", "nan"),
        ({"speeds": {"H100": INF}}, "speeds.H100", "inf"),
        ({"prices_per_gpu_hour": {"H100": NAN}}, "prices_per_gpu_hour.H100", "nan"),
        ({"prices_per_gpu_hour": {"H100": "inf"}}, "prices_per_gpu_hour.H100", "'inf'"),
        ({"headroom_fraction": NAN}, "headroom_fraction", "nan"),
        ({"restart_hold_s": INF}, "restart_hold_s", "inf"),
        ({"static": {"serving_share": {"A100": NAN}}}, "static.serving_share.A100", "nan"),
        ({"guards": {"service_downscale_delay_s": INF}}, "guards.service_downscale_delay_s", "inf"),
        ({"guards": {"moves_window_s": NAN}}, "guards.moves_window_s", "nan"),
        ({"arbiter": {"registration_ttl_s": INF}}, "arbiter.registration_ttl_s", "inf"),
        ({"arbiter": {"default_yield_grace_s": INF}}, "arbiter.default_yield_grace_s", "inf"),
        ({"warm_pool": {"keep_alive_s": INF}}, "warm_pool.keep_alive_s", "inf"),
        ({"warm_pool": {"node_cooldown_s": NAN}}, "warm_pool.node_cooldown_s", "nan"),
    ],
)
def test_a_policy_file_with_a_nan_or_infinite_number_is_refused_naming_the_key_and_value(data, field, shown):
    with pytest.raises(PolicyConfigError) as e:
        parse_policy_file(data, "policy.yaml")
    assert f"{field}: {FINITE} (got {shown})" in str(e.value)


def test_the_policy_file_from_yaml_refuses_nan_speeds(tmp_path):
    from tidal.cluster.policy_file import load_policy_file

    p = tmp_path / "policy.yaml"
    p.write_text("speeds: {H100: .nan, H200: 3.6, A100: 2.0, RTX4090: 1.0}\n")
    with pytest.raises(PolicyConfigError, match=r"speeds\.H100: Input should be a finite number \(got nan\)"):
        load_policy_file(p)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"head": {"resources": {"accel": NAN}}}, "head.resources.accel"),
        ({"node_groups": [{"gpu_type": "A100", "num_gpus": 1, "resources": {"x": INF}}]}, r"node_groups\[0\]\.resources\.x"),
    ],
)
def test_a_cluster_spec_with_a_nan_or_infinite_resource_is_refused(raw, field):
    with pytest.raises(ValueError, match=rf"{field}: {FINITE}"):
        parse_cluster_spec(raw, "cluster.yaml")


def test_a_cluster_spec_with_a_negative_resource_is_refused():
    raw = {"node_groups": [{"gpu_type": "A100", "num_gpus": 1, "resources": {"x": -1}}]}
    with pytest.raises(ValueError, match=r"resources\[x\] = -1.0: a custom resource's amount must be >= 0"):
        parse_cluster_spec(raw, "cluster.yaml")


def test_workload_specs_refuse_infinite_sizes_and_periods():
    with pytest.raises(ValueError, match=rf"slo_p99_ms: {FINITE} \(got inf\)"):
        parse_service_spec({"name": "s", "gpu_types": ["A100"], "slo_p99_ms": INF})
    with pytest.raises(ValueError, match=rf"checkpoint_period_s: {FINITE} \(got inf\)"):
        parse_training_job_spec({"name": "j", "gpu_types": ["A100"], "checkpoint_period_s": INF})
    with pytest.raises(ValueError, match=rf"weight: {FINITE} \(got inf\)"):
        parse_training_job_spec({"name": "j", "gpu_types": ["A100"], "weight": INF})


def _job(**overrides):
    return {
        "name": "j",
        "model": {"class": "tidal.training.models:DigitsMLP"},
        "data": {"factory": "tidal.training.data:digits"},
        "gpu_types": ["A100"],
        "global_batch_size": 8,
        "steps": 10,
        **overrides,
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("yield_grace_s", INF),
        ("checkpoint_period_s", INF),
        ("resize_min_interval_s", INF),
        ("lr", NAN),
        ("weight_decay", INF),
        ("epochs", INF),
        ("cpus_per_worker", INF),
    ],
)
def test_a_training_job_spec_with_a_nan_or_infinite_number_is_refused(field, value):
    with pytest.raises(ValueError, match=rf"{field}: .*finite number"):
        parse_spec(_job(**{field: value}), source="job.yaml")


def test_a_training_job_spec_refuses_an_infinite_expected_metric():
    with pytest.raises(ValueError, match=r"expected_metrics\.test_loss: .*finite number"):
        parse_spec(_job(expected_metrics={"test_loss": INF}), source="job.yaml")


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"days": INF}, "days"),
        ({"training_load": NAN}, "training_load"),
        ({"drain_s": INF}, "drain_s"),
        ({"node_failure_rate_per_day": INF}, "node_failure_rate_per_day"),
        ({"arbiter": {"tick_s": INF}}, "arbiter.tick_s"),
        ({"arbiter": {"event_tick_delay_s": INF}}, "arbiter.event_tick_delay_s"),
        ({"service": {"replica_rps": {"H100": NAN}}}, "service.replica_rps.H100"),
        ({"service": {"service_time_s": {"H100": INF}}}, "service.service_time_s.H100"),
        ({"service": {"drain_s": INF}}, "service.drain_s"),
        ({"training": {"max_scale": INF}}, "training.max_scale"),
        ({"training": {"step_time_s": [0.5, INF]}}, r"training\.step_time_s\[1\]"),
        ({"node_failures": [{"at_s": INF, "node": "A100"}]}, r"node_failures\[0\]\.at_s"),
    ],
)
def test_a_simulator_config_with_a_nan_or_infinite_number_is_refused(data, field):
    with pytest.raises(ValueError, match=rf"{field}: {FINITE}"):
        parse_sim_config(data, "sim.yaml")


def test_a_simulator_config_refuses_a_negative_or_infinite_replica_startup():
    with pytest.raises(ValueError, match=r"startup_s\[H100\] = -3.0: must be seconds >= 0"):
        parse_sim_config({"service": {"startup_s": {"H100": -3}}})
    with pytest.raises(ValueError, match=r"startup_s = -3.0: must be seconds >= 0"):
        parse_sim_config({"service": {"startup_s": -3}})
    with pytest.raises(ValueError, match=rf"startup_s.float: {FINITE}"):
        parse_sim_config({"service": {"startup_s": INF}})
