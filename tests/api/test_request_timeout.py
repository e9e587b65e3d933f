"""The per-request deadline (``MODELGATE_REQUEST_TIMEOUT_SECONDS``, api.http.timeout): a request
past it is cancelled and answered 503 problem JSON, billed nothing, and leaves nothing held; a
request whose usage is already being committed is answered, never cut off after billing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from sqlalchemy import func, select
from starlette.responses import StreamingResponse

from api.http.deps import DatabaseRoute, SessionDep
from auth.models import AdminPrincipal, UsageRecord
from auth.tenants import get_or_create_admin
from ml.batching import DIRECT
from ml.model import LoadedModel
from tests.conftest import (
    IRIS_SETOSA,
    Backend,
    Harness,
    bearer,
    create_tenant_with_key,
    make_settings,
    running_app,
    unique,
    update_key,
)

DEADLINE = 0.5


# What the test routes below wait for: the handler's work, or its session's commit.
GATES: dict[str, asyncio.Event] = {}


def _add_writing_routes(app: FastAPI) -> None:
    """Routes that write an admin principal, on the database routes' class (which commits the
    request's session before answering), slowed at the gate their path names."""

    async def slow_work(session: SessionDep, name: str) -> dict[str, str]:
        await get_or_create_admin(session, name)
        await GATES["work"].wait()
        return {"name": name}

    async def slow_commit(session: SessionDep, name: str) -> dict[str, str]:
        await get_or_create_admin(session, name)
        commit = session.commit

        async def gated_commit() -> None:
            await GATES["commit"].wait()
            await commit()

        session.commit = gated_commit  # type: ignore[method-assign]
        return {"name": name}

    for path, endpoint in (("/slow-work", slow_work), ("/slow-commit", slow_commit)):
        # Ahead of the 404 catch-all, as a real route would be.
        app.router.routes.insert(0, DatabaseRoute(path, endpoint, methods=["POST"]))

    async def slow_stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"first,"
            await GATES["stream"].wait()
            yield b"last"

        return StreamingResponse(chunks(), media_type="text/csv")

    app.router.routes.insert(0, APIRoute("/slow-stream", slow_stream, methods=["GET"]))


@pytest.fixture
async def harness(
    backend: Backend, served_model_dir: Path, tmp_path: Path
) -> AsyncIterator[Harness]:
    settings = make_settings(
        backend, served_model_dir, tmp_path / "var", request_timeout_seconds=DEADLINE
    )
    GATES.update(work=asyncio.Event(), commit=asyncio.Event(), stream=asyncio.Event())
    async with running_app(settings, backend, customize=_add_writing_routes) as running:
        yield running


async def _admin_exists(harness: Harness, name: str) -> bool:
    async with harness.sessionmaker() as session:
        return (
            await session.scalar(select(AdminPrincipal.id).where(AdminPrincipal.name == name))
        ) is not None


async def _records(harness: Harness, tenant_id: uuid.UUID) -> int:
    async with harness.sessionmaker() as session:
        count = await session.scalar(
            select(func.count()).select_from(UsageRecord).where(UsageRecord.tenant_id == tenant_id)
        )
    return int(count or 0)


def _gate_predictions(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Make every prediction wait until the returned event is set (a slow model)."""
    gate = asyncio.Event()
    original = LoadedModel.infer_async

    async def slow_infer(self: LoadedModel, matrix: Any, batching: Any = DIRECT) -> Any:
        await gate.wait()
        return await original(self, matrix, batching)

    # Every prediction route runs its validated rows through infer_async (api.inference.pipeline).
    monkeypatch.setattr(LoadedModel, "infer_async", slow_infer)
    return gate


async def test_a_prediction_past_its_deadline_is_answered_503_and_billed_nothing(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant, key = await create_tenant_with_key(harness)
    # One request in flight at a time: the timed-out request must give its slot back.
    await update_key(harness, key, max_in_flight=1)
    gate = _gate_predictions(monkeypatch)

    response = await asyncio.wait_for(
        harness.client.post("/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)),
        timeout=DEADLINE * 20,
    )

    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "1"
    problem = response.json()
    assert problem["type"] == "service-unavailable"
    assert problem["request_id"] == response.headers["x-request-id"]
    assert "longer than the server allows" in problem["detail"]
    gate.set()  # the cancelled prediction can no longer finish into a record
    await asyncio.sleep(0.2)
    assert await _records(harness, tenant.id) == 0
    again = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    assert again.status_code == 200, again.text
    assert await _records(harness, tenant.id) == 1


async def test_a_request_whose_usage_is_being_committed_at_its_deadline_is_answered_and_billed(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline passes while the usage writer commits the request's record: the request
    waits for the commit and answers 200 (answering 503 would bill a refused request)."""
    tenant, key = await create_tenant_with_key(harness)
    writer = harness.state.usage_writer
    gate = asyncio.Event()
    original = writer._write

    async def slow_write(batch: Any) -> Any:
        await gate.wait()
        return await original(batch)

    monkeypatch.setattr(writer, "_write", slow_write)
    request = asyncio.create_task(
        harness.client.post("/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key))
    )
    await asyncio.sleep(DEADLINE * 3)
    assert not request.done(), request.result().status_code
    gate.set()
    response = await request
    assert response.status_code == 200, response.text
    assert await _records(harness, tenant.id) == 1


async def test_a_body_that_never_finishes_arriving_is_cut_off_at_the_deadline(
    harness: Harness,
) -> None:
    _, key = await create_tenant_with_key(harness)
    stalled = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b'{"features": ['
        await stalled.wait()  # never set: the rest never comes
        yield b"]}"

    response = await asyncio.wait_for(
        harness.client.post(
            "/api/v1/predict",
            content=body(),
            headers={**bearer(key), "Content-Type": "application/json"},
        ),
        timeout=DEADLINE * 20,
    )
    assert response.status_code == 503
    assert response.json()["type"] == "service-unavailable"
    assert response.headers["connection"] == "close"


async def test_a_write_past_its_deadline_is_answered_503_and_rolled_back(harness: Harness) -> None:
    name = unique("admin")
    response = await asyncio.wait_for(
        harness.client.post("/slow-work", params={"name": name}), timeout=DEADLINE * 20
    )
    assert response.status_code == 503
    assert response.json()["type"] == "service-unavailable"
    GATES["work"].set()
    assert not await _admin_exists(harness, name)


async def test_a_write_whose_commit_is_under_way_at_its_deadline_is_committed_and_answered(
    harness: Harness,
) -> None:
    """The deadline passes during the commit: the request waits for it and answers 200 (a 503
    for a write that was made would invite a client to make it twice)."""
    name = unique("admin")
    request = asyncio.create_task(harness.client.post("/slow-commit", params={"name": name}))
    await asyncio.sleep(DEADLINE * 3)
    assert not request.done(), request.result().status_code
    GATES["commit"].set()
    response = await request
    assert response.status_code == 200, response.text
    assert await _admin_exists(harness, name)


async def test_a_response_that_started_before_its_deadline_is_sent_whole(harness: Harness) -> None:
    """A streamed answer (such as the billing export) whose first byte went out before the
    deadline is finished, not cut off halfway: its first byte lifts the deadline."""
    request = asyncio.create_task(harness.client.get("/slow-stream"))
    await asyncio.sleep(DEADLINE * 3)
    assert not request.done(), request.result().status_code
    GATES["stream"].set()
    response = await request
    assert response.status_code == 200
    assert response.content == b"first,last"
