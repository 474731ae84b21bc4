"""A job spec (``training/jobs/*.yaml``) as a ``TidalTrainer``: what ``python -m tidal.training.run`` runs.

Tidal's own jobs use nothing a user's script cannot: the built-in loop (``tidal.training.loop``) calls
``tidal.train.should_yield()`` at each step boundary and reports its checkpoints with ``ray.train.report``;
the spec's fields map onto Ray Train's configs and a ``TidalConfig`` (:func:`build_trainer`). After the run,
the final checkpoint is exported for serving (a finished job) and the run's summary is written to
``<storage_path>/<name>/tidal/summary.json``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from tidal.training.spec import JobSpec

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


def trainer_configs(spec: JobSpec, *, standalone: bool = False) -> dict[str, Any]:
    """The ``TidalTrainer`` keyword arguments for ``spec`` (no Ray started: a pure mapping of its fields)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig
    from tidal.training.trainer import AutoTorchConfig
    from tidal.training.trainer_config import TidalConfig

    return {
        "train_loop_config": {"spec": spec.model_dump(mode="json", by_alias=True)},
        "torch_config": AutoTorchConfig() if spec.backend == "auto" else TorchConfig(backend=spec.backend),
        "scaling_config": ScalingConfig(
            num_workers=(spec.min_workers, spec.max_workers),
            use_gpu=True,
            resources_per_worker={"GPU": spec.gpus_per_worker, "CPU": spec.cpus_per_worker},
        ),
        "run_config": RunConfig(
            name=spec.name,
            storage_path=spec.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.num_checkpoints_to_keep),
            # A lost node is a failure Ray Train retries on the GPUs left, from the last checkpoint; a loop
            # that fails on its own, again and again, ends the run.
            failure_config=FailureConfig(max_failures=spec.max_failures),
        ),
        "tidal": TidalConfig(
            gpu_types=list(spec.gpu_types),
            priority=spec.priority,
            preemptible=spec.preemptible,
            weight=spec.weight,
            yield_grace_s=spec.yield_grace_s,
            resize_min_interval_s=spec.resize_min_interval_s,
            name=spec.name,
            controller_poll_s=spec.health_check_interval_s,
            spare_workers=spec.spare_workers,
            standalone=standalone,
        ),
    }


def build_trainer(spec: JobSpec, *, standalone: bool = False) -> Any:
    from tidal.training.loop import train_loop_per_worker
    from tidal.training.trainer import TidalTrainer

    return TidalTrainer(train_loop_per_worker, **trainer_configs(spec, standalone=standalone))


def run_job(spec: JobSpec, *, standalone: bool = False) -> dict[str, Any]:
    """Runs ``spec`` to its end under the arbiter (or without it, ``standalone``); returns its summary.

    A run Ray Train ends with an error (a loop that keeps failing) comes back unfinished, with the error.
    """
    trainer = build_trainer(spec, standalone=standalone)
    error: str | None = None
    result = None
    try:
        result = trainer.fit()
    except Exception as e:  # the run failed (TrainingFailedError and the like): the summary says how
        logger.error("job %s: %s", spec.name, e)
        error = f"{type(e).__name__}: {e}"
    checkpoint = result.checkpoint if result is not None else None
    finished = bool(result is not None and (result.metrics or {}).get("done"))
    history: list[list[float]] = []
    metrics: dict[str, Any] = {}
    export_path = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            history, metrics, export_path = export(spec, Path(d), finished)
    ledger = _read_ledger(spec)
    expected = dict(spec.expected_metrics)
    reached = all(metric_reached(k, metrics.get(k), v) for k, v in expected.items()) if finished and expected else None
    summary = {
        "job": spec.name,
        "finished": finished,
        "error": error,
        "final_step": int(history[-1][0]) if history else ledger.get("checkpoint_step"),
        "restarts": max(0, len(ledger.get("groups") or []) - 1),
        "steps_lost": int(ledger.get("steps_lost") or 0),
        "forced_stops": int(ledger.get("forced_stops") or 0),
        "releases": int(ledger.get("releases") or 0),
        "groups": ledger.get("groups") or [],
        "resizes": ledger.get("resizes") or [],
        "history": history,
        "metrics": metrics,
        "expected_metrics": expected,
        "reached_expected": reached,
        "export_path": export_path,
        "checkpoint_path": checkpoint.path if checkpoint is not None else None,
    }
    _write_text(f"{spec.storage_path.rstrip('/')}/{spec.name}/tidal/{SUMMARY_FILE}", json.dumps(summary, indent=1, default=str))
    return summary


def _read_ledger(spec: JobSpec) -> dict[str, Any]:
    """The trainer's own ledger (``tidal_summary.json``, written by its scaling policy), or {}."""
    from tidal.training.trainer_policy import SUMMARY_FILE as LEDGER_FILE

    path = f"{spec.storage_path.rstrip('/')}/{spec.name}/{LEDGER_FILE}"
    try:
        if "://" in path:
            import pyarrow.fs

            fs, p = pyarrow.fs.FileSystem.from_uri(path)
            with fs.open_input_stream(p) as f:
                return json.loads(f.read().decode())
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        logger.warning("job %s: no trainer ledger at %s (%r)", spec.name, path, e)
        return {}


def metric_reached(name: str, value: Any, threshold: float) -> bool:
    """A metric named ``*loss`` must be at most its threshold, any other at least: test_loss 1.9 <= 2.0."""
    if value is None:
        return False
    return float(value) <= threshold if name.endswith("loss") else float(value) >= threshold


def export(spec: JobSpec, ckpt_dir: Path, finished: bool) -> tuple[list[list[float]], dict[str, Any], str | None]:
    """Loads the final checkpoint and, if the run finished, writes the model for serving."""
    import torch
    from tidal.training.loop import META_FILE, STATE_FILE, build_model

    state = torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=True)
    meta = json.loads((ckpt_dir / META_FILE).read_text())
    history = [list(h) for h in state["history"]]
    metrics = dict(meta.get("metrics") or {})
    if not finished:
        return history, metrics, None
    from tidal.serving.manifest import write_model_checkpoint

    model = build_model(spec)
    model.load_state_dict(state["model"])
    target = spec.resolved_export_path()
    local = target
    if "://" in target:
        local = os.path.join(tempfile.mkdtemp(prefix="tidal-tr-export-"), "model")
    write_model_checkpoint(
        model,
        local,
        model_class=spec.model.class_path,
        model_kwargs=dict(spec.model.kwargs),
        version=f"{spec.name}-step{state['step']}",
        input_shape=meta["input_shape"],
        labels=meta.get("labels"),
        metrics={k: v for k, v in metrics.items() if k in ("step", "loss", "test_loss", "test_accuracy", "epoch")},
    )
    if local != target:
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(target)
        pyarrow.fs.copy_files(local, path, destination_filesystem=fs)
    logger.info("job %s: exported the final model (step %d) to %s", spec.name, state["step"], target)
    return history, metrics, target


def _write_text(uri_or_path: str, text: str) -> None:
    if "://" in uri_or_path:
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(uri_or_path)
        fs.create_dir(os.path.dirname(path), recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(text.encode())
        return
    p = Path(uri_or_path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(p)
