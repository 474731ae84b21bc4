"""``tidal.serve``: the dicts a user puts in a Serve deployment's config, their validation, the guard on Serve's
delays, and the policy as Serve builds and calls it (Serve's own config and context classes; no cluster)."""

import logging
import time
from types import SimpleNamespace

import pytest
from pydantic import ValidationError
from tidal.cluster.arbiter import ManualClock
from tidal.cluster.model import Allocation, GrantView
from tidal.serving.autoscale_math import DeploymentSnapshot
from tidal.serving.config import (
    MAX_SERVE_DOWNSCALE_DELAY_S,
    SERVE_DEFAULT_DOWNSCALE_DELAY_S,
    SERVE_DEFAULT_UPSCALE_DELAY_S,
    TIDAL_POLICY_PATH,
    TidalPolicyOptions,
    default_service_name,
    gpus_per_replica_of,
    placement_warnings,
    selector_gpu_types,
    serve_delay_warnings,
    service_spec_for,
)

from tidal.serve import TidalPolicy, autoscaling_config, ray_actor_options

GPU_TYPE_LABEL = "ray.io/accelerator-type"


def test_autoscaling_config_names_tidals_policy_and_keeps_serves_own_delays_short():
    cfg = autoscaling_config(gpu_types=["A100", "H100"], min_replicas=0, max_replicas=4, priority=50)
    assert cfg["policy"]["policy_function"] == TIDAL_POLICY_PATH == "tidal.serve:TidalPolicy"
    assert (cfg["min_replicas"], cfg["max_replicas"]) == (0, 4)
    assert (cfg["upscale_delay_s"], cfg["downscale_delay_s"]) == (0.0, 1.0)
    kwargs = cfg["policy"]["policy_kwargs"]
    assert kwargs == {"gpu_types": ["A100", "H100"], "priority": 50, "slo_p99_ms": 500.0}
    # What the config says is never said twice: the bounds are Serve's, not the policy's.
    assert not {"min_replicas", "max_replicas", "gpus_per_replica"} & set(kwargs)
    assert (
        serve_delay_warnings(
            "s", upscale_delay_s=cfg["upscale_delay_s"], downscale_delay_s=cfg["downscale_delay_s"]
        )
        == []
    )


def test_the_load_delays_go_to_the_policy_and_other_kwargs_pass_through():
    cfg = autoscaling_config(
        gpu_types=["A100"], downscale_delay_s=120, upscale_delay_s=2, arbiter_name="arb-2"
    )
    kwargs = cfg["policy"]["policy_kwargs"]
    assert (kwargs["downscale_delay_s"], kwargs["upscale_delay_s"], kwargs["arbiter_name"]) == (
        120,
        2,
        "arb-2",
    )
    assert (cfg["upscale_delay_s"], cfg["downscale_delay_s"]) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"gpu_types": ["A100"], "priority": -1}, "priority"),
        ({"gpu_types": ["A 100"]}, "gpu_types"),
        ({"gpu_types": []}, "gpu_types"),
        ({"gpu_types": ["A100", "A100"]}, "gpu_types"),
        ({"priority": 5}, "gpu_types"),  # missing
        ({"gpu_types": ["A100"], "slo_p99_ms": float("nan")}, "slo_p99_ms"),
        ({"gpu_types": ["A100"], "gpu_type": "A100"}, "gpu_type"),  # a typo: not silently ignored
    ],
)
def test_bad_policy_kwargs_are_refused_naming_the_field_and_never_break_serves_controller(
    kwargs, field, caplog
):
    with pytest.raises((ValidationError, TypeError)) as e:  # (TypeError: a missing keyword argument)
        autoscaling_config(**kwargs)
    assert field in str(e.value)
    # Serve builds the policy in its controller, where a raise would stall every application's
    # reconciliation: the policy logs the field and scales on load alone, outside Tidal.
    with caplog.at_level(logging.ERROR, logger="ray.serve.tidal"):
        policy = TidalPolicy(**kwargs)
    assert field in policy.config_error and "NOT under Tidal" in caplog.text and field in caplog.text
    ctx = SimpleNamespace(
        total_num_requests=7.0,
        config=SimpleNamespace(min_replicas=1, max_replicas=3, target_ongoing_requests=2),
    )
    assert policy(ctx) == (3, {})
    assert policy.link is None  # never registered


def test_autoscaling_config_refuses_bounds_serve_would_refuse_later():
    with pytest.raises(ValidationError, match="min_replicas"):
        autoscaling_config(gpu_types=["A100"], min_replicas=3, max_replicas=2)


def test_ray_actor_options_pin_replicas_to_the_accepted_types_in_order():
    opts = ray_actor_options(gpu_types=["A100", "H100"], num_gpus=1, num_cpus=0.5)
    assert opts == {
        "num_cpus": 0.5,
        "num_gpus": 1,
        "label_selector": {GPU_TYPE_LABEL: "A100"},
        "fallback_strategy": [{"label_selector": {GPU_TYPE_LABEL: "H100"}}],
    }
    assert selector_gpu_types(opts) == ("A100", "H100")
    assert placement_warnings("s", ["A100", "H100"], selector_gpu_types(opts)) == []


def test_a_service_is_named_after_its_app_and_deployment_unless_named():
    assert default_service_name("shop", "Digits") == "shop.Digits"
    assert default_service_name("my app/v2", "Model") == "my-app-v2.Model"
    assert default_service_name("", "Model") == "Model"
    assert default_service_name("_x", "M") == "s_x.M"


def test_the_spec_takes_bounds_and_gpus_from_the_deployment_and_the_rest_from_the_kwargs():
    opts = TidalPolicyOptions(gpu_types=["H100"], priority=70, slo_p99_ms=90)
    spec = service_spec_for(
        opts, app_name="shop", deployment_name="Digits", min_replicas=0, max_replicas=6, gpus_per_replica=2.0
    )
    assert (spec.name, spec.min_replicas, spec.max_replicas, spec.gpus_per_replica) == (
        "shop.Digits",
        0,
        6,
        2.0,
    )
    assert (spec.gpu_types, spec.priority, spec.slo_p99_ms) == (("H100",), 70, 90)
    with pytest.raises(ValueError, match="num_gpus"):
        service_spec_for(
            opts,
            app_name="shop",
            deployment_name="Digits",
            min_replicas=0,
            max_replicas=6,
            gpus_per_replica=0,
        )


def test_gpus_per_replica_come_from_the_placement_group_when_there_is_one():
    assert gpus_per_replica_of({"num_gpus": 1}) == 1.0
    assert (
        gpus_per_replica_of({"num_gpus": 0}, [{"CPU": 1}, {"GPU": 1}, {"GPU": 1}]) == 2.0
    )  # an LLM with TP=2
    assert gpus_per_replica_of({}, None) == 0.0


def test_serves_default_delays_give_a_warning_each_naming_the_fix():
    warnings = serve_delay_warnings(
        "shop.Digits",
        upscale_delay_s=SERVE_DEFAULT_UPSCALE_DELAY_S,
        downscale_delay_s=SERVE_DEFAULT_DOWNSCALE_DELAY_S,
    )
    down, up = warnings
    assert "600 s" in down and "downscale_delay_s: 1" in down and "tidal.serve.autoscaling_config" in down
    assert "30 s" in up and "upscale_delay_s: 0" in up
    # A downscale-to-zero delay keeps the last replica's GPU just as long.
    (only,) = serve_delay_warnings(
        "s",
        upscale_delay_s=0,
        downscale_delay_s=1,
        downscale_to_zero_delay_s=MAX_SERVE_DOWNSCALE_DELAY_S + 58,
    )
    assert "60 s" in only


def test_unpinned_replicas_are_warned_about_with_the_options_to_add():
    (w,) = placement_warnings("s", ["A100", "H100"], ())
    assert "not pinned" in w and "label_selector" in w and "'H100'" in w
    (w,) = placement_warnings("s", ["A100"], ("RTX4090",))
    assert "not all of them accepted" in w


# ------------------------------------------------------------------- Serve's own classes, as Serve uses them


class _Client:
    def __init__(self) -> None:
        self.registered = []

    def available(self):
        return True

    def register(self, spec, meta=None, *, demand_units=None, held=None):
        self.registered.append((spec, dict(meta or {})))
        return GrantView(spec.name, Allocation.of(A100=2))

    def heartbeat(self, name, **kw):
        return GrantView(name, Allocation.of(A100=2))

    def unregister(self, name):
        return True


class _Inspector:
    def observe(self, app_name, deployment_name):
        return DeploymentSnapshot(1.0, ("A100",), {})


def test_a_deployment_built_with_the_dicts_resolves_and_runs_the_policy_with_serves_own_context():
    from ray import serve
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingContext

    class UserModel:  # a user's class: no Tidal code
        def __call__(self, x):
            return x

    cfg = autoscaling_config(gpu_types=["A100"], min_replicas=1, max_replicas=4)
    dep = serve.deployment(autoscaling_config=cfg, ray_actor_options=ray_actor_options(gpu_types=["A100"]))(
        UserModel
    )
    dep = dep.options(name="Model", autoscaling_config=cfg)  # .options takes the same dict
    serve_cfg = dep._deployment_config.autoscaling_config
    policy_cls = serve_cfg.policy.get_policy()  # Serve imports tidal.serve:TidalPolicy by its path
    assert policy_cls is TidalPolicy

    clock = ManualClock(50.0)
    client = _Client()

    class Policy(policy_cls):
        client_factory = staticmethod(lambda name, ns: client)
        inspector_factory = _Inspector
        run_link_thread = False

    Policy.clock = staticmethod(clock.now)
    policy = Policy(**serve_cfg.policy.policy_kwargs)
    did = DeploymentID(name="Model", app_name="shop")
    rids = [ReplicaID(unique_id=f"r{i}", deployment_id=did) for i in range(1)]

    def ctx(requests):
        return AutoscalingContext(
            deployment_id=did,
            deployment_name="Model",
            app_name="shop",
            current_num_replicas=1,
            target_num_replicas=1,
            running_replicas=rids,
            total_num_requests=requests,
            total_queued_requests=0.0,
            aggregated_metrics={},
            raw_metrics={},
            capacity_adjusted_min_replicas=1,
            capacity_adjusted_max_replicas=4,
            policy_state={},
            last_scale_up_time=None,
            last_scale_down_time=None,
            current_time=time.time(),
            config=serve_cfg,
        )

    assert policy(ctx(7.0))[0] == 4  # no grant yet: Serve's behaviour, within [1, 4]
    policy.link.step()
    ((spec, meta),) = client.registered
    assert (spec.name, spec.min_replicas, spec.max_replicas, spec.gpus_per_replica) == (
        "shop.Model",
        1,
        4,
        1.0,
    )
    assert (meta["serve_app"], meta["serve_deployment"]) == ("shop", "Model")
    assert policy(ctx(7.0))[0] == 2  # capped at the grant


def test_llm_config_takes_the_dict_as_its_deployment_config():
    """As far as a machine without vLLM goes: LLMConfig validates the deployment_config as Serve's
    DeploymentConfig (policy path included). Building the LLM app's deployment options
    (``LLMServer.get_deployment_options``) imports vLLM's protocol models, so that part is skipped here."""
    try:
        from ray.serve.llm import LLMConfig
    except ImportError:
        # ray.serve.llm itself imports vLLM or SGLang; its LLMConfig is this class.
        from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    cfg = autoscaling_config(gpu_types=["A100"], min_replicas=1, max_replicas=2)
    llm = LLMConfig(
        model_loading_config={"model_id": "tiny-model"},
        accelerator_type="A100",
        deployment_config={"autoscaling_config": cfg},
    )
    assert (
        llm.deployment_config["autoscaling_config"]["policy"]["policy_function"] == "tidal.serve:TidalPolicy"
    )
    with pytest.raises(ValueError, match="deployment config"):
        LLMConfig(
            model_loading_config={"model_id": "tiny-model"},
            deployment_config={"autoscaling_config": {**cfg, "min_replicas": 3}},  # above max_replicas
        )
    try:
        from ray.llm._internal.serve.core.server.llm_server import LLMServer
    except ImportError as e:
        pytest.skip(f"building the LLM app's deployment options needs vLLM (or SGLang): {e}")
    options = LLMServer.get_deployment_options(llm)
    assert options["autoscaling_config"]["policy"]["policy_function"] == "tidal.serve:TidalPolicy"
