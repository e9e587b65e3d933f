"""Prediction routes: one instance or a batch, billed before the response is sent.

A thin adapter over the inference pipeline (``api.inference.pipeline``): the bodies are
``api.schemas.predict``'s, the model lookup, cache, inference and billing the pipeline's.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from api.http.context import request_context
from api.http.deps import CredentialFirstRoute, PredictScope, app_state
from api.http.errors import problem_responses
from api.http.idempotency import KEY_PARAMETER
from api.inference.pipeline import predict_and_bill, served_model
from api.schemas.predict import (
    HARD_MAX_INSTANCES,
    BatchPredictRequest,
    BatchPredictResponse,
    PredictRequest,
    PredictResponse,
)
from auth.errors import InvalidRequest
from ml import InvalidFeatures, Prediction

# No database session here: usage goes through the usage writer (api.inference.metering.charge).
# The credential is checked before the body is read (api.http.deps.CredentialFirstRoute).
router = APIRouter(route_class=CredentialFirstRoute, tags=["predictions"])


def _features_loc(exc: InvalidFeatures) -> tuple[str | int, ...]:
    return ("body", "features") if exc.feature is None else ("body", "features", exc.feature)


def _instances_loc(exc: InvalidFeatures) -> tuple[str | int, ...]:
    loc: tuple[str | int, ...] = ("body", "instances")
    if exc.row is not None:
        loc += (exc.row,)
    if exc.feature is not None:
        loc += (exc.feature,)
    return loc


def _json(body: BaseModel) -> Response:
    """The response, serialized once by its own model: FastAPI would otherwise validate the
    model it was just built from again against ``response_model`` (which stays declared for
    the OpenAPI document)."""
    return Response(body.model_dump_json(), media_type="application/json")


# 400, 409 and 422 also answer a bad, busy or reused Idempotency-Key (api.http.idempotency).
PREDICT_ERRORS = problem_responses(400, 401, 403, 404, 409, 413, 422, 429, 503)
# The Idempotency-Key header, for the document (checked by the Authenticator: api.http.deps).
IDEMPOTENT = {"parameters": [KEY_PARAMETER]}


@router.post(
    "/predict", response_model=PredictResponse, responses=PREDICT_ERRORS, openapi_extra=IDEMPOTENT
)
async def predict(
    body: PredictRequest,
    subject: PredictScope,
    request: Request,
) -> Response:
    """Predict the class of one instance (1 unit)."""
    state = app_state(request)
    model = served_model(state, subject, body.model, body.model_version)

    def render(results: list[Prediction], inference_ms: float, cached: bool) -> Response:
        [result] = results
        return _json(
            PredictResponse(
                prediction=result.prediction,
                probability=result.probability,
                class_name=result.class_name,
                model=model.manifest.name,
                model_version=model.manifest.version,
                prediction_id=request_context(request.scope).request_id,
                timestamp=datetime.now(UTC),
                inference_time_ms=round(inference_ms, 3),
                cached=cached,
            )
        )

    return await predict_and_bill(
        request, state, subject, model, [body.features], _features_loc, render, use_cache=True
    )


@router.post(
    "/predict/batch",
    response_model=BatchPredictResponse,
    responses=PREDICT_ERRORS,
    openapi_extra=IDEMPOTENT,
)
async def predict_batch(
    body: BatchPredictRequest,
    subject: PredictScope,
    request: Request,
) -> Response:
    """Predict the classes of several instances (one unit per instance)."""
    state = app_state(request)
    started = time.perf_counter()
    limit = state.settings.max_batch_size
    if len(body.instances) > min(limit, HARD_MAX_INSTANCES):
        raise InvalidRequest(f"a batch holds at most {limit} instances", loc=("body", "instances"))
    model = served_model(state, subject, body.model, body.model_version)
    request_id = request_context(request.scope).request_id
    name, version = model.manifest.name, model.manifest.version

    def render(results: list[Prediction], inference_ms: float, _cached: bool) -> Response:
        # One call computed every row: each prediction shares its time and timestamp.
        timestamp = datetime.now(UTC)
        inference_time_ms = round(inference_ms, 3)
        return _json(
            BatchPredictResponse(
                predictions=[
                    PredictResponse(
                        prediction=r.prediction,
                        probability=r.probability,
                        class_name=r.class_name,
                        model=name,
                        model_version=version,
                        prediction_id=f"{request_id}-{index}",
                        timestamp=timestamp,
                        inference_time_ms=inference_time_ms,
                        cached=False,
                    )
                    for index, r in enumerate(results)
                ],
                batch_size=len(results),
                total_time_ms=round((time.perf_counter() - started) * 1000, 3),
                model=name,
                model_version=version,
                prediction_id=request_id,
            )
        )

    return await predict_and_bill(
        request, state, subject, model, body.instances, _instances_loc, render
    )
