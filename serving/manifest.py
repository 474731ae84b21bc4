"""The checkpoint format shared by training (writer) and serving (reader).

A model checkpoint is a directory with two files:

- ``model.pt``: the model's ``state_dict`` (``torch.save``).
- ``manifest.json``: a :class:`ModelManifest` naming the model class as ``module:attr``, its constructor
  kwargs, the version, the per-instance input shape and dtype, optional class labels and metrics.

Any ``torch.nn.Module`` importable where it is loaded can be trained and served this way, once the operator
allows its module: importing a module runs its code, so a manifest may only name classes from the modules the
loader is given (Tidal's own by default, :data:`tidal.serving.config.TIDAL_MODEL_MODULES`; an application adds
its own in ``allowed_model_modules``), and the weights load with ``torch.load(weights_only=True)``. The writer is
atomic: it writes into a temporary sibling directory and renames it into place, so a reader never sees a
half-written checkpoint (a rollout that promotes a checkpoint while training is still writing it is safe).

This module imports torch only inside the functions that need it, so the manifest model and
:func:`load_manifest` stay usable (and testable) without torch.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from tidal.serving.config import TIDAL_MODEL_MODULES

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.pt"
SUPPORTED_DTYPES = ("float32",)


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or invalid. The message says which and why."""


class ModelManifest(BaseModel):
    """What a checkpoint holds and how to rebuild the model that reads it.

    Example::

        {"model_class": "tidal.training.models:DigitsMLP", "model_kwargs": {"hidden": 128},
         "version": "digits-3", "input_shape": [64], "input_dtype": "float32",
         "labels": ["0", "1", ...], "framework": "torch", "created_s": 1720000000.0,
         "metrics": {"val_accuracy": 0.97}}
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_class: str = Field(description="The nn.Module to build, as 'module:attr'.")
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    version: str = Field(min_length=1)
    input_shape: list[int] = Field(description="Shape of one instance, without the batch dimension.")
    input_dtype: Literal["float32"] = "float32"
    labels: list[str] | None = None
    framework: Literal["torch"] = "torch"
    created_s: float = Field(default_factory=time.time)
    metrics: dict[str, Any] = Field(default_factory=dict)

    @field_validator("model_class")
    @classmethod
    def _module_colon_attr(cls, v: str) -> str:
        module, sep, attr = v.partition(":")
        if not sep or not module or not attr or ":" in attr:
            raise ValueError(
                f"model_class must be 'module:attr' (e.g. 'tidal.training.models:DigitsMLP'), got {v!r}"
            )
        return v

    @field_validator("input_shape")
    @classmethod
    def _positive_dims(cls, v: list[int]) -> list[int]:
        if not v or any(d <= 0 for d in v):
            raise ValueError(f"input_shape must be a non-empty list of positive ints (e.g. [64]), got {v!r}")
        return v

    @property
    def num_input_values(self) -> int:
        """Scalars in one instance: ``[3, 8, 8]`` -> 192."""
        n = 1
        for d in self.input_shape:
            n *= d
        return n


def check_model_class_allowed(spec: str, allowed_modules: Sequence[str]) -> None:
    """Refuse a ``module:attr`` whose module is not one of ``allowed_modules`` nor inside one of them.

    Example: allowed ``["tidal.training.models", "mypkg"]`` lets ``mypkg.nets.resnet:ResNet`` through and
    refuses ``os:system``, before anything is imported.

    Raises:
        CheckpointError: naming the class, the modules allowed and how to allow it.
    """
    module_name = spec.partition(":")[0]
    if any(module_name == m or module_name.startswith(m + ".") for m in allowed_modules):
        return
    raise CheckpointError(
        f"model_class {spec!r}: module {module_name!r} is not an allowed model module (allowed: "
        f"{list(allowed_modules)}); importing a module runs its code, so an operator must allow it: add "
        f"{module_name!r} to the application's args.allowed_model_modules if you trust it"
    )


def import_model_class(spec: str, allowed_modules: Sequence[str] = TIDAL_MODEL_MODULES) -> type:
    """Import ``module:attr`` from an allowed module and return the attribute.

    Raises:
        CheckpointError: the module is not allowed (checked before importing it), does not import, or has
            no such attribute; the message names the spec.
    """
    check_model_class_allowed(spec, allowed_modules)
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CheckpointError(f"model_class {spec!r}: cannot import module {module_name!r}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise CheckpointError(
            f"model_class {spec!r}: module {module_name!r} has no attribute {attr!r}"
        ) from e


def write_model_checkpoint(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    model_class: str,
    model_kwargs: dict[str, Any],
    version: str,
    input_shape: list[int] | tuple[int, ...],
    labels: list[str] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights and a manifest into directory ``path``, atomically.

    The files are written into a temporary sibling directory which is then renamed to ``path``; an
    existing ``path`` is replaced (the old one is moved aside first and removed after the rename).

    Args:
        model: the trained module (any device; weights are saved on CPU so any host can load them).
        path: the checkpoint directory to create.
        model_class: ``module:attr`` of the model's class, importable where the checkpoint is served.
        model_kwargs: constructor kwargs, JSON-able.
        version: a version string the serving API reports with every prediction.
        input_shape: shape of one instance, without the batch dimension, e.g. ``[64]``.
        labels: optional class names, one per output.
        metrics: optional JSON-able metrics (loss, accuracy, step, ...).

    Returns:
        The checkpoint directory as a ``Path``.

    Raises:
        CheckpointError: if the manifest fields are invalid (the message names the field).
    """
    import torch

    try:
        manifest = ModelManifest(
            model_class=model_class,
            model_kwargs=dict(model_kwargs),
            version=version,
            input_shape=list(input_shape),
            labels=labels,
            metrics=dict(metrics or {}),
        )
    except ValidationError as e:
        raise CheckpointError(f"invalid manifest for checkpoint {path}: {e}") from e

    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(state, tmp / WEIGHTS_FILE)
        (tmp / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote checkpoint %s (version %s)", final, version)
    return final


def load_manifest(path: str | os.PathLike) -> ModelManifest:
    """Read and validate ``path/manifest.json``.

    Raises:
        CheckpointError: the directory or manifest is missing, not JSON, or fails validation; the message
            names the path and the bad field.
    """
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint directory {str(ckpt)!r} does not exist or is not a directory")
    mpath = ckpt / MANIFEST_FILE
    if not mpath.is_file():
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r} has no {MANIFEST_FILE}; write it with "
            "tidal.serving.manifest.write_model_checkpoint"
        )
    try:
        raw = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath} is not valid JSON: {e}") from e
    try:
        return ModelManifest.model_validate(raw)
    except ValidationError as e:
        raise CheckpointError(f"{mpath} is not a valid manifest: {e}") from e


def load_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    allowed_modules: Sequence[str] = TIDAL_MODEL_MODULES,
) -> torch.nn.Module:
    """Build the manifest's model class, load the weights onto ``device`` and put it in eval mode.

    The class must come from ``allowed_modules`` (see :func:`check_model_class_allowed`); the weights
    load as tensors only (``weights_only=True``: a pickled object in ``model.pt`` is refused, not run).

    Returns:
        The model, in eval mode, on ``device`` (read the manifest with :func:`load_manifest`).

    Raises:
        CheckpointError: missing/invalid manifest, missing weights, a class from a module not allowed or
            that does not import, weights that are not plain tensors, or weights that do not fit the class
            built with ``model_kwargs``.
    """
    import pickle

    import torch

    manifest = load_manifest(path)
    wpath = Path(path) / WEIGHTS_FILE
    if not wpath.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no {WEIGHTS_FILE}")
    cls = import_model_class(manifest.model_class, allowed_modules)
    try:
        model = cls(**manifest.model_kwargs)
    except TypeError as e:
        raise CheckpointError(
            f"model_class {manifest.model_class!r} rejected model_kwargs {manifest.model_kwargs!r}: {e}"
        ) from e
    try:
        state = torch.load(wpath, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{wpath} holds more than tensors, and only a state_dict of tensors is loaded: {e}"
        ) from e
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(
            f"weights in {wpath} do not fit {manifest.model_class}({manifest.model_kwargs}): {e}"
        ) from e
    model.to(device)
    model.eval()
    return model
