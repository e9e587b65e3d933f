"""The shapes of a model pull (``POST /admin/models/pull``, ``modelgate models pull``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from auth.model_activation import MODEL_NAME_PATTERN, MODEL_VERSION_PATTERN, ActivationView
from ml.manifest import MAX_SOURCE_CHARS, SHA256_PATTERN


class PullRequestBody(BaseModel):
    """Where to pull a model from and as what; ``version`` defaults to MLflow's version number
    for ``models:/`` sources, else the next free one."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"source": "models:/fraud@champion", "name": "fraud", "activate": True}]
        },
    )

    source: Annotated[str, Field(min_length=1, max_length=MAX_SOURCE_CHARS)]
    name: Annotated[str, Field(pattern=MODEL_NAME_PATTERN, max_length=64)]
    version: Annotated[str, Field(pattern=MODEL_VERSION_PATTERN, max_length=9)] | None = None
    sha256: Annotated[str, Field(pattern=SHA256_PATTERN, max_length=64)] | None = None
    allow_pickle: bool = False
    activate: bool = False

    @model_validator(mode="after")
    def _pickle_needs_its_digest(self) -> PullRequestBody:
        # Consent to run one pickle is consent to run exactly that file: pinned by its digest.
        if self.allow_pickle and self.sha256 is None:
            raise ValueError("allow_pickle needs sha256, the pickle's own SHA-256")
        return self


class PullView(BaseModel):
    """A pulled version: where it came from, what its artifact was, what serves it, and its
    activation when one was asked for."""

    name: str
    version: str
    runtime: str
    source: str
    source_version: str | None
    artifact_kind: Literal["onnx", "skops", "pickle"]
    artifact_sha256: str
    activation: ActivationView | None = None
