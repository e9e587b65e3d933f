"""Public health routes: summary, liveness and readiness."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import text

from api.http.deps import StateDep
from api.http.errors import Problem, problem_responses
from api.http.problems import PROBLEM_MEDIA_TYPE, problem_response
from api.services import AppState

router = APIRouter(tags=["health"])

# Readiness must answer quickly even when a dependency hangs.
CHECK_TIMEOUT_SECONDS = 2.0


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


@router.get("/health", response_model=HealthResponse, responses=problem_responses(500))
async def health(state: StateDep) -> HealthResponse:
    """Summarise the service's health and the default model's version."""
    version = state.registry.active_version()
    return HealthResponse(
        status="ok" if state.registry.is_ready else "degraded",
        model_loaded=version is not None,
        model_version=version,
        uptime_seconds=round(time.monotonic() - state.started_at, 3),
        timestamp=datetime.now(UTC),
    )


@router.get("/health/live", response_model=LiveResponse)
async def live() -> LiveResponse:
    """Report that the process is alive."""
    return LiveResponse(status="ok")


async def _database_ok(state: AppState) -> bool:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS), state.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


@router.get(
    "/health/ready",
    response_model=ReadinessResponse,
    responses={
        503: {
            "model": ReadinessProblem,
            "description": "A dependency is not ready",
            "content": {PROBLEM_MEDIA_TYPE: {}},
        }
    },
)
async def ready(state: StateDep, request: Request) -> JSONResponse:
    """Report whether the database, Redis (if configured) and models are ready, and why not."""
    database_ok, redis_ok = await asyncio.gather(
        _database_ok(state), state.rate_limiter.is_healthy()
    )
    limiter = state.rate_limiter
    redis: CheckState = "not_configured"
    if limiter.uses_redis:
        redis = "ok" if redis_ok else ("degraded" if limiter.fail_open else "unavailable")
    registry = state.registry
    failed = registry.failed_versions()
    problems = [
        UnavailableModel(model=p.name, active_version=p.version, reason=p.reason)
        for p in registry.problems()
    ]
    models: CheckState = "unavailable"
    if registry.is_ready:
        unhealthy = any(status.state == "unhealthy" for status in failed)
        models = "degraded" if problems or unhealthy else "ok"
    checks = ReadinessChecks(
        database="ok" if database_ok else "unavailable", redis=redis, models=models
    )
    failed_names = [f"{v.name}/{v.version}" for v in failed]
    unavailable = [p.model_dump() for p in problems]
    down = [name for name, value in checks.model_dump().items() if value == "unavailable"]
    if not down:
        body = ReadinessResponse(
            status="ready",
            checks=checks,
            failed_model_versions=failed_names,
            unavailable_models=problems,
        )
        return JSONResponse(body.model_dump())
    return problem_response(
        request.scope,
        503,
        "service-unavailable",
        "Service unavailable",
        f"not ready: {', '.join(down)} unavailable",
        {"Retry-After": "2"},
        checks=checks.model_dump(),
        failed_model_versions=failed_names,
        unavailable_models=unavailable,
    )
