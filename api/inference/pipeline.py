"""The one inference-and-billing pipeline: every prediction front end (``POST /api/v1/predict``,
``/predict/batch``, the V2 infer routes over REST and V2's ModelInfer over gRPC) is a thin
adapter that parses its own body, then calls :func:`served_model` and :func:`predict_and_bill`
(:func:`run_and_bill` for gRPC) here, and shapes its own response.

One request, in order: the model version the caller's plan may use (:func:`served_model`), the
rows validated against it, the prediction cache (``api.inference.cache``; ``/predict`` only),
inference (micro-batched with the requests that arrived together, ``ml.batching``), then the
bill (``api.inference.metering.charge``): the response is sent only once the usage record is
committed. A request sent with an ``Idempotency-Key`` (``api.http.idempotency``) has its answer
rendered before the bill, and handed to the usage writer with its usage event: it is stored in
the transaction that bills it, and a key the writer finds answered already is answered from the
store, unbilled.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response

from api.http.context import RequestContext, request_context
from api.http.disconnect import client_has_gone
from api.http.idempotency import checked, replay_response, stored_answer, stored_form
from api.inference.metering import charge_call
from api.observability import metrics
from api.services import AppState
from auth.errors import IdempotencyKeyInUse, InvalidRequest
from auth.idempotency import AlreadyAnswered, StoredResponse
from auth.identity.authn import AuthSubject
from ml import InvalidFeatures, LoadedModel, ModelNotFound, Prediction


def served_model(
    state: AppState, subject: AuthSubject, name: str, version: str | None
) -> LoadedModel:
    """The model version to serve this caller. A model its plan does not open is answered
    exactly as a model that does not exist (404, the same words, whatever the version and
    whether it is loaded): the answer must not confirm that it exists."""
    tenant = subject.tenant
    if tenant is not None and not tenant.may_use(name):
        raise ModelNotFound("model not found")
    return state.registry.get(name, version)


async def predict_and_bill(
    request: Request,
    state: AppState,
    subject: AuthSubject,
    model: LoadedModel,
    rows: list[list[float]],
    locate: Callable[[InvalidFeatures], tuple[str | int, ...]],
    render: Callable[[list[Prediction], float, bool], Response],
    *,
    use_cache: bool = False,
) -> Response:
    """Run the model (or, with ``use_cache`` and a configured cache, answer from the cache),
    render the answer (``render``: the predictions, the time taken to produce them and whether
    they came from the cache), then bill the tenant one unit per row through the usage writer
    (the response is sent only once the record is committed; a cached answer is billed exactly
    like a computed one). With an ``Idempotency-Key`` the answer is stored with the record.
    ``locate`` gives the 422's location of a refused value in the request's body. Every
    prediction route (/predict, /predict/batch, the V2 infer) goes through here."""
    context = request_context(request.scope)
    predictions, inference_ms, cached = await infer(state, subject, model, rows, locate, use_cache)
    response = render(predictions, inference_ms, cached)
    keyed = stored_form(request, response)
    stored: StoredResponse | None = None
    if keyed is not None:
        claim, headers, body = keyed
        ttl = state.settings.idempotency_ttl_seconds
        stored = claim.to_store(response.status_code, headers, body, ttl)
    try:
        await _bill(
            context,
            lambda: client_has_gone(request.receive),
            state,
            subject,
            model,
            len(rows),
            inference_ms,
            stored,
        )
    except AlreadyAnswered:
        # Another request with this key was billed first (another worker, or a claim that
        # expired): its answer is this one's.
        assert stored is not None  # noqa: S101 (only a keyed event is answered already)
        first = await stored_answer(state, stored.scope)
        if first is None:
            raise IdempotencyKeyInUse(
                "a request with this Idempotency-Key is being served; retry once it is answered"
            ) from None
        return replay_response(request, checked(first, stored.fingerprint))
    return response


async def run_and_bill(
    context: RequestContext,
    client_gone: Callable[[], bool],
    state: AppState,
    subject: AuthSubject,
    model: LoadedModel,
    rows: list[list[float]],
    locate: Callable[[InvalidFeatures], tuple[str | int, ...]],
    *,
    use_cache: bool = False,
) -> tuple[list[Prediction], float, bool]:
    """:func:`predict_and_bill` for any protocol, without idempotency keys: the call's context,
    and ``client_gone`` to ask whether its client has already gone (V2 over gRPC, whose calls
    are not HTTP requests, comes in here). Returns the predictions, the time taken to produce
    them and whether they came from the cache."""
    predictions, inference_ms, cached = await infer(state, subject, model, rows, locate, use_cache)
    await _bill(context, client_gone, state, subject, model, len(rows), inference_ms, None)
    return predictions, inference_ms, cached


async def infer(
    state: AppState,
    subject: AuthSubject,
    model: LoadedModel,
    rows: list[list[float]],
    locate: Callable[[InvalidFeatures], tuple[str | int, ...]],
    use_cache: bool,
) -> tuple[list[Prediction], float, bool]:
    """Validate the rows, then answer from the cache or run the model."""
    started = time.perf_counter()
    try:
        # Validated before any cache lookup or batching: a bad row is refused on its own.
        matrix = model.to_matrix(rows)
    except InvalidFeatures as exc:
        raise InvalidRequest(exc.message, loc=locate(exc)) from None
    cache = state.prediction_cache if use_cache else None
    tenant = subject.tenant
    hit = None
    if cache is not None and tenant is not None:
        hit = await cache.get(tenant.id, model, matrix)
    if hit is not None:
        predictions = [hit]
    else:
        predictions = await model.infer_async(matrix, state.batching)
        if cache is not None and tenant is not None:
            cache.put(tenant.id, model, matrix, predictions[0])
    inference_ms = (time.perf_counter() - started) * 1000
    return predictions, inference_ms, hit is not None


async def _bill(
    context: RequestContext,
    client_gone: Callable[[], bool],
    state: AppState,
    subject: AuthSubject,
    model: LoadedModel,
    units: int,
    inference_ms: float,
    stored: StoredResponse | None,
) -> None:
    await charge_call(
        context,
        client_gone,
        state,
        subject,
        model=model.manifest.name,
        model_version=model.manifest.version,
        units=units,
        latency_ms=inference_ms,
        response=stored,
    )
    metrics.record_prediction(model.name, model.version, model.runtime, units)
