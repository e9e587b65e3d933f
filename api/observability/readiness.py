"""Readiness: whether this process can take traffic (its database, Redis when configured, and
its models), and the one answer to it that ``GET /api/v1/health/ready`` gives and
``GET /v2/health/ready`` adapts to the V2 protocol."""

from __future__ import annotations

import asyncio

from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.requests import Request

from api.http.problems import problem_response
from api.schemas.health import CheckState, ReadinessChecks, ReadinessResponse, UnavailableModel
from api.services import AppState

# Readiness must answer quickly even when a dependency hangs.
CHECK_TIMEOUT_SECONDS = 2.0


async def _database_ok(state: AppState) -> bool:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS), state.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


async def is_ready(state: AppState) -> bool:
    """Whether no dependency is down: the gRPC ServerReady's answer (``api.grpc.service``)."""
    *_, down = await _assess(state)
    return not down


async def readiness(state: AppState, request: Request) -> JSONResponse:
    """200 with each dependency's state when none is down; otherwise a 503 problem (with
    ``Retry-After``) naming the ones that are, with the same states."""
    checks, failed_names, problems, down = await _assess(state)
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
        unavailable_models=[p.model_dump() for p in problems],
    )


async def _assess(
    state: AppState,
) -> tuple[ReadinessChecks, list[str], list[UnavailableModel], list[str]]:
    """Each dependency's state, the failed versions, the unavailable models, and the names of
    the dependencies that are down."""
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
    down = [name for name, value in checks.model_dump().items() if value == "unavailable"]
    return checks, failed_names, problems, down
