"""Bad ``policy_kwargs`` fail the deploy of their application (``tidal.serving.deploy_check``): the messages, and
the contract with Serve's internals the check rests on. If a Ray upgrade breaks a contract test here, bad kwargs
no longer fail the deploy (the policy only logs them): find Serve's new place for the check before upgrading.

Serve's own classes (config schema, ``override_deployment_info``, ``ApplicationState``), no cluster.
"""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
import textwrap

import pytest
from tidal.serving.config import TIDAL_POLICY_PATH, policy_kwargs_problems
from tidal.serving.deploy_check import PolicyKwargsError, check_deployment_infos, install_deploy_check

KNOWN = {"A100", "H100", "RTX4090"}


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"gpu_types": ["A100"], "priority": -5},
            ["policy_kwargs.priority: -5 is not valid", "integer >= 0"],
        ),
        ({"priority": 5}, ["policy_kwargs.gpu_types: missing; valid: a non-empty list of GPU types"]),
        ({"gpu_types": ["B300", "A100"]}, ["unknown GPU type 'B300'", "valid: A100, H100, RTX4090"]),
        ({"gpu_types": ["A 100"]}, ["policy_kwargs.gpu_types[0]: 'A 100' is not valid"]),
        (
            {"gpu_types": ["A100"], "gpu_type": "H100"},
            ["policy_kwargs.gpu_type: unknown option", "gpu_types,"],
        ),
        (
            {"gpu_types": ["A100"], "slo_p99_ms": 0},
            ["policy_kwargs.slo_p99_ms: 0 is not valid", "greater than 0"],
        ),
    ],
)
def test_each_problem_names_the_field_the_bad_value_and_what_is_valid(kwargs, expected):
    (line,) = policy_kwargs_problems(kwargs, KNOWN)
    for part in expected:
        assert part in line, line


def test_good_kwargs_and_known_types_have_no_problem_and_unknown_types_pass_when_nothing_is_known():
    assert policy_kwargs_problems({"gpu_types": ["A100", "H100"], "priority": 0}, KNOWN) == []
    assert policy_kwargs_problems({"gpu_types": ["B300"]}, None) == []


# --------------------------------------------------------------------------- the check on Serve's own objects


def _serve_infos(deployments: list[dict]) -> dict:
    """Deployment infos as Serve's controller makes them from a config (``override_deployment_info``)."""
    from ray.serve._private.application_state import override_deployment_info
    from ray.serve._private.config import DeploymentConfig, ReplicaConfig
    from ray.serve._private.deployment_info import DeploymentInfo
    from ray.serve.schema import ServeApplicationSchema

    class Model:
        pass

    built = {
        d["name"]: DeploymentInfo(
            deployment_config=DeploymentConfig(),
            replica_config=ReplicaConfig.create(Model),
            start_time_ms=0,
            deployer_job_id="",
        )
        for d in deployments
    }
    config = ServeApplicationSchema(name="shop", import_path="m:app", deployments=deployments)
    return override_deployment_info(built, config)


def _tidal(kwargs: dict, **extra: object) -> dict:
    return {
        "min_replicas": 0,
        "max_replicas": 2,
        "policy": {"policy_function": TIDAL_POLICY_PATH, "policy_kwargs": kwargs},
        **extra,
    }


def test_the_check_names_application_deployment_and_field_and_skips_other_policies():
    infos = _serve_infos(
        [
            {"name": "Good", "autoscaling_config": _tidal({"gpu_types": ["A100"]})},
            {"name": "Bad", "autoscaling_config": _tidal({"gpu_types": ["B300"], "priority": -1})},
            {"name": "Plain", "autoscaling_config": {"min_replicas": 1, "max_replicas": 2}},
            {"name": "Fixed", "num_replicas": 1},
        ]
    )
    asked: list[str] = []

    def types_of(arbiter: str) -> set[str]:
        asked.append(arbiter)
        return KNOWN

    with pytest.raises(PolicyKwargsError) as e:
        check_deployment_infos("shop", infos, types_of)
    message = str(e.value)
    assert isinstance(e.value, ValueError)  # what Serve turns into DEPLOY_FAILED
    assert message.startswith(f"application 'shop': bad policy_kwargs for {TIDAL_POLICY_PATH}")
    assert "deployment 'Bad': autoscaling_config.policy.policy_kwargs.priority: -1 is not valid" in message
    assert "Good" not in message and "Plain" not in message
    assert asked == ["tidal-arbiter"]  # the types are read once, for the kwargs that parse

    with pytest.raises(PolicyKwargsError, match="deployment 'Good'.*unknown GPU type 'A100'"):
        check_deployment_infos("shop", infos, lambda arbiter: {"H100"})
    check_deployment_infos("shop", {k: v for k, v in infos.items() if k != "Bad"}, types_of)  # no raise


# ------------------------------------------------------------------- the contract with Serve's internals

CONTRACT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from ray.serve._private import application_state
    from ray.serve._private.application_state import ApplicationState, override_deployment_info
    from ray.serve._private.config import DeploymentConfig, ReplicaConfig
    from ray.serve._private.deployment_info import DeploymentInfo
    from ray.serve.schema import ServeApplicationSchema

    before = "tidal.serving.autoscale" in sys.modules
    class Model:
        pass
    built = {"D": DeploymentInfo(deployment_config=DeploymentConfig(), replica_config=ReplicaConfig.create(Model),
                                 start_time_ms=0, deployer_job_id="")}
    config = ServeApplicationSchema(name="app", import_path="m:app", deployments=[{"name": "D",
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "policy": {
            "policy_function": "tidal.serve:TidalPolicy", "policy_kwargs": {"gpu_types": ["A100"], "priority": -5}}}}])
    infos = override_deployment_info(built, config)
    after = "tidal.serving.autoscale" in sys.modules
    state = ApplicationState.__new__(ApplicationState)
    state._name = "app"
    try:
        state._check_routes(infos)
        error = None
    except ValueError as e:
        error = str(e)
    print(json.dumps({"before": before, "after": after, "error": error}))
    """
)


def test_serves_controller_imports_the_policy_module_while_building_a_config_so_the_first_deploy_is_checked():
    # A fresh interpreter, as Serve's controller is: nothing of Tidal imported until Serve builds the config.
    out = subprocess.run(
        [sys.executable, "-c", CONTRACT_SCRIPT], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert (result["before"], result["after"]) == (False, True), result
    assert result["error"] and "policy_kwargs.priority: -5 is not valid" in result["error"], result


def _handlers_around_check_routes(function) -> list[set[str]]:
    """For each ``self._check_routes(...)`` call in ``function``, the exception names of the ``try`` around it."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    found: list[set[str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        calls = [
            n
            for stmt in node.body
            for n in ast.walk(stmt)
            if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute)
            and n.func.attr == "_check_routes"
        ]
        if calls:
            names = set()
            for h in node.handlers:
                types = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
                names |= {t.id for t in types if isinstance(t, ast.Name)}
            found.append(names)
    return found


def test_serve_checks_routes_inside_the_try_that_marks_the_application_deploy_failed_on_a_value_error():
    from ray.serve._private.application_state import ApplicationState

    assert list(inspect.signature(ApplicationState._check_routes).parameters) == ["self", "deployment_infos"]
    for method in (ApplicationState._reconcile_build_app_task, ApplicationState.apply_app_config):
        handlers = _handlers_around_check_routes(method)
        assert handlers and all("ValueError" in h for h in handlers), (method.__name__, handlers)
    # The build path reports a failure as FAILED (update() then sets DEPLOY_FAILED); the config path sets it.
    assert "BuildAppStatus.FAILED, traceback.format_exc()" in inspect.getsource(
        ApplicationState._reconcile_build_app_task
    )
    assert "ApplicationStatus.DEPLOY_FAILED, traceback.format_exc()" in inspect.getsource(
        ApplicationState.apply_app_config
    )


def test_the_check_wraps_check_routes_once_and_keeps_serves_own_check():
    from ray.serve._private.application_state import ApplicationState
    from ray.serve.exceptions import RayServeException

    assert install_deploy_check() and install_deploy_check()
    wrapped = ApplicationState._check_routes
    assert getattr(wrapped, "_tidal_policy_kwargs_check", False)
    assert not getattr(wrapped.__wrapped__, "_tidal_policy_kwargs_check", False)  # wrapped once
    state = ApplicationState.__new__(ApplicationState)
    state._name = "shop"
    infos = _serve_infos([{"name": "A", "route_prefix": None}])
    assert wrapped(state, infos) is None
    two_routes = {"A": infos["A"], "B": infos["A"]}
    infos["A"].route_prefix = "/a"
    with pytest.raises(RayServeException, match="multiple route prefixes"):
        wrapped(state, two_routes)
