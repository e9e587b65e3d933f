"""The bodies of the model webhooks (``api.routes.webhooks``): what MLflow and a Standard
Webhooks sender post, and the 202 that answers an accepted delivery. Every field is bounded; the
body as a whole is bounded by ``api.webhooks.receiver.MAX_WEBHOOK_BODY_BYTES``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.schemas.fields import PRINTABLE_PATTERN
from auth.model_activation import MODEL_NAME_PATTERN, MODEL_VERSION_PATTERN

Version = Annotated[str, Field(pattern=MODEL_VERSION_PATTERN, max_length=9)]
# MLflow's own names: a registered model's name may hold characters modelgate's may not
# (spaces, dots, slashes); MODELGATE_MLFLOW_MODEL_NAMES maps those.
MlflowName = Annotated[str, Field(min_length=1, max_length=256, pattern=PRINTABLE_PATTERN)]


class MlflowDelivery(BaseModel):
    """MLflow's envelope (``mlflow/webhooks/delivery.py``): the event is ``entity`` and
    ``action``, its payload ``data``. Fields MLflow may add later are ignored."""

    model_config = ConfigDict(extra="ignore")

    entity: Annotated[str, Field(max_length=64)]
    action: Annotated[str, Field(max_length=64)]
    data: dict[str, object]


class MlflowVersionCreated(BaseModel):
    """``model_version.created``'s payload, as much of it as modelgate reads."""

    model_config = ConfigDict(extra="ignore")

    name: MlflowName
    version: Version


class MlflowAliasCreated(BaseModel):
    """``model_version_alias.created``'s payload."""

    model_config = ConfigDict(extra="ignore")

    name: MlflowName
    alias: Annotated[str, Field(min_length=1, max_length=256)]
    version: Version


class GenericDelivery(BaseModel):
    """A new model version announced by any Standard Webhooks sender."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "iris",
                    "version": "3",
                    "source": "file:///srv/models/iris-3.onnx",
                    "activate": True,
                }
            ]
        },
    )

    name: Annotated[str, Field(pattern=MODEL_NAME_PATTERN, max_length=64)]
    version: Version
    source: Annotated[str, Field(min_length=1, max_length=2048, pattern=PRINTABLE_PATTERN)] = Field(
        description="where the version is, as `modelgate models pull` takes it: models:/ "
        "(MLflow), s3://, https:// (with sha256) or file://"
    )
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", max_length=64)] | None = Field(
        default=None, description="the artifact's SHA-256 (hex); the pull checks it"
    )
    activate: bool = Field(
        default=False, description="activate the version once it verified and warmed up"
    )


class WebhookAccepted(BaseModel):
    """An accepted delivery: queued for deployment in the background, or ignored (an event
    or alias that deploys nothing), with why."""

    delivery_id: str
    status: Literal["queued", "ignored"]
    name: str | None = Field(default=None, description="the served model's name")
    version: str | None = None
    activate: bool = False
    detail: str
