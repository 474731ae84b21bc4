"""The Serve application: a torch model from a checkpoint behind a FastAPI ingress (the Ray glue).

Deploy it the way Ray users do, with a Serve config file naming this builder::

    applications:
      - name: digits
        route_prefix: /
        import_path: tidal.serving.app:build_app
        args: {service: {...}, model: {checkpoint: /path/to/ckpt}, autoscaling: {...}}

(see ``serving/config.yaml``), with ``serve deploy``/``serve run``, or ``tidal serve deploy``.

HTTP API:

- ``POST /v1/predict`` ``{"instances": [[...64 numbers...], ...]}`` ->
  ``{"model_version": "v3", "predictions": [7, ...], "outputs": [[logits...], ...]}``.
- ``GET /v1/models``: what each replica that answers has loaded (version, class, shape, precision, device).
- ``GET /openapi.json``, ``GET /docs``: the OpenAPI schema (the request body for the served model's input
  shape, every error response, the API key) and its Swagger UI page.
- ``GET /healthz``: liveness (the only route that never needs the API key).

Bad input gets a 4xx naming the problem: malformed JSON 400, missing/wrong API key 401, body or instance
count too large 413, wrong shape/type/value 422 (and 422 when the model's outputs for an instance are not
finite: JSON cannot carry them). Nothing a client sends can take a replica down: every handler turns
unexpected errors into a 500 and the replica carries on.

The API key is resolved once, where the application is built (``args.api_key`` or ``args.api_key_env`` in
the application's environment, :func:`tidal.serving.config.resolve_api_key`), and every replica gets it from
there: a replica never reads it from its node. The manifest's model class must come from a module the
application allows (``args.allowed_model_modules``, plus Tidal's own), checked before the module is imported.

Each replica runs where Ray placed it (on a granted GPU type, see ``tidal.serving.config.ray_actor_options_for``),
loads the model on CUDA when it sees one, batches requests with ``@serve.batch``, and reports its node's GPU
type to the autoscaling policy as a custom metric. A new checkpoint arrives as a new ``user_config``
(``tidal serve promote``): :meth:`ModelServer.reconfigure` loads it beside the old one and swaps it in
whole, so requests keep flowing during a rollout and each batch runs on one version.
"""

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from tidal.cluster.model import GPU_TYPE_LABEL
from tidal.serving.autoscale_math import LatencyWindow
from tidal.serving.config import (
    GPU_TYPE_METRIC_PREFIX,
    P99_METRIC,
    UNKNOWN_GPU_TYPE,
    ModelOptions,
    ServeAppArgs,
    allowed_model_modules,
    autoscaling_config_for,
    ray_actor_options_for,
    resolve_api_key,
)
from tidal.serving.inference import LoadedModel, load_for_inference, pick_device, run_batch, to_response
from tidal.serving.manifest import check_model_class_allowed, load_manifest
from tidal.serving.schemas import (
    HealthResponse,
    InputError,
    ModelInfo,
    ModelsResponse,
    PredictResponse,
    document_openapi,
    error_responses,
    flatten_instances,
    parse_predict_body,
    parse_predict_json,
    predict_request_model,
)

logger = logging.getLogger("ray.serve.tidal")

HEALTH_PATH = "/healthz"
# The schema and the docs page are routes of the replica (below), behind the API key like every route but
# health, and describe the model being served (its input shape, the application's limits).
api = FastAPI(
    title="Tidal model server",
    version="1",
    description="Predictions from a torch model checkpoint. Every error answers with "
    '{"error": {"field": ..., "message": ...}}.',
    openapi_url=None,
    docs_url=None,
    redoc_url=None,
)

_DOCS_HTML = """<!DOCTYPE html>
<html><head><title>{title}</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({{spec: {spec}, dom_id: "#swagger-ui"}});</script>
</body></html>
"""


@api.exception_handler(InputError)
async def _input_error(_: Request, e: InputError) -> JSONResponse:
    return JSONResponse(e.to_json(), status_code=e.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(
        {"error": {"field": None, "message": str(e.detail)}}, status_code=e.status_code, headers=e.headers
    )


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": {"field": None, "message": str(e.errors())}}, status_code=422)


@api.exception_handler(Exception)
async def _unexpected(_: Request, e: Exception) -> JSONResponse:
    logger.exception("unexpected error while serving a request")
    return JSONResponse(
        {"error": {"field": None, "message": f"internal error: {type(e).__name__}"}}, status_code=500
    )


def _node_gpu_type() -> str | None:
    """The ``ray.io/accelerator-type`` label of this replica's node (None on an unlabelled node)."""
    labels = ray.get_runtime_context().get_node_labels() or {}
    value = labels.get(GPU_TYPE_LABEL)
    if isinstance(value, list):  # some Ray versions give label values as lists
        value = value[0] if value else None
    return value or None


@serve.deployment(name="TidalModel")
@serve.ingress(api)
class ModelServer:
    """One replica: a loaded model, the HTTP routes, batching, and the GPU-type metric."""

    def __init__(
        self,
        *,
        service_name: str,
        max_instances_per_request: int,
        max_body_bytes: int,
        max_abs_input: float,
        allowed_model_modules: Sequence[str],
        api_key: str | None = None,
        num_cpus: float = 1.0,
        max_concurrent_batches: int = 1,
    ) -> None:
        # One intra-op thread per CPU Ray gave the replica: replicas sharing a node must not
        # oversubscribe its cores (on a GPU the forward runs on the device anyway).
        torch.set_num_threads(max(1, round(num_cpus)))
        self._service_name = service_name
        self._max_instances = max_instances_per_request
        self._max_body_bytes = max_body_bytes
        self._max_abs_input = max_abs_input
        self._allowed_model_modules = tuple(allowed_model_modules)
        self._api_key = api_key
        self._openapi: tuple[tuple[str, str], dict[str, Any]] | None = None
        self._device = pick_device()
        self._gpu_type = _node_gpu_type()
        self._loaded: LoadedModel | None = None
        self._latency = LatencyWindow()  # answered predictions, for the p99 it reports (tidal status)
        self._swap_lock = asyncio.Lock()
        # Built per replica: Serve's max_concurrent_batches is fixed when the batch queue is made.
        self._infer = serve.batch(
            max_batch_size=32, batch_wait_timeout_s=0.002, max_concurrent_batches=max_concurrent_batches
        )(self._infer_batch)
        logger.info(
            "replica of %r on %s (GPU type %s), API key %s",
            service_name,
            self._device,
            self._gpu_type,
            "required" if self._api_key else "off",
        )

    # --------------------------------------------------------------------------- Serve hooks

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the checkpoint in ``user_config`` and swap it in (Serve calls this on start and promote).

        Loading runs in a thread, so the replica keeps answering with the old model meanwhile; the swap
        is one assignment. A checkpoint that fails to load raises, and Serve reports the update as
        failed; the old model stays in place on a running replica.
        """
        options = ModelOptions.model_validate(user_config)
        async with self._swap_lock:
            loaded = await asyncio.to_thread(
                load_for_inference, options, self._device, allowed_modules=self._allowed_model_modules
            )
            self._infer.set_max_batch_size(options.max_batch_size)
            self._infer.set_batch_wait_timeout_s(options.batch_wait_timeout_s)
            previous = self._loaded
            self._loaded = loaded
        logger.info(
            "serving version %s (was %s)", loaded.version, previous.version if previous else "nothing"
        )

    def check_health(self) -> None:
        if self._loaded is None:
            raise RuntimeError("no model loaded")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metrics read by the Tidal policy: which GPU type this replica runs on (its fast
        path; any other replica's type is learned from its node), and its p99 latency when it has answered
        recently (shown by ``tidal status``)."""
        stats = {f"{GPU_TYPE_METRIC_PREFIX}{self._gpu_type or UNKNOWN_GPU_TYPE}": 1.0}
        p99 = self._latency.p99_ms(time.monotonic())
        if p99 is not None:
            stats[P99_METRIC] = p99
        return stats

    # ------------------------------------------------------------------------------- routes

    @api.get(HEALTH_PATH, response_model=HealthResponse, responses=error_responses(500))
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok" if self._loaded else "loading", "model_version": self._version()}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse(self._openapi_spec(request))

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        self._authorize(request)
        # The schema is inlined: a browser would fetch a URL without the key.
        spec = json.dumps(self._openapi_spec(request)).replace("</", "<\\/")
        return HTMLResponse(_DOCS_HTML.format(title=api.title, spec=spec))

    @api.get("/v1/models", response_model=ModelsResponse, responses=error_responses(401, 500, 503))
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        loaded = self._require_model()
        m = loaded.manifest
        info = ModelInfo(
            name=self._service_name,
            version=m.version,
            model_class=m.model_class,
            input_shape=m.input_shape,
            input_dtype=m.input_dtype,
            labels=m.labels,
            precision=loaded.options.precision,
            device=str(loaded.device),
            gpu_type=self._gpu_type,
            checkpoint=loaded.options.checkpoint,
            loaded_s=loaded.loaded_s,
        )
        return {"models": [info.model_dump()]}

    @api.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=error_responses(400, 401, 413, 422, 500, 503),
        summary="Predict",
        description="The body is documented per served model (its input shape) in this schema's "
        "PredictRequest; the server reads it itself, refusing a body over the size limit before parsing it.",
    )
    async def predict(self, request: Request) -> dict[str, Any]:
        t0 = time.monotonic()
        self._authorize(request)
        body = await self._read_body(request)
        instances = parse_predict_body(parse_predict_json(body), self._max_instances)
        loaded = self._require_model()
        flat = flatten_instances(instances, loaded.manifest.input_shape, self._max_abs_input)
        used, outputs = await self._infer((loaded, flat))
        response = to_response(used, outputs)
        now = time.monotonic()
        self._latency.add(now, (now - t0) * 1e3)
        return response

    # ----------------------------------------------------------------------------- batching

    async def _infer_batch(
        self, items: list[tuple[LoadedModel, list[float]]]
    ) -> list[tuple[LoadedModel, torch.Tensor]]:
        """Run a batch of requests. Requests validated against different versions (mid-rollout) run
        in separate groups, each on the model it was validated for."""
        groups: dict[int, list[int]] = {}
        for i, (loaded, _) in enumerate(items):
            groups.setdefault(id(loaded), []).append(i)
        results: list[Any] = [None] * len(items)
        for idxs in groups.values():
            loaded = items[idxs[0]][0]
            # The forward runs off the event loop: health checks and new requests keep being served.
            outs = await asyncio.to_thread(run_batch, loaded, [items[i][1] for i in idxs])
            for i, out in zip(idxs, outs, strict=True):
                results[i] = (loaded, out)
        return results

    # ------------------------------------------------------------------------------ helpers

    def _version(self) -> str | None:
        return self._loaded.version if self._loaded else None

    def _require_model(self) -> LoadedModel:
        if self._loaded is None:
            raise StarletteHTTPException(503, "model is loading; retry shortly")
        return self._loaded

    def _openapi_spec(self, request: Request) -> dict[str, Any]:
        """The OpenAPI document for the model being served, under the route prefix the request came in on."""
        loaded = self._require_model()
        root_path = request.scope.get("root_path", "")
        key = (loaded.version, root_path)
        if self._openapi is None or self._openapi[0] != key:
            spec = get_openapi(
                title=api.title,
                version=api.version,
                description=api.description,
                routes=request.app.routes,
                servers=[{"url": root_path}] if root_path else None,
            )
            body = predict_request_model(
                loaded.manifest.input_shape,
                max_instances=self._max_instances,
                max_abs_input=self._max_abs_input,
            )
            self._openapi = (
                key,
                document_openapi(
                    spec, body, api_key_required=bool(self._api_key), public_paths=[HEALTH_PATH]
                ),
            )
        return self._openapi[1]

    def _authorize(self, request: Request) -> None:
        """Either form of the key will do: ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``."""
        if not self._api_key:
            return
        expected = self._api_key.encode()
        auth = request.headers.get("authorization", "")
        given = [
            request.headers.get("x-api-key"),
            auth[7:].strip() if auth.lower().startswith("bearer ") else None,
        ]
        if not any(g is not None and hmac.compare_digest(g.encode(), expected) for g in given):
            raise StarletteHTTPException(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it passes ``max_body_bytes`` (never buffered beyond)."""
        limit = self._max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise InputError("body", f"is {declared} bytes, more than the limit of {limit}", status=413)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise InputError("body", f"is more than the limit of {limit} bytes", status=413)
            chunks.append(chunk)
        return b"".join(chunks)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application builder that Serve config files name (``import_path: tidal.serving.app:build_app``).

    Validates ``args`` (:class:`tidal.serving.config.ServeAppArgs`), the initial checkpoint's manifest and
    its model class against the allowed modules, and resolves the API key, so a bad config fails ``serve
    deploy`` with a message naming the field instead of failing replicas.

    Raises:
        pydantic.ValidationError: a bad field of ``args``.
        tidal.serving.manifest.CheckpointError: a missing or invalid checkpoint, or a model class from a
            module the application does not allow.
        ValueError: the API key found in ``api_key_env`` is too short.
    """
    parsed = ServeAppArgs.model_validate(args)
    manifest = load_manifest(parsed.model.checkpoint)
    allowed = allowed_model_modules(parsed)
    check_model_class_allowed(manifest.model_class, allowed)
    # Once, here: every replica gets the key this build found, never its own node's environment.
    api_key = resolve_api_key(parsed, os.environ)
    if api_key is None:
        logger.warning(
            "application %r serves without an API key: set args.api_key_env's variable ($%s) in its "
            "runtime_env env_vars, or args.api_key, to require one",
            parsed.service.name,
            parsed.api_key_env,
        )
    return ModelServer.options(
        name=parsed.deployment_name,
        ray_actor_options=ray_actor_options_for(parsed),
        autoscaling_config=autoscaling_config_for(parsed),
        user_config=parsed.model.model_dump(),
        max_ongoing_requests=parsed.max_ongoing_requests,
        max_queued_requests=parsed.max_queued_requests,
        graceful_shutdown_timeout_s=parsed.graceful_shutdown_timeout_s,
    ).bind(
        service_name=parsed.service.name,
        max_instances_per_request=parsed.max_instances_per_request,
        max_body_bytes=parsed.max_body_bytes,
        max_abs_input=parsed.max_abs_input,
        allowed_model_modules=list(allowed),
        api_key=api_key,
        num_cpus=parsed.num_cpus_per_replica,
        max_concurrent_batches=parsed.max_concurrent_batches,
    )
