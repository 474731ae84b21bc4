"""The policy file and workload specs at the boundary: clear errors, naming field, value and what is valid."""

import pytest
from tidal.cluster.arbiter import ArbiterConfig
from tidal.cluster.policy_file import arbiter_config, load_policy_file, parse_policy_file
from tidal.cluster.specs import SpecError, parse_service_spec, parse_training_job_spec
from tidal.policies.base import resolve_policy
from tidal.policies.config import PolicyConfigError, build_policy, parse_policy_config
from tidal.policies.guards import GuardedPolicy
from tidal.policies.priority import TidalPolicy
from tidal.policies.static_split import StaticSplitPolicy


def test_defaults_build_the_guarded_tidal_policy():
    policy = build_policy(load_policy_file(None))
    assert isinstance(policy, GuardedPolicy) and isinstance(policy.inner, TidalPolicy)


def test_a_policy_file_loads_from_yaml(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("policy: static\nstatic: {serving_share: {A100: 0.5}}\nguards: {job_resize_min_interval_s: 5}\n")
    policy = build_policy(load_policy_file(path))
    assert isinstance(policy.inner, StaticSplitPolicy)
    assert policy.config.job_resize_min_interval_s == 5


def test_an_unknown_gpu_type_names_the_field_and_the_valid_types():
    with pytest.raises(PolicyConfigError, match=r"speeds: unknown GPU type 'B200'; valid: A100, H100, H200, RTX4090"):
        parse_policy_config({"speeds": {"B200": 4.0}})


def test_a_negative_price_is_refused():
    with pytest.raises(PolicyConfigError, match=r"prices_per_gpu_hour: price for H100 is -1.0: must be >= 0"):
        parse_policy_config({"prices_per_gpu_hour": {"H100": -1}})


def test_an_unknown_policy_name_lists_the_known_ones():
    with pytest.raises(PolicyConfigError, match=r"unknown policy 'fastest'; valid: ray-alone, static, tidal"):
        parse_policy_config({"policy": "fastest"})


def test_an_unknown_key_is_refused():
    with pytest.raises(PolicyConfigError, match=r"guards\.cooldown: unknown field"):
        parse_policy_config({"guards": {"cooldown": 3}})


def test_a_policy_given_as_module_attr_is_resolved():
    assert resolve_policy("tidal.policies.fcfs:FcfsPolicy")().name == "ray-alone"
    with pytest.raises(PolicyConfigError, match="cannot import module"):
        build_policy(parse_policy_config({"policy": "no_such_module:Policy"}))


def test_a_missing_or_broken_file_says_what_is_wrong(tmp_path):
    with pytest.raises(PolicyConfigError, match="cannot read policy config"):
        load_policy_file(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: [unclosed\n")
    with pytest.raises(PolicyConfigError, match="not valid YAML"):
        load_policy_file(bad)


def test_the_runtime_sections_load_with_the_policy_and_set_the_arbiter_knobs(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(
        "policy: static\narbiter: {tick_interval_s: 0.5, registration_ttl_s: 20, default_yield_grace_s: 10}\n"
        "warm_pool: {spare_workers_per_node: 2}\n"
    )
    cfg = load_policy_file(path)
    assert isinstance(build_policy(cfg).inner, StaticSplitPolicy)
    assert cfg.arbiter.tick_interval_s == 0.5 and cfg.warm_pool.spare_workers_per_node == 2
    assert arbiter_config(cfg) == ArbiterConfig(registration_ttl_s=20, default_yield_grace_s=10)


def test_a_bad_runtime_setting_names_its_section_and_field():
    with pytest.raises(PolicyConfigError, match=r"arbiter.tick_interval_s: .*greater than 0"):
        parse_policy_file({"arbiter": {"tick_interval_s": 0}})
    with pytest.raises(PolicyConfigError, match=r"warm_pool\.spares: unknown field"):
        parse_policy_file({"warm_pool": {"spares": 2}})


def test_a_min_above_its_max_is_refused_for_services_and_jobs():
    with pytest.raises(SpecError, match=r"min_replicas \(5\) is above max_replicas \(2\)"):
        parse_service_spec({"name": "s", "gpu_types": ["A100"], "min_replicas": 5, "max_replicas": 2})
    with pytest.raises(SpecError, match=r"min_workers \(4\) is above max_workers \(1\)"):
        parse_training_job_spec({"name": "j", "gpu_types": ["A100"], "min_workers": 4, "max_workers": 1})


def test_a_workload_gpu_type_the_cluster_lacks_is_refused():
    with pytest.raises(SpecError, match=r"gpu_types: unknown GPU type 'TPU'; valid: A100, H100"):
        parse_training_job_spec({"name": "j", "gpu_types": ["TPU"]}, known_gpu_types=["H100", "A100"])
    spec = parse_service_spec({"name": "s", "gpu_types": ["A100"], "gpus_per_replica": 0.5, "max_replicas": 4})
    assert spec.gpus_per_replica == 0.5 and spec.gpu_types == ("A100",)


def test_a_gpu_type_listed_twice_is_refused_by_a_service_spec_and_by_policy_kwargs():
    from tidal.serving.config import policy_kwargs_problems

    twice = ["A100", "H100", "A100"]
    with pytest.raises(SpecError, match=r"gpu_types: gpu_types \['A100', 'H100', 'A100'\] lists a type twice"):
        parse_service_spec({"name": "svc", "gpu_types": twice, "max_replicas": 2})
    assert any("lists a type twice" in p for p in policy_kwargs_problems({"gpu_types": twice}))
