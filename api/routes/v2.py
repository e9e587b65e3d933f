"""The Open Inference Protocol (V2) over REST, at ``/v2``: health, model metadata, model
readiness and inference, for the clients of KServe, MLServer and Triton.

The same service as ``/api/v1``: health is public (as ``/api/v1/health/*``); every model route
takes a tenant credential with the ``predict`` scope and counts against the key's rate limit;
inference is metered like ``/predict/batch`` (one unit per row, the quota refuses a request
whole, the usage record is durable before the response is sent): both are adapters over the one
pipeline, ``api.inference.pipeline``. Which models a caller may see is decided by its
``served_model``: a model outside the plan is answered as an unknown one.

Errors: the protocol's error object is ``{"error": "<message>"}``; ours are problem JSON. Every
error a ``/v2`` route answers is both: the problem JSON body (``application/problem+json``,
with ``type``, ``title``, ``status``, ``detail``, ``request_id``) also carries ``error``, equal
to ``detail`` (``V2Route``).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Coroutine, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Request, Response
from pydantic import BaseModel

from api.http.context import request_context
from api.http.deps import Authenticator, CredentialFirstRoute, PredictScope, app_state
from api.http.errors import PROBLEM_DESCRIPTIONS
from api.http.idempotency import KEY_PARAMETER
from api.http.problems import PROBLEM_MEDIA_TYPE, problem_response
from api.inference.pipeline import predict_and_bill, served_model
from api.inference.tensors import (
    PLATFORMS,
    output_tensors,
    requested_outputs,
    row_count,
    rows_from_bytes,
    rows_from_values,
    signature,
)
from api.observability.readiness import readiness
from api.schemas.predict import HARD_MAX_INSTANCES
from api.schemas.v2 import (
    InferResponse,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
    TensorMetadata,
    V2Problem,
)
from api.schemas.v2_binary import (
    BINARY_MEDIA_TYPE,
    HEADER_LENGTH,
    MAX_HEADER_LENGTH,
    InferBody,
    binary_outputs,
    encode_outputs,
    parse_infer_body,
    request_body_openapi,
)
from auth.errors import DependencyUnavailable
from auth.identity.authn import AuthSubject
from ml import InvalidFeatures, LoadedModel, ModelUnavailable, Prediction
from ml.manifest import NAME_PATTERN, VERSION_PATTERN

# Metadata and readiness: the same caller as inference, not billed.
PredictReader = Annotated[AuthSubject, Depends(Authenticator({"predict"}, tenant_only=True))]
ModelNamePath = Annotated[str, Path(min_length=1, max_length=100, pattern=NAME_PATTERN)]
ModelVersionPath = Annotated[str, Path(min_length=1, max_length=50, pattern=VERSION_PATTERN)]

# How long a client should wait before asking again about a model that cannot serve.
UNAVAILABLE_RETRY_SECONDS = 5


class V2Route(CredentialFirstRoute):
    """A ``/v2`` route: checks the credential before the body (``CredentialFirstRoute``), and
    gives every problem JSON it answers the protocol's ``error`` member (the ``detail``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer_with_error_member(request: Request) -> Response:
            try:
                response = await handler(request)
            except Exception as exc:
                # Answered here by the app's own handler for it (the same problem JSON as
                # anywhere else), so that the body can carry `error` too.
                on_error = _exception_handler(request, exc)
                if on_error is None:
                    raise
                response = on_error(request, exc)
                if inspect.isawaitable(response):
                    response = await response
            return with_error_member(response)

        return answer_with_error_member


def _exception_handler(request: Request, exc: Exception) -> Callable[..., Any] | None:
    handlers: dict[Any, Callable[..., Any]] = request.app.exception_handlers
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None


def with_error_member(response: Response) -> Response:
    """A problem JSON response that is also the protocol's error object: ``error`` is its
    ``detail``. Any other response is returned as it is."""
    return with_members(response)


def with_members(response: Response, **members: object) -> Response:
    """A problem JSON response with ``error`` (its ``detail``) and ``members`` added."""
    if response.media_type != PROBLEM_MEDIA_TYPE or not response.body:
        return response
    body = json.loads(bytes(response.body))
    body.update(members, error=body.get("detail", ""))
    response.body = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    response.headers["content-length"] = str(len(response.body))
    return response


def v2_problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a ``/v2`` route's problems (they carry ``error``)."""
    return {
        status: {"model": V2Problem, "description": PROBLEM_DESCRIPTIONS.get(status, "Error")}
        for status in statuses
    }


router = APIRouter(route_class=V2Route, tags=["open inference protocol (v2)"])


def _json(body: BaseModel) -> Response:
    return Response(body.model_dump_json(exclude_none=True), media_type="application/json")


@router.get("/v2", response_model=ServerMetadata, responses=v2_problems(500))
async def server_metadata(request: Request) -> ServerMetadata:
    """Name the server and its version (public, as GET /)."""
    app = request.app
    return ServerMetadata(name=app.title, version=app.version, extensions=["binary_tensor_data"])


@router.get("/v2/health/live", response_model=ServerLive, responses=v2_problems(500))
async def server_live() -> ServerLive:
    """Report that the server is live (public, as /api/v1/health/live)."""
    return ServerLive(live=True)


@router.get(
    "/v2/health/ready",
    response_model=ServerReady,
    responses={
        503: {
            "model": V2Problem,
            "description": "Not ready: `ready` is false, `checks` says which dependency is down",
        }
    },
)
async def server_ready(request: Request) -> Response:
    """Report whether the server is ready (public; the same checks as /api/v1/health/ready)."""
    answer = await readiness(app_state(request), request)
    if answer.status_code == 200:
        return _json(ServerReady(ready=True))
    return with_members(answer, ready=False)


def _metadata(model: LoadedModel, versions: Sequence[str]) -> ModelMetadata:
    inputs, outputs = signature(model)
    return ModelMetadata(
        name=model.manifest.name,
        versions=list(versions),
        platform=PLATFORMS[model.runtime],
        inputs=[TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in inputs],
        outputs=[TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in outputs],
    )


async def _describe(
    request: Request, subject: AuthSubject, name: str, version: str | None
) -> Response:
    state = app_state(request)
    model = served_model(state, subject, name, version)
    versions = [status.version for status in state.registry.model_info(model.name).versions]
    return _json(_metadata(model, versions))


MODEL_ERRORS = v2_problems(401, 403, 404, 429, 503)


@router.get("/v2/models/{model_name}", response_model=ModelMetadata, responses=MODEL_ERRORS)
async def model_metadata(
    model_name: ModelNamePath, subject: PredictReader, request: Request
) -> Response:
    """Describe a model's active version: platform, input and output tensors."""
    return await _describe(request, subject, model_name, None)


@router.get(
    "/v2/models/{model_name}/versions/{model_version}",
    response_model=ModelMetadata,
    responses=MODEL_ERRORS,
)
async def model_version_metadata(
    model_name: ModelNamePath,
    model_version: ModelVersionPath,
    subject: PredictReader,
    request: Request,
) -> Response:
    """Describe one version of a model: platform, input and output tensors."""
    return await _describe(request, subject, model_name, model_version)


async def _readiness(
    request: Request, subject: AuthSubject, name: str, version: str | None
) -> Response:
    state = app_state(request)
    try:
        model = served_model(state, subject, name, version)
    except ModelUnavailable as exc:
        # The model exists and is the caller's to use (else ModelNotFound): it may be named.
        return with_members(
            problem_response(
                request.scope,
                503,
                DependencyUnavailable.type,
                DependencyUnavailable.title,
                exc.message,
                {"Retry-After": str(UNAVAILABLE_RETRY_SECONDS)},
            ),
            name=name,
            ready=False,
        )
    return _json(ModelReady(name=model.name, ready=True))


READY_ERRORS = {
    **MODEL_ERRORS,
    503: {"model": V2Problem, "description": "Not ready: `ready` is false, `name` the model"},
}


@router.get("/v2/models/{model_name}/ready", response_model=ModelReady, responses=READY_ERRORS)
async def model_ready(
    model_name: ModelNamePath, subject: PredictReader, request: Request
) -> Response:
    """Report whether a model's active version can serve (200) or not (503)."""
    return await _readiness(request, subject, model_name, None)


@router.get(
    "/v2/models/{model_name}/versions/{model_version}/ready",
    response_model=ModelReady,
    responses=READY_ERRORS,
)
async def model_version_ready(
    model_name: ModelNamePath,
    model_version: ModelVersionPath,
    subject: PredictReader,
    request: Request,
) -> Response:
    """Report whether one version of a model can serve (200) or not (503)."""
    return await _readiness(request, subject, model_name, model_version)


def _rows(body: InferBody, n_features: int, max_rows: int) -> list[list[float]]:
    """The rows of the request's input tensor, from its JSON values or its binary data."""
    tensor, raw = body.request.inputs[0], body.binary[0]
    loc: tuple[str | int, ...] = ("body", "inputs", 0)
    rows = row_count(tensor.shape, n_features, max_rows, loc)
    if raw is not None:
        return rows_from_bytes(raw, tensor.datatype, rows, n_features, (*loc, "parameters"))
    assert tensor.data is not None  # noqa: S101 (parse_infer_body refuses an input without)
    return rows_from_values(tensor.data, tensor.datatype, rows, n_features, (*loc, "data"))


async def _infer(
    request: Request,
    subject: AuthSubject,
    header_length: int | None,
    name: str,
    version: str | None,
) -> Response:
    state = app_state(request)
    body = parse_infer_body(await request.body(), header_length)
    binary = binary_outputs(body.request)
    model = served_model(state, subject, name, version)
    manifest = model.manifest
    requested = body.request.outputs
    outputs = requested_outputs(
        None if requested is None else [output.name for output in requested],
        ("body", "outputs"),
    )
    max_rows = min(state.settings.max_batch_size, HARD_MAX_INSTANCES)
    n_features = manifest.n_features
    rows = _rows(body, n_features, max_rows)

    def locate(exc: InvalidFeatures) -> tuple[str | int, ...]:
        # The flat index of the refused value in the input tensor's row-major data.
        loc: tuple[str | int, ...] = ("body", "inputs", 0, "data")
        if exc.feature is not None:
            loc += ((exc.row or 0) * n_features + exc.feature,)
        return loc

    request_id = body.request.id

    def render(predictions: list[Prediction], _ms: float, _cached: bool) -> Response:
        content, json_length = encode_outputs(
            {
                "model_name": manifest.name,
                "model_version": manifest.version,
                "id": request_context(request.scope).request_id
                if request_id is None
                else request_id,
            },
            output_tensors(outputs, predictions, len(manifest.class_names)),
            binary,
        )
        if json_length is None:
            return Response(content, media_type="application/json")
        return Response(
            content, media_type=BINARY_MEDIA_TYPE, headers={HEADER_LENGTH: str(json_length)}
        )

    # One unit per row, as /predict/batch: the quota refuses the request whole.
    return await predict_and_bill(request, state, subject, model, rows, locate, render)


HeaderLength = Annotated[
    int | None,
    Header(
        alias=HEADER_LENGTH,
        ge=0,
        le=MAX_HEADER_LENGTH,
        description="The binary tensor data extension: the length of the JSON at the start of "
        "the body; the inputs' binary data follows it",
    ),
]
# 400, 409 and 422 also answer a bad, busy or reused Idempotency-Key (api.http.idempotency).
INFER_ERRORS = v2_problems(400, 401, 403, 404, 409, 413, 422, 429, 503)
INFER_ERRORS[200] = {
    "description": "The outputs: JSON, or (some asked for as binary data) the JSON, whose "
    f"length {HEADER_LENGTH} gives, then their binary data",
    "headers": {
        HEADER_LENGTH: {
            "description": "With binary outputs: the length of the JSON at the body's start",
            "schema": {"type": "integer"},
        }
    },
    "content": {BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
}
# The body as the protocol defines it, and the Idempotency-Key header (checked by the
# Authenticator: api.http.deps).
INFER_BODY = {**request_body_openapi(), "parameters": [KEY_PARAMETER]}


@router.post(
    "/v2/models/{model_name}/infer",
    response_model=InferResponse,
    responses=INFER_ERRORS,
    openapi_extra=INFER_BODY,
)
async def model_infer(
    model_name: ModelNamePath,
    subject: PredictScope,
    request: Request,
    header_length: HeaderLength = None,
) -> Response:
    """Infer with a model's active version (one unit per row of the input)."""
    return await _infer(request, subject, header_length, model_name, None)


@router.post(
    "/v2/models/{model_name}/versions/{model_version}/infer",
    response_model=InferResponse,
    responses=INFER_ERRORS,
    openapi_extra=INFER_BODY,
)
async def model_version_infer(
    model_name: ModelNamePath,
    model_version: ModelVersionPath,
    subject: PredictScope,
    request: Request,
    header_length: HeaderLength = None,
) -> Response:
    """Infer with one version of a model (one unit per row of the input)."""
    return await _infer(request, subject, header_length, model_name, model_version)
