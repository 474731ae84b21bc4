"""The HTTP API's request and response bodies, and the checks on instances (pure: no Ray, no torch).

``POST /v1/predict`` takes ``{"instances": [...]}``: a list of instances, each a nested list of numbers
whose shape is the model's ``input_shape`` (from the checkpoint manifest). :func:`flatten_instances`
checks shape, type and finiteness in one pass and returns the numbers flat, ready for one
``torch.tensor(...).view(n, *shape)``. Every error names where it is (``instances[3][17]``), what was
found and what was expected, so a client can fix its request without reading the server's code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel


class InputError(ValueError):
    """A request the server will not run. ``status`` is the HTTP status to answer with."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status

    def to_json(self) -> dict[str, Any]:
        return {"error": {"field": self.field, "message": self.message}}


class PredictResponse(BaseModel):
    """Answer to a prediction: one entry per instance, in order.

    ``outputs`` are the model's raw outputs (e.g. logits); ``predictions`` is the arg-max class (its label
    when the checkpoint has labels) for a model whose output per instance is a vector, else the outputs.
    """

    model_version: str
    predictions: list[Any]
    outputs: list[Any]


class ModelInfo(BaseModel):
    name: str
    version: str
    model_class: str
    input_shape: list[int]
    input_dtype: str
    labels: list[str] | None
    precision: str
    device: str
    gpu_type: str | None
    checkpoint: str
    loaded_s: float


def parse_predict_body(raw: Any, max_instances: int) -> list[Any]:
    """Validate the parsed JSON body's envelope; return the instances list.

    Raises:
        InputError: not an object, unknown keys, no ``instances``, not a list, empty, or too many.
    """
    if not isinstance(raw, dict):
        raise InputError("body", f'expected a JSON object {{"instances": [...]}}, got {_kind(raw)}')
    extra = sorted(set(raw) - {"instances"})
    if extra:
        raise InputError(extra[0], f'unknown field; the body takes only "instances", got keys {sorted(raw)}')
    if "instances" not in raw:
        raise InputError("instances", 'missing; send {"instances": [instance, ...]}')
    instances = raw["instances"]
    if not isinstance(instances, list):
        raise InputError("instances", f"expected a list of instances, got {_kind(instances)}")
    if not instances:
        raise InputError("instances", "is empty; send at least one instance")
    if len(instances) > max_instances:
        raise InputError(
            "instances",
            f"has {len(instances)} instances, more than the limit of {max_instances} per request; "
            "split the request",
            status=413,
        )
    return instances


def flatten_instances(instances: Sequence[Any], input_shape: Sequence[int]) -> list[float]:
    """Check every instance against ``input_shape`` and return all numbers, flat, instance by instance.

    Numbers are ints or floats (not booleans, not strings) and finite (JSON ``NaN``/``Infinity``, which
    Python's parser accepts, are refused).

    Example: ``flatten_instances([[1, 2], [3, 4]], [2])`` -> ``[1.0, 2.0, 3.0, 4.0]``;
    ``flatten_instances([[1, 2, 3]], [2])`` raises ``InputError("instances[0]", "expected 2 values ...")``.
    """
    out: list[float] = []
    for i, inst in enumerate(instances):
        _flatten_into(inst, input_shape, f"instances[{i}]", out)
    return out


def _flatten_into(value: Any, shape: Sequence[int], where: str, out: list[float]) -> None:
    if not isinstance(value, list):
        raise InputError(
            where, f"expected a list of {shape[0]} values (instance shape {list(shape)}), got {_kind(value)}"
        )
    if len(value) != shape[0]:
        raise InputError(
            where,
            f"expected {shape[0]} values (instance shape {list(shape)}), got {len(value)}",
        )
    if len(shape) > 1:
        for j, sub in enumerate(value):
            _flatten_into(sub, shape[1:], f"{where}[{j}]", out)
        return
    for j, x in enumerate(value):
        # bool is an int subclass: refuse it explicitly, true/false are not pixel values.
        if type(x) is float:
            if not math.isfinite(x):
                raise InputError(f"{where}[{j}]", f"expected a finite number, got {x}")
            out.append(x)
        elif type(x) is int:
            out.append(float(x))
        else:
            raise InputError(f"{where}[{j}]", f"expected a number, got {_kind(x)}")


def _kind(x: Any) -> str:
    """A short, safe description of a JSON value for an error message (never echoes a huge value)."""
    if x is None:
        return "null"
    if isinstance(x, bool):
        return f"boolean {str(x).lower()}"
    if isinstance(x, int | float):
        return f"number {x!r}"
    if isinstance(x, str):
        shown = x if len(x) <= 20 else x[:17] + "..."
        return f"string {shown!r}"
    if isinstance(x, list):
        return f"a list of {len(x)}"
    if isinstance(x, dict):
        return "an object"
    return type(x).__name__
