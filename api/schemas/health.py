"""Response bodies of the health routes (``api.routes.health``): the summary, liveness, and
readiness (``api.observability.readiness``, whose 503 problem ``/v2/health/ready`` answers too)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from api.http.errors import Problem


class HealthResponse(BaseModel):
    """A summary for people and dashboards."""

    model_config = ConfigDict(protected_namespaces=())

    status: Literal["ok", "degraded"]
    model_loaded: bool
    model_version: str | None
    uptime_seconds: float
    timestamp: datetime = Field(description="The server's time (UTC, ISO 8601)")


class LiveResponse(BaseModel):
    """The process is up."""

    status: Literal["ok"]


# "degraded": Redis is down but the rate limits fail open (MODELGATE_RATE_LIMIT_ON_REDIS_FAILURE=
# open), so the process still serves, under the per-process fallback limit: it stays ready (taking
# every worker out of rotation would defeat the point of failing open) and says so here.
CheckState = Literal["ok", "degraded", "unavailable", "not_configured"]


class ReadinessChecks(BaseModel):
    """Each dependency's state."""

    database: CheckState
    redis: CheckState
    models: CheckState


class UnavailableModel(BaseModel):
    """A model whose requests that pin no version are refused with 503, and why."""

    model: str
    active_version: str | None
    reason: str


class ReadinessResponse(BaseModel):
    """Whether the process can serve traffic, and which dependency is down if not."""

    status: Literal["ready", "unavailable"]
    checks: ReadinessChecks
    failed_model_versions: list[str] = Field(
        description="`name/version` of every version that failed to load or its self-check"
    )
    unavailable_models: list[UnavailableModel] = Field(
        description="Models whose active version is not ready (no other version is served in "
        "its place): the `models` check is `degraded` while some model still serves, "
        "`unavailable` when none does"
    )


class ReadinessProblem(Problem):
    """Not ready: a problem JSON body with each dependency's state."""

    checks: ReadinessChecks
    failed_model_versions: list[str]
    unavailable_models: list[UnavailableModel]
