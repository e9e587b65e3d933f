"""The request body shared by the operator's and the tenant's key rotation routes."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from api.schemas.fields import JsonInteger
from auth.identity.keys import MAX_ROTATION_GRACE_SECONDS


class KeyRotate(BaseModel):
    """How long the replaced key keeps working beside its successor."""

    model_config = ConfigDict(extra="forbid")

    grace_seconds: Annotated[int, JsonInteger] = Field(
        default=0,
        ge=0,
        le=MAX_ROTATION_GRACE_SECONDS,
        description="seconds the old key keeps working (0, the default: it is revoked now; "
        f"at most {MAX_ROTATION_GRACE_SECONDS}, 7 days)",
    )
