"""Public health routes: summary, liveness and readiness."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.http.deps import StateDep
from api.http.errors import problem_responses
from api.http.problems import PROBLEM_MEDIA_TYPE
from api.observability.readiness import readiness
from api.schemas.health import HealthResponse, LiveResponse, ReadinessProblem, ReadinessResponse

router = APIRouter(tags=["health"])


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
    return await readiness(state, request)
