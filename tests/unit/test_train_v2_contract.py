"""The Ray Train v2 internals ``TidalTrainer`` stands on (training/trainer.py, trainer_policy.py), pinned.

Ray documents none of these as public API. Each test names what Tidal relies on and fails with a message
saying which piece of Tidal breaks when a Ray upgrade changes it. Source checks (``inspect.getsource``) pin
control flow that no signature shows: what the controller calls, in which order.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE, HEALTH_CHECK_INTERVAL_S_ENV_VAR
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.context import TrainContext, TrainRunContext, get_train_context
from ray.train.v2._internal.execution.controller.controller import TrainController
from ray.train.v2._internal.execution.failure_handling import (
    FailureDecision,
    FailurePolicy,
    create_failure_policy,
)
from ray.train.v2._internal.execution.scaling_policy import NoopDecision, ResizeDecision, ScalingPolicy
from ray.train.v2._internal.execution.training_report import _TrainingReport
from ray.train.v2._internal.execution.worker_group.placement_group_handle import DefaultPlacementGroupHandle
from ray.train.v2._internal.execution.worker_group.poll import WorkerGroupPollStatus, WorkerStatus
from ray.train.v2._internal.execution.worker_group.state import WorkerGroupState
from ray.train.v2._internal.execution.worker_group.worker import RayTrainWorker
from ray.train.v2._internal.util import ObjectRefWrapper
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer


def params(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)  # type: ignore[arg-type]


def source(fn: object) -> str:
    return inspect.getsource(fn)  # type: ignore[arg-type]


def test_the_scaling_policy_interface_tidal_implements_is_unchanged():
    abstract = ScalingPolicy.__abstractmethods__
    assert abstract == {
        "make_decision_for_non_running_worker_group",
        "make_decision_for_running_worker_group",
        "_get_num_workers_for_resource_request",
    }, f"TidalScalingPolicy implements another set of abstract methods than Ray's ScalingPolicy: {abstract}"
    assert params(ScalingPolicy.make_decision_for_running_worker_group) == [
        "self", "worker_group_state", "worker_group_status",
    ]  # fmt: skip
    assert params(ScalingPolicy.__init__) == ["self", "scaling_config"]
    assert issubclass(ScalingPolicy, ControllerCallback), "the policy's controller hooks would never run"
    assert [f.name for f in dataclasses.fields(ResizeDecision)] == ["num_workers", "resources_per_worker"]
    assert dataclasses.fields(NoopDecision) == ()


def test_the_controller_asks_the_policy_in_the_states_tidal_expects():
    step = source(TrainController._step)
    # Initializing/Restarting/Rescheduling: the non-running decision (Tidal's start, and its wait at grant 0).
    assert "InitializingState, RestartingState, ReschedulingState" in step
    assert "_make_and_handle_scaling_decision_for_non_running_worker_group" in step
    non_running = source(TrainController._make_and_handle_scaling_decision_for_non_running_worker_group)
    assert "make_decision_for_non_running_worker_group()" in non_running
    assert "next_state = controller_state" in non_running, (
        "a Noop must keep the controller waiting, not end it"
    )
    # Running: polls first, then the running decision with the poll's status (Tidal counts reports in it).
    poll_at = step.index("await self._poll_workers()")
    assert step.index("_is_training_succeeded(worker_group_status)") > poll_at
    assert step.index("make_decision_for_running_worker_group(") > step.index("worker_group_status.errors")
    assert "worker_group_status=worker_group_status" in step
    # A resize from a running group: Resizing -> Scheduling -> shut the old group down, then start the new one.
    assert "ResizingState(" in step and "SchedulingState(" in step
    resize = source(TrainController._execute_resize_decision)
    assert resize.index("self._shutdown_worker_group()") < resize.index("self._start_worker_group("), (
        "Tidal reports a shrink's GPUs free when the next group starts: the old one must be gone by then"
    )


def test_the_label_selector_of_each_worker_group_comes_from_a_controller_callback():
    assert params(ControllerCallback.on_controller_start_worker_group) == [
        "self",
        "scaling_config",
        "num_workers",
    ]
    start = source(TrainController._start_worker_group)
    assert "callback.on_controller_start_worker_group(" in start
    assert "label_selector = [selector.copy() for _ in range(num_workers)]" in start, (
        "TidalScalingPolicy names the granted GPU type through this hook's return value"
    )
    init = source(TrainController.__init__)
    assert "self._scaling_policy," in init, "the scaling policy must be one of the controller's callbacks"


def test_the_trainer_builds_its_controller_as_tidal_trainer_fit_calls_it():
    fit = source(DataParallelTrainer.fit)
    for kw in ("train_fn_ref=", "scaling_policy=", "failure_policy=", "train_run_context=", "callbacks=",
               "validation_config="):  # fmt: skip
        assert kw in fit, f"DataParallelTrainer.fit no longer passes {kw} (TidalTrainer.fit copies that call)"
    assert "ObjectRefWrapper(train_fn)" in fit and "self._get_train_func()" in fit
    assert "self._create_default_callbacks()" in fit
    assert params(DataParallelTrainer._initialize_and_run_controller) == ["self", "controller_init_kwargs"]
    assert params(TrainController.__init__) == [
        "self", "train_fn_ref", "train_run_context", "scaling_policy", "failure_policy", "callbacks",
        "validation_config",
    ]  # fmt: skip
    assert params(ObjectRefWrapper.__init__)[1:] == ["obj"]


def test_the_controller_poll_interval_is_an_environment_variable_ray_propagates_to_the_controller():
    assert HEALTH_CHECK_INTERVAL_S_ENV_VAR == "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    assert HEALTH_CHECK_INTERVAL_S_ENV_VAR in ENV_VARS_TO_PROPAGATE


def test_the_worker_group_state_and_poll_status_carry_what_the_policy_reads():
    assert "placement_group_handle" in {f.name for f in dataclasses.fields(WorkerGroupState)}
    assert isinstance(WorkerGroupState.num_workers, property)
    assert isinstance(DefaultPlacementGroupHandle.placement_group, property), (
        "a release at grant 0 removes the worker group's placement group"
    )
    assert "worker_statuses" in {f.name for f in dataclasses.fields(WorkerGroupPollStatus)}
    assert "training_report" in {f.name for f in dataclasses.fields(WorkerStatus)}
    assert {"metrics", "checkpoint"} <= set(params(_TrainingReport.__init__))


def test_a_worker_drains_one_report_per_poll():
    from ray.train.v2._internal.execution.worker_group.worker import RayTrainWorker

    poll = source(RayTrainWorker.poll_status)
    assert "result_queue.get_nowait()" in poll and poll.count("get_nowait") == 1, (
        "TidalScalingPolicy counts one report per rank per poll to know the controller has a rank's checkpoint"
    )


def test_the_worker_train_context_counts_reports():
    assert "report_call_index" in {f.name for f in dataclasses.fields(TrainContext)}
    assert "self.report_call_index += 1" in source(TrainContext.report)
    assert callable(get_train_context)


def test_the_failure_policy_interface_and_the_run_context_are_unchanged():
    assert FailurePolicy.__abstractmethods__ == {"make_decision"}
    assert params(FailurePolicy.make_decision) == ["self", "training_failed_error"]
    assert FailureDecision.RETRY.value == "RETRY"
    assert params(create_failure_policy) == ["failure_config"]
    fields = {f.name for f in dataclasses.fields(TrainRunContext)}
    assert {"run_id", "run_config"} <= fields


@pytest.mark.parametrize("name", ["storage_filesystem", "experiment_fs_path"])
def test_the_storage_context_names_where_the_run_writes(name):
    from ray.train.v2._internal.execution.storage import StorageContext

    assert name in source(StorageContext), f"StorageContext.{name} (the summary file's location) is gone"


def test_the_torch_device_manager_is_a_module_global_chosen_once():
    from ray.air._internal import device_manager
    from ray.air._internal.device_manager.cpu import CPUTorchDeviceManager

    pick = source(device_manager.get_torch_device_manager_by_context)
    assert "if not _torch_device_manager:" in pick and "global _torch_device_manager" in pick, (
        "TidalTrainer sets the CPU device manager on workers whose GPUs Torch cannot see (logical GPUs)"
    )
    assert hasattr(device_manager, "_torch_device_manager_lock")
    assert callable(CPUTorchDeviceManager)


def test_the_datasets_callback_tidal_makes_lean_is_built_and_read_as_tidal_expects():
    """``TidalTrainer`` swaps Ray's ``DatasetsCallback`` for one that starts no ``DatasetManager`` actor when the
    run has no datasets (training/trainer.py: ``_lean_callbacks``): the default callbacks must still build it with
    these arguments, it must read ``_datasets`` and hand workers a ``dataset_shard_provider``, and the workers must
    read that provider only when the loop asks for a shard."""
    assert "DatasetsCallback(" in source(DataParallelTrainer._create_default_callbacks)
    assert params(DatasetsCallback.__init__)[1:] == ["train_run_context", "datasets"]
    hook = source(DatasetsCallback.before_init_train_context)
    assert "self._datasets" in hook and "RayDatasetShardProvider(" in hook and '"dataset_shard_provider"' in hook
    assert "dataset_shard_provider" in params(RayTrainWorker.init_train_context)
    assert "self.dataset_shard_provider.get_dataset_shard(" in source(TrainContext.get_dataset_shard)
