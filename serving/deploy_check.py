"""Bad ``policy_kwargs`` fail the deploy of their own application, inside Serve's controller.

Serve (2.60) builds a deployment's autoscaling policy in its controller's reconciliation
(``DeploymentAutoscalingState.register``), where an exception is not caught: it is raised again at every
control-loop tick and stalls every application. Tidal's policy therefore never raises there
(``TidalAutoscalingPolicy`` logs bad kwargs and stays outside Tidal). This module checks the kwargs one step
earlier, where Serve turns an exception into ``DEPLOY_FAILED`` for that application alone, with the
exception as its status message: ``serve deploy`` of a config with ``priority: -5`` shows the application
``DEPLOY_FAILED`` with ``policy_kwargs.priority: -5 is not valid: ...``, the other applications run on, and a
corrected config deploys.

There is no public hook for it; the check rests on two of Serve's internals, pinned by
``tests/unit/test_serve_deploy_check_contract.py`` (which fails when a Ray upgrade changes either):

1. In the controller, ``override_deployment_info`` builds each deployment's ``DeploymentConfig`` from the
   application's config, and ``AutoscalingPolicy``'s constructor imports its ``policy_function``'s module
   there. That import (``tidal.serve`` -> ``tidal.serving.autoscale``) installs this check, so the first
   deploy naming Tidal's policy is already checked.
2. ``ApplicationState._check_routes(deployment_infos)`` runs right after it, inside the ``try`` whose
   ``except (TypeError, ValueError, RayServeException)`` marks the application ``DEPLOY_FAILED``
   (``_reconcile_build_app_task``, after the application's code is built; ``apply_app_config``, for a
   config-only change). ``deploy_app`` (``serve.run``) calls it too, and its caller gets the exception.

The check wraps ``_check_routes``: for each deployment whose policy is Tidal's (or a subclass), it validates
the kwargs (:func:`tidal.serving.config.policy_kwargs_problems`) and raises :class:`PolicyKwargsError`
(a ``ValueError``). If Serve changes, the wrapper is not installed (one warning in the controller's log) and
bad kwargs are only logged by the policy, as before.

A GPU type is known when a node of the cluster carries it (``ray.io/accelerator-type``, nodes gone
included), when the arbiter's policy file lists it (its ``gpu_types``; by default the types it prices), or
when the autoscaler's config has a node group with it (``accelerator_type:<type>``). On a cluster still scaling
up, the types of nodes not started yet are known from the last two: a deploy is never refused for a type the
operator has declared. The sources are read once per check, at deploy time only (a GCS call or two from
the controller); when none can be read, the type is not checked.

(A ``serve.run`` whose deployment's policy is deserialised before anything imported Tidal in the
controller, i.e. the first imperative deploy in a fresh controller, is not checked: the policy logs it.
``tidal.serve.autoscaling_config(...)`` raises in the user's process before that.)
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

from tidal.serving.config import TIDAL_POLICY_PATH, TidalPolicyOptions, policy_kwargs_problems

logger = logging.getLogger("ray.serve.tidal")

APPLICATION_STATE_MODULE = "ray.serve._private.application_state"
_MARK = "_tidal_policy_kwargs_check"


class PolicyKwargsError(ValueError):
    """A deployment's ``policy_kwargs`` for Tidal's policy are bad; the message names each field."""


def install_deploy_check() -> bool:
    """Wrap ``ApplicationState._check_routes`` with the policy kwargs check, where Serve's application state
    is loaded (Serve's controller; any process that imported ``ray.serve``). Idempotent.

    Returns:
        Whether the check is in place.
    """
    module = sys.modules.get(APPLICATION_STATE_MODULE)
    if module is None:
        return False
    cls = getattr(module, "ApplicationState", None)
    original = getattr(cls, "_check_routes", None)
    if cls is None or not callable(original):
        logger.warning(
            "Serve's ApplicationState._check_routes is gone (a Ray upgrade?): bad policy_kwargs of %s no longer "
            "fail the deploy; the policy logs them and keeps the deployment outside Tidal",
            TIDAL_POLICY_PATH,
        )
        return False
    if getattr(original, _MARK, False):
        return True

    @functools.wraps(original)
    def _check_routes(self: Any, deployment_infos: Mapping[str, Any]) -> Any:
        check_deployment_infos(str(getattr(self, "_name", "") or ""), deployment_infos)
        return original(self, deployment_infos)

    setattr(_check_routes, _MARK, True)
    cls._check_routes = _check_routes
    return True


def check_deployment_infos(
    app_name: str,
    deployment_infos: Mapping[str, Any],
    gpu_types_of: Callable[[str], set[str] | None] | None = None,
) -> None:
    """Raises :class:`PolicyKwargsError` naming every bad field of every deployment under Tidal's policy.

    Args:
        app_name: the application's name, for the message.
        deployment_infos: Serve's ``DeploymentInfo`` per deployment name (read: ``deployment_config.
            autoscaling_config.policy``).
        gpu_types_of: arbiter name -> the GPU types the cluster has or expects (None: not known); default
            :func:`cluster_gpu_types`. Read only for kwargs that are otherwise fine, once per arbiter.
    """
    gpu_types_of = gpu_types_of or cluster_gpu_types
    known: dict[str, set[str] | None] = {}  # per arbiter name
    lines: list[str] = []
    for deployment, info in deployment_infos.items():
        kwargs = tidal_policy_kwargs(info)
        if kwargs is None:
            continue
        problems = policy_kwargs_problems(kwargs)
        if not problems:
            arbiter = TidalPolicyOptions.model_validate(kwargs).arbiter_name
            if arbiter not in known:
                known[arbiter] = gpu_types_of(arbiter)
            problems = policy_kwargs_problems(kwargs, known[arbiter])
        lines += [f"deployment {deployment!r}: autoscaling_config.policy.{p}" for p in problems]
    if lines:
        raise PolicyKwargsError(
            f"application {app_name!r}: bad policy_kwargs for {TIDAL_POLICY_PATH}:\n  " + "\n  ".join(lines)
        )


def tidal_policy_kwargs(info: Any) -> Any | None:
    """The deployment's ``policy_kwargs`` if its autoscaling policy is Tidal's (or a subclass), else None."""
    config = getattr(getattr(info, "deployment_config", None), "autoscaling_config", None)
    policy = getattr(config, "policy", None)
    if policy is None or not _is_tidal_policy(getattr(policy, "policy_function", None)):
        return None
    return getattr(policy, "policy_kwargs", None) or {}


def _is_tidal_policy(policy_function: Any) -> bool:
    """``policy_function`` names Tidal's policy: ``module:attr`` or ``module.attr`` (Serve's form for a callable),
    resolved in modules already imported (Serve imported it to build the config: nothing is imported here)."""
    from tidal.serving.autoscale import TidalAutoscalingPolicy

    if isinstance(policy_function, type):
        return issubclass(policy_function, TidalAutoscalingPolicy)
    if not isinstance(policy_function, str):
        return False
    module_name, sep, attr = policy_function.partition(":")
    if not sep:
        module_name, _, attr = policy_function.rpartition(".")
    obj = getattr(sys.modules.get(module_name), attr, None)
    return isinstance(obj, type) and issubclass(obj, TidalAutoscalingPolicy)


def cluster_gpu_types(arbiter_name: str) -> set[str] | None:
    """The GPU types the cluster has or expects (see the module docstring); None when no source can be read."""
    found: set[str] = set()
    read = 0
    for source in (_node_label_types, _autoscaler_node_group_types):
        try:
            found |= source()
            read += 1
        except Exception as e:  # a source that cannot be read narrows nothing: the others decide
            logger.warning("cluster GPU types: %s failed: %s: %s", source.__name__, type(e).__name__, e)
    try:
        found |= _arbiter_types(arbiter_name)
        read += 1
    except Exception as e:
        logger.warning("GPU types of the arbiter's policy file: %s: %s", type(e).__name__, e)
    return found if read else None


def _node_label_types() -> set[str]:
    import ray
    from tidal.cluster.model import GPU_TYPE_LABEL

    return {t for n in ray.nodes() if (t := (n.get("Labels") or {}).get(GPU_TYPE_LABEL))}


def _autoscaler_node_group_types() -> set[str]:
    """Types of the autoscaler's node groups (``accelerator_type:<type>`` resources), started or not."""
    from ray._private.state import state

    config = state.get_cluster_config()
    prefix = "accelerator_type:"
    groups = config.node_group_configs if config is not None else []
    return {k[len(prefix) :] for g in groups for k in g.resources if k.startswith(prefix)}


def _arbiter_types(arbiter_name: str) -> set[str]:
    """The known GPU types of the arbiter's policy file, as it saved it in Ray's KV (the default file's when it
    saved none: an arbiter not started yet starts with those unless told otherwise)."""
    from ray.experimental import internal_kv
    from tidal.cluster.actor import KV_NAMESPACE
    from tidal.cluster.policy_file import parse_policy_file
    from tidal.cluster.state_store import state_keys

    raw = internal_kv._internal_kv_get(state_keys(arbiter_name)["config"], namespace=KV_NAMESPACE)
    data = json.loads(raw) if raw else {}
    return set(parse_policy_file(data, f"arbiter {arbiter_name!r}'s saved config").known_gpu_types)
