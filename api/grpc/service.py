"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService``, a thin adapter over
the same pieces as the HTTP routes.

Every call gets a ``RequestContext`` of its own (its id is the usage record's), the same
credential check (the ``authorization`` metadata entry, ``Bearer <key or token>``, through the
process's ``KeyAuthenticator`` and ``api.http.deps.admit``: scopes, the key's rate limit and
concurrency slot), the same inference-and-billing pipeline (``api.inference.pipeline``), the
same tensors (``api.inference.tensors``), the same request deadline, the same count in
``/metrics`` and the same access line (``api.http.middleware.log_access``; ``route`` is the
gRPC method's path). ServerLive, ServerReady and ServerMetadata are public, as their REST
routes; ModelReady, ModelMetadata and ModelInfer take a tenant credential with ``predict``.

Errors are the gRPC status that mirrors the HTTP answer (``STATUS_CODES``), with the same
message as the problem JSON's ``detail``; a refusal that may be retried carries ``retry-after``
(seconds) in its trailing metadata, and every answer carries ``x-request-id``.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog
from slowapi.errors import RateLimitExceeded
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from api.grpc.protocol import open_inference_grpc_pb2 as pb
from api.http.context import RequestContext
from api.http.deps import admit
from api.http.disconnect import CLIENT_CLOSED_REQUEST
from api.http.middleware import log_access, log_unexpected
from api.inference.pipeline import run_and_bill, served_model
from api.inference.tensors import (
    LAYOUTS,
    PLATFORMS,
    output_tensors,
    requested_outputs,
    row_count,
    rows_from_bytes,
    rows_from_values,
    signature,
)
from api.observability import metrics
from api.observability.readiness import is_ready
from api.schemas.predict import HARD_MAX_INSTANCES
from api.services import AppState
from auth.errors import InvalidRequest, ModelgateError
from auth.identity.authn import AuthSubject, bearer_credential
from auth.limits.limiter import KeyRateLimitExceeded
from ml import InvalidFeatures, ModelNotFound, ModelUnavailable
from ml.manifest import NAME_PATTERN, VERSION_PATTERN

SERVICE = "inference.GRPCInferenceService"
# The gRPC status of each HTTP answer.
STATUS_CODES = {
    200: grpc.StatusCode.OK,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    CLIENT_CLOSED_REQUEST: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}
_NAME = re.compile(NAME_PATTERN)
_VERSION = re.compile(VERSION_PATTERN)
# The typed contents field that carries each input datatype's values.
_CONTENTS = {
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
}
PREDICT = frozenset({"predict"})
Reply = TypeVar("Reply")


class Refusal(Exception):
    """An answer other than OK: its HTTP status, message and retry delay."""

    def __init__(
        self,
        status: int,
        message: str,
        retry_after: int | None = None,
        problem_type: str = "unknown",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after
        # The problem type its HTTP answer would carry, for the count of refusals.
        self.problem_type = problem_type


def _refusal(exc: Exception) -> Refusal:
    """The answer to an exception, as the HTTP error handlers give it (``api.http.errors``)."""
    if isinstance(exc, Refusal):
        return exc
    if isinstance(exc, ModelgateError):
        return Refusal(exc.status_code, exc.detail, getattr(exc, "retry_after", None), exc.type)
    if isinstance(exc, ModelNotFound):
        return Refusal(404, str(exc))
    if isinstance(exc, InvalidFeatures):
        return Refusal(422, str(exc))
    if isinstance(exc, ModelUnavailable):
        return Refusal(503, str(exc) or "model unavailable", 5, "service-unavailable")
    if isinstance(exc, KeyRateLimitExceeded):
        return Refusal(
            429, f"rate limit exceeded: {exc.detail}", exc.status.retry_after, "rate-limited"
        )
    if isinstance(exc, RateLimitExceeded):
        return Refusal(429, f"rate limit exceeded: {exc.detail}", 1, "rate-limited")
    if isinstance(exc, TimeoutError):
        return Refusal(503, "the request took too long", 1, "service-unavailable")
    if isinstance(exc, DBAPIError | PoolTimeout | OSError):
        # The driver's message may quote SQL parameters: never passed on.
        return Refusal(503, "a dependency is unavailable", 2, "service-unavailable")
    if isinstance(exc, OverflowError):
        return Refusal(422, "a number is out of the range this field holds")
    log_unexpected(exc)
    return Refusal(500, "an unexpected error occurred")


def _address(peer: str) -> str | None:
    """The client's address from gRPC's peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or None
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]") or None
    return None


def _name(value: str, what: str, pattern: re.Pattern[str], longest: int) -> str:
    if not value or len(value) > longest or not pattern.fullmatch(value):
        raise Refusal(422, f"{what} is not a valid name")
    return value


class InferenceService:
    """The servicer of ``inference.GRPCInferenceService`` for one process's ``AppState``."""

    def __init__(self, state: AppState, name: str, version: str) -> None:
        self.state = state
        self.server_name = name
        self.server_version = version

    async def _call(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        work: Callable[[RequestContext], Awaitable[Reply]],
    ) -> Reply:
        """Run one call as an HTTP request is run: its context and id, its deadline, its
        concurrency slot given back, its status counted and its access line logged."""
        started = time.perf_counter()
        call = RequestContext(str(uuid.uuid4()))
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=call.request_id)
        route = f"/{SERVICE}/{method}"
        refusal: Refusal | None = None
        reply: Reply | None = None
        try:
            async with call.in_flight:
                async with asyncio.timeout(self.state.settings.request_timeout_seconds) as deadline:
                    call.deadline = deadline
                    reply = await work(call)
                if call.billable and not call.billed:
                    logger = structlog.get_logger("modelgate.request")
                    logger.error("billable response without a usage record; answered 503")
                    refusal = Refusal(503, "usage could not be recorded", 1, "service-unavailable")
        except asyncio.CancelledError:
            self._finish(route, CLIENT_CLOSED_REQUEST, started, call, None)
            raise
        except Exception as exc:
            refusal = _refusal(exc)
        status = 200 if refusal is None else refusal.status
        self._finish(route, status, started, call, refusal)
        metadata: list[tuple[str, str]] = [("x-request-id", call.request_id)]
        if call.rate_limit is not None:
            metadata += [
                (name.decode().lower(), value.decode()) for name, value in call.rate_limit.headers()
            ]
        if refusal is None:
            context.set_trailing_metadata(tuple(metadata))
            assert reply is not None  # noqa: S101 (set whenever there is no refusal)
            return reply
        if refusal.retry_after is not None and refusal.status in (429, 503):
            metadata.append(("retry-after", str(refusal.retry_after)))
        await context.abort(STATUS_CODES[refusal.status], refusal.message, tuple(metadata))
        raise AssertionError("abort returned")  # pragma: no cover (abort always raises)

    @staticmethod
    def _finish(
        route: str, status: int, started: float, call: RequestContext, refusal: Refusal | None
    ) -> None:
        metrics.record_request(route, "POST", status, time.perf_counter() - started)
        if refusal is not None and status in (401, 403, 413, 429, 503):
            metrics.record_rejection(status, refusal.problem_type)
        log_access(
            "POST",
            route,
            status,
            started,
            call.subject,
            grpc_status=STATUS_CODES.get(status, grpc.StatusCode.UNKNOWN).name,
        )

    async def _admit(
        self, call: RequestContext, context: grpc.aio.ServicerContext, *, billable: bool
    ) -> AuthSubject:
        """The credential of the call's ``authorization`` metadata, checked as an HTTP
        request's is (``api.http.deps.Authenticator``)."""
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                authorization = value if isinstance(value, str) else None
                break
        credential = bearer_credential(authorization)
        subject = await self.state.authenticator.authenticate(
            credential, lambda: _address(context.peer())
        )
        call.subject = subject
        await admit(self.state, call, subject, PREDICT, tenant_only=True, billable=billable)
        return subject

    # The protocol's methods (their names are the .proto's).

    async def ServerLive(
        self, _request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        """Whether the server is live (public)."""

        async def work(_call: RequestContext) -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        return await self._call("ServerLive", context, work)

    async def ServerReady(
        self, _request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        """Whether the server is ready: the checks of /api/v1/health/ready (public)."""

        async def work(_call: RequestContext) -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=await is_ready(self.state))

        return await self._call("ServerReady", context, work)

    async def ServerMetadata(
        self, _request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        """The server's name and version (public); no extension is served over gRPC."""

        async def work(_call: RequestContext) -> pb.ServerMetadataResponse:
            return pb.ServerMetadataResponse(
                name=self.server_name, version=self.server_version, extensions=[]
            )

        return await self._call("ServerMetadata", context, work)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        """Whether a model (version) can serve; not billed."""

        async def work(call: RequestContext) -> pb.ModelReadyResponse:
            subject = await self._admit(call, context, billable=False)
            name = _name(request.name, "name", _NAME, 100)
            version = _name(request.version, "version", _VERSION, 50) if request.version else None
            try:
                served_model(self.state, subject, name, version)
            except ModelUnavailable:
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)

        return await self._call("ModelReady", context, work)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        """A model version's platform, inputs and outputs; not billed."""

        async def work(call: RequestContext) -> pb.ModelMetadataResponse:
            subject = await self._admit(call, context, billable=False)
            name = _name(request.name, "name", _NAME, 100)
            version = _name(request.version, "version", _VERSION, 50) if request.version else None
            model = served_model(self.state, subject, name, version)
            inputs, outputs = signature(model)
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=model.manifest.name,
                versions=[s.version for s in self.state.registry.model_info(model.name).versions],
                platform=PLATFORMS[model.runtime],
                inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in inputs],
                outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in outputs],
            )

        return await self._call("ModelMetadata", context, work)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        """Infer with a model version: one unit per row, billed as /predict/batch."""

        async def work(call: RequestContext) -> pb.ModelInferResponse:
            subject = await self._admit(call, context, billable=True)
            return await self._infer(call, context, subject, request)

        return await self._call("ModelInfer", context, work)

    async def _infer(
        self,
        call: RequestContext,
        context: grpc.aio.ServicerContext,
        subject: AuthSubject,
        request: pb.ModelInferRequest,
    ) -> pb.ModelInferResponse:
        state = self.state
        name = _name(request.model_name, "model_name", _NAME, 100)
        version = (
            _name(request.model_version, "model_version", _VERSION, 50)
            if request.model_version
            else None
        )
        if len(request.id) > 256:
            raise InvalidRequest("id is longer than 256 characters")
        model = served_model(state, subject, name, version)
        n_features = model.manifest.n_features
        rows = _rows(request, n_features, min(state.settings.max_batch_size, HARD_MAX_INSTANCES))
        names = [output.name for output in request.outputs] if request.outputs else None
        outputs = requested_outputs(names, ("outputs",))

        def locate(_exc: InvalidFeatures) -> tuple[str | int, ...]:
            return ("inputs", 0)

        predictions, _, _ = await run_and_bill(
            call, context.cancelled, state, subject, model, rows, locate
        )
        tensors = output_tensors(outputs, predictions, len(model.manifest.class_names))
        answer = pb.ModelInferResponse(
            model_name=model.manifest.name,
            model_version=model.manifest.version,
            id=request.id or call.request_id,
        )
        for tensor in tensors:
            answer.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
            answer.raw_output_contents.append(tensor.raw())
        return answer


def _rows(request: pb.ModelInferRequest, n_features: int, max_rows: int) -> list[list[float]]:
    """The rows of the request's one input tensor, from its raw contents or its typed ones,
    each checked as over REST (``api.inference.tensors``)."""
    if len(request.inputs) != 1:
        raise InvalidRequest("an inference request has exactly one input tensor")
    tensor = request.inputs[0]
    datatype = tensor.datatype
    if datatype not in LAYOUTS:
        raise InvalidRequest(
            f"the input's datatype must be one of {', '.join(sorted(LAYOUTS))}",
            loc=("inputs", 0, "datatype"),
        )
    loc: tuple[str | int, ...] = ("inputs", 0)
    rows = row_count(list(tensor.shape), n_features, max_rows, loc)
    raw = request.raw_input_contents
    if raw:
        if len(raw) != 1:
            raise InvalidRequest("raw_input_contents must hold one entry per input")
        if tensor.HasField("contents"):
            raise InvalidRequest("an input's data is in raw_input_contents or contents, not both")
        return rows_from_bytes(raw[0], datatype, rows, n_features, loc)
    field: Any = getattr(tensor.contents, _CONTENTS[datatype])
    # Counted before it is copied: the message's size is bounded, not its count for this shape.
    if len(field) != rows * n_features:
        raise InvalidRequest(
            f"the input's contents hold {len(field)} values; its shape says {rows * n_features}",
            loc=loc,
        )
    return rows_from_values(list(field), datatype, rows, n_features, loc)
