"""Model catalog routes: which models and versions are served, their input schema, and the
tutorial's view of the default model."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from api.http.deps import AnyCredential, StateDep
from api.http.errors import problem_responses
from auth.identity.authn import AuthSubject
from auth.model_catalog import CatalogEntry, CatalogKey
from ml import DEFAULT_MODEL, ModelInfo, ModelNotFound, ModelUnavailable, VersionStatus
from ml.manifest import FeatureRange

router = APIRouter(tags=["models"])


class FeatureRangeOut(BaseModel):
    """The closed interval of one feature's values."""

    min: float
    max: float


class InputSchemaOut(BaseModel):
    """What one version takes: a row of ``n_features`` finite numbers, each within its
    ``input_range``."""

    n_features: int
    feature_names: list[str]
    input_range: list[FeatureRangeOut] = Field(
        description="Per feature, the values a prediction may send (others are refused with "
        "422 naming the feature)"
    )
    training_range: list[FeatureRangeOut] | None = Field(
        description="Per feature, the values the training data held (not enforced); null when "
        "not recorded"
    )


class ModelVersionOut(BaseModel):
    """One version of a model, its health and the input it takes."""

    version: str
    state: Literal["ready", "failed", "unhealthy"] = Field(
        description="`ready`: served; `failed`: it could not be loaded; `unhealthy`: it failed "
        "its periodic self-check (canary prediction or re-hash of its files) and could not be "
        "reloaded. Only `ready` versions are served"
    )
    error: str | None
    runtime: Literal["onnx", "sklearn"] | None = Field(
        description="What serves this version: ONNX Runtime, or scikit-learn when the version "
        "has no ONNX file; null while it is not ready"
    )
    active: bool = Field(description="Whether requests that pin no version get this version")
    created_at: datetime | None = Field(description="When it was registered; null if unknown")
    class_names: list[str]
    input_schema: InputSchemaOut | None = Field(
        description="null when the version's manifest cannot be trusted"
    )
    metrics: dict[str, JsonValue] | None = Field(
        description="What the operator recorded at registration (e.g. test accuracy)"
    )
    source: str | None = Field(
        default=None,
        description="Where the version was published from (the model catalogue's source URI, "
        "without credentials); shown to operators only, null for a tenant's credential and when "
        "unknown (a version on this replica's disk only, or registered before the catalogue)",
    )
    source_version: str | None = Field(
        default=None,
        description="The source's own id of this version (e.g. an MLflow model version); "
        "operators only, as source",
    )


class ModelOut(BaseModel):
    """A model, its versions, the active one, and the input it expects."""

    model_config = ConfigDict(protected_namespaces=())

    name: str
    active_version: str | None = Field(
        description="The version requests that pin none are served by (an operator's "
        "activation, else the registry's choice); it may be failed or unhealthy, and then no "
        "other version is served in its place"
    )
    serving: bool = Field(description="Whether requests that pin no version are served")
    unavailable_reason: str | None = Field(
        description="Why requests that pin no version get 503; null while `serving`"
    )
    versions: list[ModelVersionOut]
    n_features: int | None
    feature_names: list[str]
    class_names: list[str]
    input_range: list[FeatureRangeOut] = Field(
        description="Per feature, the values a prediction may send (others are refused with "
        "422 naming the feature)"
    )
    training_range: list[FeatureRangeOut] | None = Field(
        description="Per feature, the values the training data held (not enforced); null when "
        "not recorded"
    )


class ModelList(BaseModel):
    """Every model in the registry."""

    models: list[ModelOut]


# What /model/info says of a version registered before manifests recorded these.
UNKNOWN_MODEL_TYPE = "unknown"


class DefaultModelInfo(BaseModel):
    """The default model's active version, as the tutorial describes a model."""

    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str
    model_type: str = Field(
        description="The estimator's class name, recorded at registration; "
        f"`{UNKNOWN_MODEL_TYPE}` for versions registered before modelgate recorded it"
    )
    loaded_at: datetime = Field(
        description="When the worker that answers loaded this version (UTC, ISO 8601)"
    )
    parameters: dict[str, JsonValue] = Field(
        description="The estimator's hyperparameters, recorded at registration (never read "
        "from the pickle at serve time); empty for versions registered before modelgate "
        "recorded them"
    )


def _ranges(ranges: list[FeatureRange] | None) -> list[FeatureRangeOut] | None:
    return None if ranges is None else [FeatureRangeOut(min=r.min, max=r.max) for r in ranges]


def _version_out(
    status: VersionStatus, active: str | None, entry: CatalogEntry | None
) -> ModelVersionOut:
    manifest = status.manifest
    schema = None
    if manifest is not None:
        schema = InputSchemaOut(
            n_features=manifest.n_features,
            feature_names=list(manifest.feature_names),
            input_range=_ranges(manifest.accepted_range) or [],
            training_range=_ranges(manifest.training_range),
        )
    return ModelVersionOut(
        version=status.version,
        state=status.state,
        error=status.error,
        runtime=status.runtime,
        active=status.version == active,
        created_at=None if manifest is None else manifest.created_at,
        class_names=[] if manifest is None else list(manifest.class_names),
        input_schema=schema,
        metrics=None if manifest is None else manifest.metrics,
        source=None if entry is None else entry.source_uri,
        source_version=None if entry is None else entry.source_version,
    )


def _model_out(
    info: ModelInfo, catalogue: dict[CatalogKey, CatalogEntry], subject: AuthSubject
) -> ModelOut:
    # Where a version came from (a registry's host, a bucket) is the operator's business: a
    # tenant's credential sees no source.
    sources = catalogue if subject.tenant is None else {}
    return ModelOut(
        name=info.name,
        active_version=info.active_version,
        serving=info.unavailable_reason is None,
        unavailable_reason=info.unavailable_reason,
        versions=[
            _version_out(v, info.active_version, sources.get((info.name, v.version)))
            for v in info.versions
        ],
        n_features=info.n_features,
        feature_names=info.feature_names,
        class_names=info.class_names,
        input_range=_ranges(info.input_range) or [],
        training_range=_ranges(info.training_range),
    )


@router.get("/models", response_model=ModelList, responses=problem_responses(401, 429, 503))
async def list_models(subject: AnyCredential, state: StateDep) -> ModelList:
    """List the models the caller may use, with their versions and input schema."""
    tenant = subject.tenant
    return ModelList(
        models=[
            _model_out(info, state.catalogue, subject)
            for info in state.registry.models()
            if tenant is None or tenant.may_use(info.name)
        ]
    )


@router.get(
    "/models/{name}", response_model=ModelOut, responses=problem_responses(401, 404, 429, 503)
)
async def get_model(name: str, subject: AnyCredential, state: StateDep) -> ModelOut:
    """Describe one model: its versions, each one's health and input schema, the active one."""
    if subject.tenant is not None and not subject.tenant.may_use(name):
        # Outside the caller's plan: the answer of a model that does not exist.
        raise ModelNotFound("model not found")
    return _model_out(state.registry.model_info(name), state.catalogue, subject)


@router.get(
    "/model/info",
    response_model=DefaultModelInfo,
    responses=problem_responses(401, 403, 429, 503),
)
async def default_model_info(subject: AnyCredential, state: StateDep) -> DefaultModelInfo:
    """Describe the default model's active version: type, hyperparameters, when it was loaded."""
    try:
        if subject.tenant is not None and not subject.tenant.may_use(DEFAULT_MODEL):
            raise ModelNotFound("model not found")  # as if it were not on disk
        model = state.registry.get(DEFAULT_MODEL)
    except ModelNotFound:
        # No default model on disk at all is the same outage as one that failed to load.
        raise ModelUnavailable(f"model '{DEFAULT_MODEL}' is not loaded") from None
    manifest = model.manifest
    return DefaultModelInfo(
        model_name=manifest.name,
        model_version=manifest.version,
        model_type=manifest.model_type or UNKNOWN_MODEL_TYPE,
        loaded_at=model.loaded_at,
        parameters=manifest.parameters or {},
    )
