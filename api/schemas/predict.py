"""Request and response bodies of ``POST /api/v1/predict`` and ``/predict/batch``
(``api.routes.predict``); the V2 bodies (``api.schemas.v2``) share their bounds."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from ml import DEFAULT_MODEL, FLOAT32_MAX

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
