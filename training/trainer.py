"""``TidalTrainer``: Ray Train's ``TorchTrainer`` with Tidal's sizing in its controller; ``should_yield()`` and
``stop()`` for the user's loop. (The public names are in ``tidal.train``.)

A user's script changes in three places::

    trainer = TidalTrainer(train_func, scaling_config=ScalingConfig(num_workers=(2, 4), use_gpu=True),
                           run_config=RunConfig(storage_path=...), tidal=TidalConfig(gpu_types=["H100", "A100"]))

and, in ``train_func``, at each step boundary::

    if tidal.train.should_yield():
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(...))
        return

**The same answer on every rank.** Rank 0 keeps one ``wait_yield`` call on the run's signal actor in flight
(answered the moment the policy asks for a yield) and checks it without blocking; the ranks agree on it with
one all-reduce (MAX) of a one-element tensor on the job's own process group (gloo on CPU, NCCL on GPU), so
every rank returns True at the same call. Per step: a local ``ray.wait(timeout=0)`` on rank 0 and that
all-reduce. Without a process group (one worker), rank 0's answer is the answer.

**A yield does not end the run.** The loop returns (or calls ``stop()``) after should_yield() said True; the
wrapper around it tells the signal actor this rank has parked, with how many reports it made, and waits. The
scaling policy, once every rank has parked and the controller has collected those reports, shuts the group
down with a resize: the controller never sees the ranks finish, so the run goes on at the new size from the
checkpoint just reported (``ray.train.get_checkpoint()``). A loop that returns without a yield has finished:
the run ends as Ray Train's does.

Ray Train internals used here (pinned in ``tests/unit/test_train_v2_contract.py``): the trainer's
``_get_train_func``, ``_create_default_callbacks`` and ``_initialize_and_run_controller(train_fn_ref=,
scaling_policy=, failure_policy=, train_run_context=, callbacks=, validation_config=)`` (``fit()`` is Ray's
own with the two policies swapped and its ``DatasetsCallback`` made lean), ``ObjectRefWrapper``, the
``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` variable it propagates to the controller, and on the workers the train
context's ``report_call_index``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import ray
from ray.train import ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import _TorchBackend
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.constants import HEALTH_CHECK_INTERVAL_S_ENV_VAR
from ray.train.v2._internal.util import ObjectRefWrapper
from tidal.training.spares import process_started_s
from tidal.training.trainer_config import TidalConfig, TidalConfigError, job_name, worker_bounds
from tidal.training.trainer_policy import TidalFailurePolicy, TidalJob, TidalScalingPolicy
from tidal.training.trainer_signal import NAMESPACE, signal_name

logger = logging.getLogger(__name__)

# Rank 0's held wait for a yield: re-sent when it times out (a short timeout keeps a stale call from
# outliving its worker group by long).
WAIT_YIELD_S = 30.0
PROGRESS_PERIOD_S = 1.0


class _Stop(BaseException):
    """Raised by ``stop()``: unwinds the user's loop to the wrapper (a BaseException, so that a loop's own
    ``except Exception`` does not swallow it)."""


class _WorkerLink:
    """One rank's link to its run's signal actor (one per worker process, made by the wrapper)."""

    def __init__(self, name: str) -> None:
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.signal = ray.get_actor(name, namespace=NAMESPACE)
        self.generation = int(ray.get(self.signal.current.remote(), timeout=60))
        self.signal.hello.remote(self.generation, self.rank, process_started_s())
        self.steps = 0
        self.step_s: float | None = None
        self.yielding = False
        self._reports_before = _report_index()  # (Ray Train counts reports over the run, not per group)
        self._wait_ref: Any = None
        self._progress_s = float("-inf")

    def should_yield(self) -> bool:
        if self.yielding:
            return True
        self.steps += 1
        self.step_s = time.time()
        local = self._rank0_poll() if self.rank == 0 else False
        if _agree(local, self.world_size):
            self.yielding = True
        return self.yielding

    def _rank0_poll(self) -> bool:
        now = self.step_s or time.time()
        if now - self._progress_s >= PROGRESS_PERIOD_S or self.steps == 1:
            self.signal.progress.remote(self.generation, self.steps, now)
            self._progress_s = now
        if self._wait_ref is None:
            self._wait_ref = self.signal.wait_yield.remote(self.generation, WAIT_YIELD_S)
        ready, _ = ray.wait([self._wait_ref], timeout=0)
        if not ready:
            return False
        answer = bool(ray.get(self._wait_ref))
        self._wait_ref = None
        return answer

    def park(self) -> None:
        """Tells the policy this rank has yielded, then waits to be ended by the resize. Never returns."""
        reports = _report_index() - self._reports_before
        ray.get(
            self.signal.park.remote(self.generation, self.rank, reports, self.steps, self.step_s), timeout=60
        )
        logger.info("rank %d parked after %d reports; waiting for the resize", self.rank, reports)
        while True:
            time.sleep(60.0)


_link: _WorkerLink | None = None


def _report_index() -> int:
    """How many ``ray.train.report`` calls this worker's train context has counted."""
    from ray.train.v2._internal.execution.context import get_train_context

    return int(get_train_context().report_call_index)


def _agree(local: bool, world_size: int) -> bool:
    """Rank 0's answer on every rank: an all-reduce (MAX) of one int on the job's process group."""
    if world_size <= 1:
        return local
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return local
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        import ray.train.torch

        device = ray.train.torch.get_device()
    flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def should_yield() -> bool:
    """Whether the loop should report a checkpoint and return now, at this step boundary.

    Call it on every rank at every step boundary: it answers the same on every rank (it is a collective on the
    job's process group). True means the arbiter resized the job: report a checkpoint with
    ``ray.train.report(..., checkpoint=...)`` and return (or call :func:`stop`); the run goes on at its new
    size from that checkpoint. Outside a ``TidalTrainer`` it is always False.
    """
    return _link.should_yield() if _link is not None else False


def stop() -> None:
    """Ends this rank's loop here, from any depth of nested loops: after ``should_yield()`` said True the
    run goes on at its new size; otherwise the loop has finished. Call it after the report, on every rank."""
    raise _Stop()


def wrap_train_loop(train_loop_per_worker: Callable[..., Any], name: str) -> Callable[..., Any]:
    """The user's loop, run with a link to the signal actor and parked (not returned) after a yield.

    The wrapper takes a config argument exactly when the user's loop does (Ray Train passes
    ``train_loop_config`` by the loop's signature). It is pickled by value (a closure), so it only calls
    :func:`_run_user_loop`, which is pickled by reference: the link it sets is this module's, the one
    ``should_yield()`` reads on the worker.
    """
    takes_config = len(inspect.signature(train_loop_per_worker).parameters) > 0

    if takes_config:

        def tidal_train_loop(config: dict[str, Any]) -> Any:
            return _run_user_loop(train_loop_per_worker, name, (config,))

    else:

        def tidal_train_loop() -> Any:  # type: ignore[misc]
            return _run_user_loop(train_loop_per_worker, name, ())

    tidal_train_loop.__name__ = getattr(train_loop_per_worker, "__name__", "train_loop_per_worker")
    return tidal_train_loop


def _run_user_loop(train_loop_per_worker: Callable[..., Any], name: str, args: tuple[Any, ...]) -> Any:
    global _link
    _cpu_where_no_cuda()
    link = _link = _WorkerLink(name)
    result = None
    try:
        result = train_loop_per_worker(*args)
    except _Stop:
        pass
    if link.yielding:
        link.park()
    return result


def _cpu_where_no_cuda() -> None:
    """On a worker that holds GPUs Torch cannot see (the local cluster's logical GPUs), Ray Train's
    ``get_device()`` and ``prepare_model`` use the CPU, so that a script written for GPUs runs unchanged.

    Ray picks its torch device manager from the worker's accelerator ids (GPU ids here, so CUDA) and caches
    it in a module global; this sets the CPU one first (pinned in tests/unit/test_train_v2_contract.py).
    Hugging Face Accelerate (under Transformers' ``Trainer``) reads its device from ``ACCELERATE_TORCH_DEVICE``,
    which Ray Train's backend set from that CUDA device manager, and runs multi-process on CPU only when told
    to (``ACCELERATE_USE_CPU``): both are set here too, so its DDP runs on gloo over the job's process group.
    """
    import torch

    if torch.cuda.is_available():
        return
    from ray.air._internal import device_manager
    from ray.air._internal.device_manager.cpu import CPUTorchDeviceManager

    with device_manager._torch_device_manager_lock:
        device_manager._torch_device_manager = CPUTorchDeviceManager()
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


class _AutoTorchBackend(_TorchBackend):
    """Ray Train's torch backend, with the process-group backend chosen on the workers themselves:
    NCCL where rank 0 sees CUDA, gloo where it does not (logical GPUs, as on this machine).

    The driver cannot tell (it may run on a node without GPUs), and asking a separate task would start a
    process and import torch once more per resize.
    """

    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        cuda = bool(worker_group.execute_single(0, _cuda_available))
        chosen = dataclasses.replace(backend_config, backend="nccl" if cuda else "gloo")
        logger.info("workers %s CUDA: torch.distributed backend %s", "see" if cuda else "do not see", chosen.backend)
        super().on_start(worker_group, chosen)


@dataclasses.dataclass
class AutoTorchConfig(TorchConfig):
    """``TorchConfig`` with ``backend`` left to the workers: NCCL on CUDA, gloo on CPU."""

    @property
    def backend_cls(self) -> type:
        return _AutoTorchBackend


class _NoDatasets:
    """The dataset shard provider of a run given no datasets: answers as Ray Train's does for a name it was
    not given, without an actor."""

    def get_dataset_shard(self, dataset_info: Any) -> Any:
        raise KeyError(
            f"Dataset shard for '{dataset_info.dataset_name}' not found: this run was given no datasets; pass it "
            "through the trainer's `datasets` argument."
        )


class _DatasetsCallback(DatasetsCallback):
    """Ray Train's datasets callback, which starts a ``DatasetManager`` actor at every worker group start,
    datasets or not: a new process importing Ray Data (~2 CPU-seconds here) in the middle of every resize. A run
    given no datasets gets none; one given datasets gets Ray's."""

    def before_init_train_context(self, workers: list[Any]) -> dict[str, list[Any]]:
        if self._datasets:
            return super().before_init_train_context(workers)
        return {"dataset_shard_provider": [_NoDatasets()] * len(workers)}


def _lean_callbacks(callbacks: list[Any], train_run_context: Any, datasets: dict[str, Any]) -> list[Any]:
    """Ray Train's default callbacks with its datasets callback swapped for ``_DatasetsCallback``."""
    return [
        _DatasetsCallback(train_run_context=train_run_context, datasets=datasets) if type(cb) is DatasetsCallback else cb
        for cb in callbacks
    ]


def gpus_per_worker(scaling_config: ScalingConfig) -> float:
    """GPUs each worker asks for; a config that asks for none is refused (the arbiter sizes GPU workers)."""
    resources = dict(scaling_config.resources_per_worker or {})
    gpus = float(resources.get("GPU", 1.0 if scaling_config.use_gpu else 0.0))
    if gpus <= 0:
        raise TidalConfigError(
            "invalid ScalingConfig:\n  use_gpu: TidalTrainer sizes GPU workers; set use_gpu=True or "
            f"resources_per_worker={{'GPU': 1}} (got use_gpu={scaling_config.use_gpu!r}, resources_per_worker="
            f"{scaling_config.resources_per_worker!r})"
        )
    return gpus


def _submission_id() -> str | None:
    """The submission id of the Ray job this driver runs in (``ray job submit``), from the job config Ray's job
    supervisor hands the driver; None for a driver started otherwise."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return None
    return (config.get("metadata") or {}).get("job_submission_id")


class TidalTrainer(TorchTrainer):
    """``ray.train.torch.TorchTrainer`` whose size and GPU type the arbiter decides.

    Takes what ``TorchTrainer`` takes, plus ``tidal``: ``ScalingConfig(num_workers=(min, max), use_gpu=True)``
    gives the bounds; the arbiter grants a size in them on one of ``tidal.gpu_types``. ``torch_config``
    defaults to NCCL on CUDA workers, gloo where the workers see no CUDA (logical GPUs).

    Raises:
        TidalConfigError: at construction, before anything starts, for a bad ``tidal`` or a scaling config
            it cannot size.
    """

    def __init__(
        self,
        train_loop_per_worker: Callable[..., Any],
        *,
        tidal: TidalConfig,
        train_loop_config: dict[str, Any] | None = None,
        torch_config: Any = None,
        scaling_config: ScalingConfig | None = None,
        run_config: Any = None,
        datasets: dict[str, Any] | None = None,
        dataset_config: Any = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(tidal, TidalConfig):
            raise TidalConfigError(f"invalid TidalTrainer:\n  tidal: expected a TidalConfig (got {tidal!r})")
        scaling_config = scaling_config if scaling_config is not None else ScalingConfig(use_gpu=True)
        self.min_workers, self.max_workers = worker_bounds(scaling_config.num_workers)
        self.gpus_per_worker = gpus_per_worker(scaling_config)
        self.tidal = tidal
        self.token = uuid.uuid4().hex[:10]
        super().__init__(
            wrap_train_loop(train_loop_per_worker, signal_name(self.token)),
            train_loop_config=train_loop_config,
            torch_config=torch_config if torch_config is not None else AutoTorchConfig(),
            scaling_config=scaling_config,
            run_config=run_config,
            datasets=datasets,
            dataset_config=dataset_config,
            **kwargs,
        )
        self.job_name = job_name(tidal, self.run_config.name, self.token)

    def _job(self) -> TidalJob:
        return TidalJob(
            self.job_name, self.token, self.min_workers, self.max_workers, self.gpus_per_worker, self.tidal,
            submission_id=_submission_id(),
        )  # fmt: skip

    def fit(self) -> Any:
        """Ray Train's ``fit()``, with Tidal's scaling and failure policies in its one controller."""
        train_fn = self._get_train_func()
        user_poll = os.environ.get(HEALTH_CHECK_INTERVAL_S_ENV_VAR)
        if user_poll is None:  # (propagated to the controller by Ray Train; the user's own setting wins)
            os.environ[HEALTH_CHECK_INTERVAL_S_ENV_VAR] = str(self.tidal.controller_poll_s)
        try:
            result = self._initialize_and_run_controller(
                train_fn_ref=ObjectRefWrapper(train_fn),
                scaling_policy=TidalScalingPolicy(self.scaling_config, self._job()),
                failure_policy=TidalFailurePolicy(self.run_config.failure_config, self.token),
                train_run_context=self.train_run_context,
                callbacks=_lean_callbacks(self._create_default_callbacks(), self.train_run_context, self.datasets),
                validation_config=self.validation_config,
            )
        finally:
            if user_poll is None:
                os.environ.pop(HEALTH_CHECK_INTERVAL_S_ENV_VAR, None)
        if result.error:
            raise result.error
        return result
