"""Loading a checkpoint for inference and running a batch: torch only, no Ray.

The Serve deployment (:mod:`tidal.serving.app`) holds one :class:`LoadedModel` at a time and swaps it whole on
a rollout, so a batch always runs against one consistent (model, manifest, precision) triple.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tidal.serving.config import TIDAL_MODEL_MODULES, ModelOptions
from tidal.serving.manifest import ModelManifest, load_manifest, load_model
from tidal.serving.schemas import InputError

logger = logging.getLogger(__name__)


def pick_device() -> torch.device:
    """CUDA when this process sees a GPU, else CPU (logical Ray GPUs on a CPU host land here)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to serve, with what it was loaded from."""

    model: torch.nn.Module
    manifest: ModelManifest
    options: ModelOptions
    device: torch.device
    input_dtype: torch.dtype
    loaded_s: float

    @property
    def version(self) -> str:
        return self.manifest.version


def load_for_inference(
    options: ModelOptions,
    device: torch.device | None = None,
    *,
    allowed_modules: Sequence[str] = TIDAL_MODEL_MODULES,
) -> LoadedModel:
    """Load ``options.checkpoint`` on ``device`` in eval mode, at ``options.precision``.

    The manifest's model class must come from ``allowed_modules``
    (:func:`tidal.serving.manifest.check_model_class_allowed`).

    - ``fp32``: as trained.
    - ``bf16``: weights and inputs in bfloat16 (outputs are returned as float32).
    - ``int8``: dynamic quantization of ``nn.Linear`` layers (weights int8, activations quantized on the
      fly). PyTorch runs it on CPU only, so it is refused on a CUDA device rather than silently ignored.

    Raises:
        tidal.serving.manifest.CheckpointError: missing or invalid checkpoint, or a model class from a module
            not allowed.
        ValueError: int8 asked for on CUDA.
    """
    device = device or pick_device()
    manifest = load_manifest(options.checkpoint)
    if options.precision == "int8" and device.type == "cuda":
        raise ValueError(
            "precision 'int8' (dynamic quantization) runs on CPU only, but this replica has CUDA; "
            "use precision 'bf16' or 'fp32' for GPU replicas"
        )
    model = load_model(
        options.checkpoint, "cpu" if options.precision == "int8" else device, allowed_modules=allowed_modules
    )
    input_dtype = torch.float32
    if options.precision == "bf16":
        model = model.to(torch.bfloat16)
        input_dtype = torch.bfloat16
    elif options.precision == "int8":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    model.eval()
    logger.info(
        "loaded %s version %s from %s on %s at %s",
        manifest.model_class,
        manifest.version,
        options.checkpoint,
        device,
        options.precision,
    )
    return LoadedModel(model, manifest, options, device, input_dtype, time.time())


def run_batch(loaded: LoadedModel, flat_inputs: list[list[float]]) -> list[torch.Tensor]:
    """Run several requests' instances as one batch; return one float32 CPU tensor per request.

    Args:
        loaded: the model to run.
        flat_inputs: per request, its instances' numbers flat (``n * prod(input_shape)`` of them).
    """
    shape = loaded.manifest.input_shape
    per_instance = loaded.manifest.num_input_values
    counts = [len(f) // per_instance for f in flat_inputs]
    flat = [x for f in flat_inputs for x in f]
    x = torch.tensor(flat, dtype=torch.float32).view(sum(counts), *shape)
    with torch.inference_mode():
        y = loaded.model(x.to(loaded.device, loaded.input_dtype))
    y = y.float().cpu()
    return list(torch.split(y, counts))


def to_response(loaded: LoadedModel, outputs: torch.Tensor) -> dict[str, Any]:
    """One request's outputs as the JSON body of :class:`tidal.serving.schemas.PredictResponse`.

    Raises:
        InputError: the outputs of an instance are not finite (JSON has no inf or NaN, and a null in their
            place would pass for an answer): 422 naming the first such instance.
    """
    finite = torch.isfinite(outputs.reshape(outputs.shape[0], -1)).all(dim=1)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        raise InputError(
            f"instances[{i}]",
            "the model's outputs for this instance are not finite (inf or NaN), so there is no answer to "
            "return; send values in the range the model was trained on",
        )
    rows = outputs.tolist()
    if outputs.dim() == 2:
        idx = outputs.argmax(dim=1).tolist()
        labels = loaded.manifest.labels
        predictions: list[Any] = [labels[i] if labels and i < len(labels) else i for i in idx]
    else:
        predictions = rows
    return {"model_version": loaded.version, "predictions": predictions, "outputs": rows}
