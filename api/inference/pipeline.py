"""The one inference-and-billing pipeline: every prediction front end (``POST /api/v1/predict``,
``/predict/batch``, the V2 infer routes over REST and V2's ModelInfer over gRPC) is a thin
adapter that parses its own body, then calls :func:`served_model` and :func:`predict_and_bill`
(:func:`run_and_bill` for gRPC) here, and shapes its own response.

One request, in order: the model version the caller's plan may use (:func:`served_model`), the
rows validated against it, the prediction cache (``api.inference.cache``; ``/predict`` only),
inference (micro-batched with the requests that arrived together, ``ml.batching``), then the
bill (``api.inference.metering.charge``): the response is sent only once the usage record is
committed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.requests import Request

from api.http.context import RequestContext, request_context
from api.http.disconnect import client_has_gone
from api.inference.metering import charge_call
from api.observability import metrics
from api.services import AppState
from auth.errors import InvalidRequest
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
    *,
    use_cache: bool = False,
) -> tuple[list[Prediction], float, bool]:
    """Run the model (or, with ``use_cache`` and a configured cache, answer from the cache),
    then bill the tenant one unit per row through the usage writer (the response is sent only
    once the record is committed; a cached answer is billed exactly like a computed one).
    Returns the predictions, the time taken to produce them and whether they came from the
    cache. ``locate`` gives the 422's location of a refused value in the request's body. Every
    prediction route (/predict, /predict/batch, the V2 infer) goes through here."""
    return await run_and_bill(
        request_context(request.scope),
        lambda: client_has_gone(request.receive),
        state,
        subject,
        model,
        rows,
        locate,
        use_cache=use_cache,
    )


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
    """:func:`predict_and_bill` for any protocol: the call's context, and ``client_gone`` to
    ask whether its client has already gone (V2 over gRPC, whose calls are not HTTP requests,
    comes in here)."""
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
    await charge_call(
        context,
        client_gone,
        state,
        subject,
        model=model.manifest.name,
        model_version=model.manifest.version,
        units=len(rows),
        latency_ms=inference_ms,
    )
    metrics.record_prediction(model.name, model.version, model.runtime, len(rows))
    return predictions, inference_ms, hit is not None
