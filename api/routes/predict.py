"""Prediction routes: one instance or a batch, billed before the response is sent."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from api.http.context import request_context
from api.http.deps import CredentialFirstRoute, PredictScope, app_state
from api.http.errors import problem_responses
from api.inference.metering import charge
from api.observability import metrics
from api.services import AppState
from auth.errors import InvalidRequest
from auth.identity.authn import AuthSubject
from ml import (
    DEFAULT_MODEL,
    FLOAT32_MAX,
    InvalidFeatures,
    LoadedModel,
    ModelNotFound,
    Prediction,
)

# No database session here: usage goes through the usage writer (api.inference.metering.charge). The
# credential is checked before the body is read (api.http.deps.CredentialFirstRoute).
router = APIRouter(route_class=CredentialFirstRoute, tags=["predictions"])

# What any model's float32 input holds; a version may accept less (its input_range in
# GET /models/{name}), refused with 422 naming the feature.
FeatureValue = Annotated[
    float,
    Field(
        strict=True,
        allow_inf_nan=False,
        ge=-FLOAT32_MAX,
        le=FLOAT32_MAX,
        description="A finite JSON number (no NaN, no infinity, no string or boolean), within "
        "float32's range and the model's input_range",
    ),
]
ModelName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")]
ModelVersion = Annotated[str, Field(min_length=1, max_length=50, pattern=r"^[A-Za-z0-9_.-]+$")]
# A hard ceiling for parsing; the configured batch limit (default 100) is checked per request.
MAX_FEATURES = 1000
HARD_MAX_INSTANCES = 1000


class PredictRequest(BaseModel):
    """One instance to predict."""

    model_config = ConfigDict(
        extra="forbid",
        protected_namespaces=(),
        json_schema_extra={"examples": [{"features": [5.1, 3.5, 1.4, 0.2]}]},
    )

    features: list[FeatureValue] = Field(
        min_length=1,
        max_length=MAX_FEATURES,
        description="One value per feature of the model, within its input_range "
        "(GET /models/{name})",
    )
    model: ModelName = DEFAULT_MODEL
    model_version: ModelVersion | None = None


class PredictResponse(BaseModel):
    """The prediction for one instance: the tutorial's fields, then modelgate's own."""

    model_config = ConfigDict(protected_namespaces=())

    prediction: int = Field(description="Index of the most probable class")
    probability: list[float] = Field(
        description="Every class's probability, in the model's class order (`class_names` of "
        "`GET /models/{name}`)"
    )
    class_name: str = Field(description="Name of the most probable class")
    model: str
    model_version: str
    prediction_id: str = Field(
        description="Unique id of this prediction; for `/predict` the request's `X-Request-ID`"
    )
    timestamp: datetime = Field(description="When the prediction was made (UTC, ISO 8601)")
    inference_time_ms: float = Field(
        description="Time taken to produce it: the model call, or the cache lookup when cached"
    )
    cached: bool = Field(
        description="Whether the answer came from the prediction cache (billed all the same)"
    )


class BatchPredictRequest(BaseModel):
    """Several instances to predict with one model."""

    model_config = ConfigDict(
        extra="forbid",
        protected_namespaces=(),
        json_schema_extra={
            "examples": [{"instances": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}]
        },
    )

    instances: list[Annotated[list[FeatureValue], Field(min_length=1, max_length=MAX_FEATURES)]] = (
        Field(
            min_length=1,
            max_length=HARD_MAX_INSTANCES,
            description="Rows of feature values, as for /predict; at most the server's "
            "MODELGATE_MAX_BATCH_SIZE rows (100 by default)",
        )
    )
    model: ModelName = DEFAULT_MODEL
    model_version: ModelVersion | None = None


class BatchPredictResponse(BaseModel):
    """The predictions of a batch, in the order of its instances."""

    model_config = ConfigDict(protected_namespaces=())

    predictions: list[PredictResponse] = Field(
        description="One full prediction per instance; each `prediction_id` is the request's "
        "`X-Request-ID`, a hyphen and the instance's 0-based index"
    )
    batch_size: int
    total_time_ms: float
    model: str
    model_version: str
    prediction_id: str = Field(description="The request's `X-Request-ID`")


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
        metrics.record_cache(hit is not None)
    if hit is not None:
        predictions = [hit]
    else:
        predictions = await model.infer_async(matrix, state.batching)
        if cache is not None and tenant is not None:
            cache.put(tenant.id, model, matrix, predictions[0])
    inference_ms = (time.perf_counter() - started) * 1000
    await charge(
        request,
        state,
        subject,
        model=model.manifest.name,
        model_version=model.manifest.version,
        units=len(rows),
        latency_ms=inference_ms,
    )
    metrics.record_prediction(model.name, model.version, model.runtime, len(rows))
    return predictions, inference_ms, hit is not None


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


PREDICT_ERRORS = problem_responses(401, 403, 404, 413, 422, 429, 503)


@router.post("/predict", response_model=PredictResponse, responses=PREDICT_ERRORS)
async def predict(
    body: PredictRequest,
    subject: PredictScope,
    request: Request,
) -> Response:
    """Predict the class of one instance (1 unit)."""
    state = app_state(request)
    model = served_model(state, subject, body.model, body.model_version)
    [result], inference_ms, cached = await predict_and_bill(
        request, state, subject, model, [body.features], _features_loc, use_cache=True
    )
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


@router.post("/predict/batch", response_model=BatchPredictResponse, responses=PREDICT_ERRORS)
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
    results, inference_ms, _ = await predict_and_bill(
        request, state, subject, model, body.instances, _instances_loc
    )
    request_id = request_context(request.scope).request_id
    name, version = model.manifest.name, model.manifest.version
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
