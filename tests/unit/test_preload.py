"""tidal.cluster.preload: the pool's modules are imported only by workers the raylet did not start for a job."""

from __future__ import annotations

import pytest
from tidal.cluster.cluster_spec import LocalClusterSpec, load_cluster_spec
from tidal.cluster.preload import (
    NIL_JOB_ID,
    POOL_MODULES_ENV,
    RAY_TRAIN_MARKER_ENV,
    RAY_TRAIN_WORKER_MODULES,
    TRAIN_NICENESS_ENV,
    bound_to_a_job,
    lower_priority_to,
    preload,
)


def recording_importer(fail: frozenset[str] = frozenset()):
    seen: list[str] = []

    def import_module(name: str) -> object:
        seen.append(name)
        if name in fail:
            raise ImportError(f"no module named {name!r}")
        return object()

    return seen, import_module


def test_a_worker_bound_to_no_job_imports_the_pool_modules():
    seen, imp = recording_importer()
    env = {"RAY_JOB_ID": NIL_JOB_ID, POOL_MODULES_ENV: "tidal.serving.app, json"}
    assert preload(env, imp) == ["tidal.serving.app", "json"]
    assert seen == ["tidal.serving.app", "json"]


def test_a_worker_started_for_a_job_imports_none():
    seen, imp = recording_importer()
    assert bound_to_a_job({"RAY_JOB_ID": "02000000"})
    assert preload({"RAY_JOB_ID": "02000000", POOL_MODULES_ENV: "tidal.serving.app"}, imp) == []
    assert seen == []


def test_no_list_imports_nothing_and_a_failing_module_is_skipped():
    seen, imp = recording_importer()
    assert preload({"RAY_JOB_ID": NIL_JOB_ID}, imp) == []
    seen, imp = recording_importer(fail=frozenset({"broken"}))
    assert preload({"RAY_JOB_ID": NIL_JOB_ID, POOL_MODULES_ENV: "broken,json"}, imp) == ["json"]
    assert seen == ["broken", "json"]


def test_the_local_cluster_preloads_torch_everywhere_and_the_model_server_in_pool_workers_only():
    env = load_cluster_spec().raylet_preload_env()
    assert env == {
        "RAY_preload_python_modules": "torch,tidal.cluster.preload",
        POOL_MODULES_ENV: "tidal.serving.app",
        TRAIN_NICENESS_ENV: "10",
    }
    assert LocalClusterSpec(preload_python_modules=["torch"]).raylet_preload_env() == {
        "RAY_preload_python_modules": "torch"
    }
    assert LocalClusterSpec().raylet_preload_env() == {}


def test_a_bad_pool_module_name_is_refused_with_the_field_and_value():
    with pytest.raises(ValueError, match=r"pool_preload_python_modules\.0: 'serving app'"):
        LocalClusterSpec(pool_preload_python_modules=["serving app"])


def test_a_worker_started_for_a_ray_train_run_imports_ray_trains_worker_module_only():
    seen, imp = recording_importer()
    env = {"RAY_JOB_ID": "02000000", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", POOL_MODULES_ENV: "tidal.serving.app"}
    assert preload(env, imp) == list(RAY_TRAIN_WORKER_MODULES)
    assert seen == list(RAY_TRAIN_WORKER_MODULES)
    # Not bound to a job: a pool worker, whatever its environment says.
    seen, imp = recording_importer()
    env = {"RAY_JOB_ID": NIL_JOB_ID, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", POOL_MODULES_ENV: "json"}
    assert preload(env, imp) == ["json"]


def test_ray_trains_worker_module_and_marker_are_what_ray_uses():
    """Ray 2.60 contract: the marker is a variable Ray Train propagates to its workers, and the module holds the
    actor class its worker groups create (a Ray upgrade that moves either fails here, not silently)."""
    import importlib

    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE
    from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup

    assert RAY_TRAIN_MARKER_ENV in ENV_VARS_TO_PROPAGATE
    (module,) = RAY_TRAIN_WORKER_MODULES
    assert WorkerGroup._worker_cls.__module__ == module
    assert importlib.import_module(module).RayTrainWorker is WorkerGroup._worker_cls


def test_a_ray_train_process_lowers_its_priority_to_the_nodes_train_niceness_before_it_imports():
    order: list[str] = []
    seen, imp = recording_importer()
    env = {"RAY_JOB_ID": "02000000", RAY_TRAIN_MARKER_ENV: "0.5", TRAIN_NICENESS_ENV: "10"}
    preload(
        env, import_module=lambda n: order.append(f"import {n}") or imp(n), renice=lambda n: order.append(f"nice {n}") or True
    )
    assert order == ["nice 10", *(f"import {m}" for m in RAY_TRAIN_WORKER_MODULES)]
    # A pool worker, or a job's other workers (a Serve replica of the job's own app), keep their priority.
    niced: list[int] = []
    for other in ({"RAY_JOB_ID": NIL_JOB_ID, TRAIN_NICENESS_ENV: "10"}, {"RAY_JOB_ID": "02000000", TRAIN_NICENESS_ENV: "10"}):
        preload(other, import_module=imp, renice=lambda n: niced.append(n) or True)
    assert niced == []
    # A bad value is logged, and the worker starts anyway.
    seen.clear()
    preload({**env, TRAIN_NICENESS_ENV: "high"}, import_module=imp)
    assert seen == list(RAY_TRAIN_WORKER_MODULES)


def test_lowering_priority_raises_niceness_to_the_value_and_never_lowers_it():
    import os

    before = os.getpriority(os.PRIO_PROCESS, 0)
    pid = os.fork()
    if pid == 0:  # a child, so that this process keeps its priority
        ok = lower_priority_to(before + 3) and os.getpriority(os.PRIO_PROCESS, 0) == before + 3
        ok = ok and not lower_priority_to(before + 1) and os.getpriority(os.PRIO_PROCESS, 0) == before + 3
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_local_cluster_sets_the_train_niceness_on_its_gpu_nodes_and_preloads_for_it():
    env = LocalClusterSpec.model_validate({"node_groups": [], "train_worker_niceness": 7}).raylet_preload_env()
    assert env[TRAIN_NICENESS_ENV] == "7" and "tidal.cluster.preload" in env["RAY_preload_python_modules"]
    assert TRAIN_NICENESS_ENV not in LocalClusterSpec.model_validate({"node_groups": []}).raylet_preload_env()
    assert load_cluster_spec().train_worker_niceness == 10


def test_the_head_preloads_only_the_train_niceness_for_ray_trains_controller_and_its_per_group_actors():
    head = LocalClusterSpec.model_validate({"node_groups": [], "train_worker_niceness": 7}).raylet_preload_env(head=True)
    assert head == {"RAY_preload_python_modules": "tidal.cluster.preload", TRAIN_NICENESS_ENV: "7"}
    assert POOL_MODULES_ENV not in head  # the head's unbound workers import nothing more
    assert LocalClusterSpec.model_validate({"node_groups": []}).raylet_preload_env(head=True) == {}
