"""The HTTP API's request and response bodies, and the checks on them (pure: no Ray, no torch).

``POST /v1/predict`` takes ``{"instances": [...]}``: a list of instances, each a nested list of numbers
whose shape is the model's ``input_shape`` (from the checkpoint manifest). The contract is a pydantic model,
built for the served model by :func:`predict_request_model` and published in the OpenAPI schema
(:func:`document_openapi`); the server checks a body with :func:`parse_predict_json`,
:func:`parse_predict_body` and :func:`flatten_instances`, which refuse exactly what the model refuses and
name where the problem is (``instances[3][17]``), what was found and what is valid, so a client can fix its
request without reading the server's code. :func:`flatten_instances` returns the numbers flat, ready for one
``torch.tensor(...).view(n, *shape)``.

Every number a client sends is accepted or refused with a 4xx: JSON ``NaN``/``Infinity`` (which Python's
parser accepts), numbers too large for a float (``1e400``, a 5,000-digit integer) and numbers outside the
application's ``max_abs_input`` are refused naming the field.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, create_model

# JSON integers longer than this are parsed as floats: a 5,000-digit integer then becomes inf (refused as not
# finite, naming its field) instead of hitting Python's limit on int conversion (a ValueError, not a 4xx).
_MAX_INT_DIGITS = 18
# Float32 is what the model takes: a larger input is inf on the device.
MAX_FLOAT32 = 3.4028234663852886e38


class InputError(ValueError):
    """A request the server will not run. ``status`` is the HTTP status to answer with."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status

    def to_json(self) -> dict[str, Any]:
        return {"error": {"field": self.field, "message": self.message}}


class ErrorDetail(BaseModel):
    field: str | None = Field(
        description="Where the problem is: 'body', 'instances', 'instances[3][17]', ...; null when it is "
        "not about one field (a missing API key, a model still loading)."
    )
    message: str = Field(description="What was found and what is valid.")


class ErrorResponse(BaseModel):
    """The body of every error answer (4xx and 5xx)."""

    error: ErrorDetail


ERROR_DESCRIPTIONS = {
    400: "The body is not JSON (or is nested too deeply to parse).",
    401: "Missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.",
    413: "The body or the number of instances is over the application's limit; split the request.",
    422: "The body is JSON but not a valid request (shape, type or range of a value, named in 'field'), "
    "or the model's outputs for an instance are not finite.",
    500: "An unexpected error on the server; the replica carries on.",
    503: "The model is loading (retry shortly), or the service is over capacity.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI's ``responses=`` for the given error statuses, each with :class:`ErrorResponse` as its body."""
    return {code: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


def predict_request_model(
    input_shape: Sequence[int] | None, *, max_instances: int, max_abs_input: float = MAX_FLOAT32
) -> type[BaseModel]:
    """The ``POST /v1/predict`` body as a pydantic model, for a model whose instances have ``input_shape``.

    The model documents what :func:`parse_predict_body` and :func:`flatten_instances` accept: one to
    ``max_instances`` instances, each nested lists of exactly the shape's lengths, of numbers (not
    booleans) within ``[-max_abs_input, max_abs_input]``. With ``input_shape`` None (no model known yet)
    an instance is any list.

    Example: shape ``[2]``, 4 instances, limit 10 -> ``{"instances": [[0.5, -3], [1, 2]]}`` is valid;
    ``[[0.5]]``, ``[[true, 1]]`` and ``[[11, 0]]`` are not.
    """
    instance: Any
    if input_shape is None:
        instance = list[Any]
    else:
        instance = Annotated[
            float, Field(strict=True, allow_inf_nan=False, ge=-max_abs_input, le=max_abs_input)
        ]
        for dim in reversed(list(input_shape)):
            instance = Annotated[list[instance], Field(min_length=dim, max_length=dim)]
    instances = Annotated[
        list[instance],
        Field(
            min_length=1,
            max_length=max_instances,
            description="The instances to predict, in order"
            + (f"; each of shape {list(input_shape)}" if input_shape is not None else "")
            + f". At most {max_instances} per request.",
        ),
    ]
    return create_model(
        "PredictRequest",
        __config__=ConfigDict(extra="forbid"),
        __doc__="A prediction request: the model's inputs, one instance per entry.",
        instances=(instances, ...),
    )


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


class ModelsResponse(BaseModel):
    """What each replica that answers has loaded."""

    models: list[ModelInfo]


class HealthResponse(BaseModel):
    status: str = Field(description="'ok' once a model is loaded, else 'loading'.")
    model_version: str | None


def parse_predict_json(body: bytes) -> Any:
    """The body parsed as JSON; a body that is not JSON is refused with 400.

    Integers of more than 18 digits are parsed as floats (a huge one is then ``inf`` and refused by
    :func:`flatten_instances` naming its field), never as Python ints of unbounded size.

    Raises:
        InputError: not UTF-8, not JSON, or nested too deeply to parse (400).
    """
    try:
        return json.loads(body, parse_int=_parse_int)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError("body", f"is not valid JSON: {e}", status=400) from None
    except RecursionError:
        raise InputError("body", "is nested too deeply to parse", status=400) from None


def _parse_int(digits: str) -> int | float:
    return int(digits) if len(digits) <= _MAX_INT_DIGITS else float(digits)


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


def flatten_instances(
    instances: Sequence[Any], input_shape: Sequence[int], max_abs_input: float = MAX_FLOAT32
) -> list[float]:
    """Check every instance against ``input_shape`` and return all numbers, flat, instance by instance.

    Numbers are ints or floats (not booleans, not strings), finite (JSON ``NaN``/``Infinity``, which
    Python's parser accepts, are refused) and within ``[-max_abs_input, max_abs_input]``.

    Example: ``flatten_instances([[1, 2], [3, 4]], [2])`` -> ``[1.0, 2.0, 3.0, 4.0]``;
    ``flatten_instances([[1, 2, 3]], [2])`` raises ``InputError("instances[0]", "expected 2 values ...")``.
    """
    out: list[float] = []
    for i, inst in enumerate(instances):
        _flatten_into(inst, input_shape, f"instances[{i}]", out, max_abs_input)
    return out


def _flatten_into(value: Any, shape: Sequence[int], where: str, out: list[float], max_abs: float) -> None:
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
            _flatten_into(sub, shape[1:], f"{where}[{j}]", out, max_abs)
        return
    for j, x in enumerate(value):
        # bool is an int subclass: refuse it explicitly, true/false are not pixel values.
        if type(x) is not float and type(x) is not int:
            raise InputError(f"{where}[{j}]", f"expected a number, got {_kind(x)}")
        if type(x) is float and not math.isfinite(x):
            raise InputError(
                f"{where}[{j}]",
                f"expected a finite number from {-max_abs:g} to {max_abs:g}, got {x} "
                "(NaN, Infinity and numbers too large for a float are not inputs)",
            )
        if not -max_abs <= x <= max_abs:
            raise InputError(
                f"{where}[{j}]", f"expected a number from {-max_abs:g} to {max_abs:g}, got {x:g}"
            )
        out.append(float(x))


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


def document_openapi(
    spec: dict[str, Any],
    request_model: type[BaseModel],
    *,
    api_key_required: bool,
    public_paths: Sequence[str],
) -> dict[str, Any]:
    """``spec`` (FastAPI's OpenAPI document) with the served model's request body and the API key.

    The ``POST /v1/predict`` body becomes ``request_model`` (from :func:`predict_request_model`, for the
    model being served); with ``api_key_required``, the key's two forms are declared as security schemes and
    required on every operation but those under ``public_paths``. Returns a new dict; ``spec`` is unchanged.
    """
    out = copy.deepcopy(spec)
    schemas = out.setdefault("components", {}).setdefault("schemas", {})
    body = request_model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(body.pop("$defs", {}))
    schemas[request_model.__name__] = body
    predict = out["paths"]["/v1/predict"]["post"]
    predict["requestBody"] = {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{request_model.__name__}"}}
        },
    }
    if api_key_required:
        out["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
        for path, operations in out["paths"].items():
            if path in public_paths:
                continue
            for operation in operations.values():
                operation["security"] = [{"bearer": []}, {"apiKey": []}]
    return out
