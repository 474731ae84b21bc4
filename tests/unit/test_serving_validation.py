"""Request validation and Tidal's serving options: every refusal names the field and what is valid."""

import math

import pytest
from pydantic import ValidationError
from tidal.cluster.model import GPU_TYPE_LABEL
from tidal.serving.config import (
    TIDAL_MODEL_MODULES,
    TIDAL_POLICY_PATH,
    ModelOptions,
    ServeAppArgs,
    allowed_model_modules,
    autoscaling_config_for,
    ray_actor_options_for,
    resolve_api_key,
    runtime_env_with_api_key,
)
from tidal.serving.schemas import InputError, flatten_instances, parse_predict_body


def test_instances_of_the_right_shape_flatten_in_order():
    assert flatten_instances([[1, 2], [3.5, 4]], [2]) == [1.0, 2.0, 3.5, 4.0]
    assert flatten_instances([[[1, 2], [3, 4]]], [2, 2]) == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize(
    ("instances", "shape", "field", "message"),
    [
        ([[1, 2, 3]], [2], "instances[0]", "expected 2 values"),
        ([[1, 2], [1]], [2], "instances[1]", "got 1"),
        ([[1, "2"]], [2], "instances[0][1]", "expected a number, got string '2'"),
        ([[1, True]], [2], "instances[0][1]", "boolean"),
        ([[1, None]], [2], "instances[0][1]", "null"),
        ([[1, math.nan]], [2], "instances[0][1]", "finite"),
        ([[1, math.inf]], [2], "instances[0][1]", "finite"),
        ([5], [2], "instances[0]", "got number 5"),
        ([[[1, 2], [3]]], [2, 2], "instances[0][1]", "expected 2 values"),
        ([[1, [2]]], [2], "instances[0][1]", "a list of 1"),
    ],
)
def test_bad_instances_are_refused_naming_where_and_why(instances, shape, field, message):
    with pytest.raises(InputError) as e:
        flatten_instances(instances, shape)
    assert e.value.field == field
    assert message in e.value.message
    assert e.value.status == 422


@pytest.mark.parametrize(
    ("body", "field", "status", "message"),
    [
        ([], "body", 422, "expected a JSON object"),
        ({"instance": []}, "instance", 422, "unknown field"),
        ({}, "instances", 422, "missing"),
        ({"instances": {"a": 1}}, "instances", 422, "expected a list"),
        ({"instances": []}, "instances", 422, "empty"),
        ({"instances": [[0]] * 5}, "instances", 413, "more than the limit of 4"),
    ],
)
def test_bad_request_bodies_get_the_right_status_and_message(body, field, status, message):
    with pytest.raises(InputError) as e:
        parse_predict_body(body, max_instances=4)
    assert (e.value.field, e.value.status) == (field, status)
    assert message in e.value.message
    assert e.value.to_json() == {"error": {"field": field, "message": e.value.message}}


def test_error_messages_never_echo_a_huge_value():
    with pytest.raises(InputError) as e:
        flatten_instances([["x" * 10_000]], [1])
    assert len(e.value.message) < 100


def args(**overrides) -> dict:
    base = {
        "service": {"name": "digits", "gpu_types": ["A100", "H100"], "min_replicas": 0, "max_replicas": 3},
        "model": {"checkpoint": "/ckpt/v1"},
    }
    base.update(overrides)
    return base


def test_replicas_prefer_the_first_gpu_type_and_fall_back_in_order():
    opts = ray_actor_options_for(ServeAppArgs.model_validate(args(num_cpus_per_replica=0.5)))
    assert opts["label_selector"] == {GPU_TYPE_LABEL: "A100"}
    assert opts["fallback_strategy"] == [{"label_selector": {GPU_TYPE_LABEL: "H100"}}]
    assert (opts["num_gpus"], opts["num_cpus"]) == (1.0, 0.5)


def test_a_single_gpu_type_needs_no_fallback():
    a = args()
    a["service"]["gpu_types"] = ["H100"]
    assert "fallback_strategy" not in ray_actor_options_for(ServeAppArgs.model_validate(a))


def test_serve_bounds_come_from_the_service_spec_and_the_policy_gets_only_what_serve_does_not_say():
    parsed = ServeAppArgs.model_validate(args())
    cfg = autoscaling_config_for(parsed)
    assert (cfg["min_replicas"], cfg["max_replicas"]) == (0, 3)
    # The model server names the one policy every Tidal service names, with the same kwargs as any user's.
    assert cfg["policy"]["policy_function"] == TIDAL_POLICY_PATH == "tidal.serve:TidalPolicy"
    kwargs = cfg["policy"]["policy_kwargs"]
    assert kwargs["gpu_types"] == ["A100", "H100"]
    assert kwargs["name"] == parsed.service.name
    assert not {"min_replicas", "max_replicas", "gpus_per_replica", "service"} & set(kwargs)
    # Serve's own delay paces grant shrinks; the load hold is the policy's.
    assert cfg["downscale_delay_s"] == 1.0
    assert cfg["policy"]["policy_kwargs"]["downscale_delay_s"] == 30.0
    # The upscale delay too is the policy's (on the load); Serve's own would start only when a grant grew.
    assert cfg["upscale_delay_s"] == 0.0
    assert cfg["policy"]["policy_kwargs"]["upscale_delay_s"] == 0.5


def test_the_default_policy_option_leaves_serve_in_charge():
    cfg = autoscaling_config_for(ServeAppArgs.model_validate(args(autoscaling={"policy": "default"})))
    assert "policy" not in cfg
    assert cfg["downscale_delay_s"] == 30.0
    assert cfg["upscale_delay_s"] == 0.5


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"model": {"checkpoint": "/c", "precision": "fp8"}}, "model.precision"),
        ({"model": {"checkpoint": "/c", "max_batch_size": 0}}, "model.max_batch_size"),
        ({"model": {"checkpoint": ""}}, "model.checkpoint"),
        ({"service": {"name": "d", "gpu_types": []}}, "service.gpu_types"),
        ({"service": {"name": "d", "gpu_types": ["H100"], "min_replicas": 3, "max_replicas": 2}}, "service"),
        ({"autoscaling": {"policy": "magic"}}, "autoscaling.policy"),
        ({"max_body_bytes": 1}, "max_body_bytes"),
        ({"max_abs_input": 0}, "max_abs_input"),
        ({"max_abs_input": 1e39}, "max_abs_input"),
        ({"api_key": "short"}, "api_key"),
        ({"typo_field": 1}, "typo_field"),
    ],
)
def test_bad_app_args_fail_naming_the_field(overrides, field):
    with pytest.raises(ValidationError) as e:
        ServeAppArgs.model_validate(args(**overrides))
    assert field in str(e.value)


def test_checkpoint_paths_expand_home_and_variables(monkeypatch):
    monkeypatch.setenv("TIDAL_HOME", "/data/tidal")
    assert ModelOptions(checkpoint="${TIDAL_HOME}/ck").checkpoint == "/data/tidal/ck"
    assert not ModelOptions(checkpoint="~/ck").checkpoint.startswith("~")


def test_the_shipped_serve_config_is_valid_for_serve_and_for_tidal():
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema
    from tidal.serving import config as serving_config

    raw = yaml.safe_load((Path(serving_config.__file__).parent / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "tidal.serving.app:build_app"
    parsed = ServeAppArgs.model_validate(app.args)
    assert parsed.service.min_replicas == 0 and parsed.autoscaling.policy == "tidal"
    assert raw["http_options"]["port"] != 8000


def test_the_api_key_is_resolved_once_from_args_or_the_applications_environment():
    parsed = ServeAppArgs.model_validate(args())
    assert resolve_api_key(parsed, {"TIDAL_SERVE_API_KEY": "key-from-runtime-env"}) == "key-from-runtime-env"
    assert resolve_api_key(parsed, {}) is None
    named = ServeAppArgs.model_validate(args(api_key_env="MY_KEY"))
    assert (
        resolve_api_key(named, {"MY_KEY": "my-key-0123", "TIDAL_SERVE_API_KEY": "other-key"}) == "my-key-0123"
    )
    in_args = ServeAppArgs.model_validate(args(api_key="key-in-args-01"))
    assert resolve_api_key(in_args, {"TIDAL_SERVE_API_KEY": "key-from-env-1"}) == "key-in-args-01"
    with pytest.raises(ValueError, match=r"api_key_env: \$TIDAL_SERVE_API_KEY holds a key of 3 characters"):
        resolve_api_key(parsed, {"TIDAL_SERVE_API_KEY": "abc"})


def test_a_deploy_takes_the_key_from_the_deployers_environment_into_the_applications_runtime_env():
    parsed = ServeAppArgs.model_validate(args())
    env = {"TIDAL_SERVE_API_KEY": "deployer-key-01"}
    assert runtime_env_with_api_key({"working_dir": "."}, parsed, env) == {
        "working_dir": ".",
        "env_vars": {"TIDAL_SERVE_API_KEY": "deployer-key-01"},
    }
    assert runtime_env_with_api_key(None, parsed, {}) is None
    own = {"env_vars": {"TIDAL_SERVE_API_KEY": "app-key-0123"}}
    assert runtime_env_with_api_key(own, parsed, env) == own  # the application's own key wins
    in_args = ServeAppArgs.model_validate(args(api_key="key-in-args-01"))
    assert runtime_env_with_api_key(None, in_args, env) is None


def test_model_modules_are_tidals_own_plus_what_the_application_allows():
    assert allowed_model_modules(ServeAppArgs.model_validate(args())) == TIDAL_MODEL_MODULES
    extra = ServeAppArgs.model_validate(args(allowed_model_modules=["tidal.demo.model", "mypkg"]))
    assert allowed_model_modules(extra) == (*TIDAL_MODEL_MODULES, "tidal.demo.model", "mypkg")
    with pytest.raises(ValidationError, match="allowed_model_modules"):
        ServeAppArgs.model_validate(args(allowed_model_modules=["mypkg:Model"]))


def test_a_deploy_naming_a_model_class_the_application_does_not_allow_fails_before_serve_starts(tmp_path):
    from tidal.serving.manifest import write_model_checkpoint
    from tidal.serving.rollout import RolloutError, deploy_config
    from tidal.training.models import DigitsMLP

    ckpt = write_model_checkpoint(
        DigitsMLP(hidden=8),
        tmp_path / "ck",
        model_class="tidal.demo.model:DeviceTimedMLP",
        model_kwargs={"hidden": 8},
        version="v1",
        input_shape=[64],
    )
    app = {
        "name": "demo",
        "import_path": "tidal.serving.app:build_app",
        "args": args(model={"checkpoint": str(ckpt)}),
    }
    with pytest.raises(RolloutError, match=r"'tidal.demo.model:DeviceTimedMLP'.*allowed_model_modules"):
        deploy_config({"applications": [app]})
