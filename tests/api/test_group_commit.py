"""Group commit of usage keeps every accounting rule of the contract (shared/API.md): a 2xx is
sent only after its record is committed, a batch never crosses the quota, a failed commit
serves nothing, and no billable route can answer without billing."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import Request
from sqlalchemy import func, select, text
from starlette.types import Message, Receive, Scope, Send

from api.app import create_app
from api.cli import upgrade_database
from api.http.deps import PredictScope
from auth.errors import QuotaExceeded
from auth.events.outbox import alert_units, crossed_thresholds
from auth.models import Event, MonthlyUsage, UsageDaily, UsageRecord, utcnow
from auth.usage.ledger import month_of
from tests.conftest import (
    IRIS_SETOSA,
    Backend,
    Harness,
    bearer,
    create_tenant_with_key,
    make_settings,
    new_postgres_database,
    only_on,
    running_app,
)
from tests.factories import usage_events

PREDICT = "/api/v1/predict"
BATCH = "/api/v1/predict/batch"


async def _records(harness: Harness, tenant_id: object) -> list[UsageRecord]:
    async with harness.sessionmaker() as session:
        rows = await session.scalars(select(UsageRecord).where(UsageRecord.tenant_id == tenant_id))
        return list(rows)


async def _counter(harness: Harness, tenant_id: object) -> int:
    async with harness.sessionmaker() as session:
        units = await session.scalar(
            select(func.sum(MonthlyUsage.units)).where(MonthlyUsage.tenant_id == tenant_id)
        )
    return int(units or 0)


async def test_record_is_committed_before_the_response_starts(harness: Harness) -> None:
    """Checked where it happens: at ``http.response.start``, another connection must already
    see the request's usage record (the in-process client alone would not notice a commit
    made after the response)."""
    tenant, key = await create_tenant_with_key(harness)
    app = harness.client._transport.app  # type: ignore[attr-defined]
    seen: list[tuple[int, bool]] = []

    async def checking_app(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_after_checking(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = dict(message["headers"])
                request_id = uuid.UUID(headers[b"x-request-id"].decode())
                async with harness.sessionmaker() as session:
                    found = await session.scalar(
                        select(func.count())
                        .select_from(UsageRecord)
                        .where(UsageRecord.request_id == request_id)
                    )
                seen.append((message["status"], found == 1))
            await send(message)

        await app(scope, receive, send_after_checking)

    transport = httpx.ASGITransport(app=checking_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        responses = await asyncio.gather(
            *[
                client.post(PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(key))
                for _ in range(12)
            ],
            client.post(BATCH, json={"instances": [IRIS_SETOSA] * 3}, headers=bearer(key)),
        )
    assert [r.status_code for r in responses] == [200] * 13
    assert seen == [(200, True)] * 13
    assert len(await _records(harness, tenant.id)) == 13


async def test_concurrent_batches_fill_the_quota_exactly_and_bill_what_they_serve(
    harness: Harness,
) -> None:
    tenant, key = await create_tenant_with_key(harness, monthly_quota=10)
    # 3 + 3 + 3 fit; a fourth batch of 3 would cross 10; single rows may fill the last unit.
    requests = [
        harness.client.post(BATCH, json={"instances": [IRIS_SETOSA] * 3}, headers=bearer(key))
        for _ in range(6)
    ] + [
        harness.client.post(PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(key))
        for _ in range(4)
    ]
    responses = await asyncio.gather(*requests)

    served = sum(
        (3 if index < 6 else 1) for index, r in enumerate(responses) if r.status_code == 200
    )
    assert {r.status_code for r in responses} <= {200, 429}
    assert served == 10, [r.status_code for r in responses]
    assert all(r.json()["type"] == "quota-exceeded" for r in responses if r.status_code == 429)
    records = await _records(harness, tenant.id)
    assert sum(record.units for record in records) == 10
    assert await _counter(harness, tenant.id) == 10
    served_ids = {r.json()["prediction_id"] for r in responses if r.status_code == 200}
    assert {str(record.request_id) for record in records} == served_ids


async def test_request_refused_for_its_quota_costs_no_row_and_no_sequence_value(
    harness: Harness,
) -> None:
    tenant, key = await create_tenant_with_key(harness, monthly_quota=1)
    other, other_key = await create_tenant_with_key(harness)
    assert (
        await harness.client.post(PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(key))
    ).status_code == 200
    before = max(r.id for r in await _records(harness, tenant.id))
    refused = await harness.client.post(
        PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    assert refused.status_code == 429
    ok = await harness.client.post(
        PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(other_key)
    )
    assert ok.status_code == 200
    [after] = await _records(harness, other.id)
    assert len(await _records(harness, tenant.id)) == 1
    assert after.id == before + 1


async def test_billable_route_that_does_not_bill_answers_503(
    backend: Backend, served_model_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings(backend, served_model_dir, tmp_path)
    app = create_app(settings)

    @app.post("/api/v1/forgetful")
    async def forgetful(_subject: PredictScope, _request: Request) -> dict[str, str]:
        return {"prediction": "free"}

    async with app.router.lifespan_context(app):
        harness = Harness(
            client=httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://testserver"
            ),
            state=app.state.modelgate,
            backend=backend,
        )
        async with harness.client:
            _, key = await create_tenant_with_key(harness)
            response = await harness.client.post("/api/v1/forgetful", headers=bearer(key))
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "free" not in response.text


@pytest.fixture
def private_database(backend: Backend, tmp_path: Path) -> Iterator[str]:
    """A migrated database of the backend's kind that this test may sabotage."""
    if backend.name == "postgres":
        with new_postgres_database() as url:
            upgrade_database(url)
            yield url
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'private.db'}"
        upgrade_database(url)
        yield url


SABOTAGE = {
    # Fires at COMMIT: the statements succeed and the commit itself fails.
    "postgres": [
        "CREATE FUNCTION refuse_commit() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'commit refused by the test'; END $$",
        "CREATE CONSTRAINT TRIGGER refuse_commit AFTER INSERT ON usage_record "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_commit()",
    ],
    "sqlite": [
        "CREATE TRIGGER refuse_commit BEFORE INSERT ON usage_record "
        "BEGIN SELECT RAISE(ABORT, 'write refused by the test'); END",
    ],
}
REPAIR = {
    "postgres": ["DROP TRIGGER refuse_commit ON usage_record"],
    "sqlite": ["DROP TRIGGER refuse_commit"],
}


async def _run(harness: Harness, statements: list[str]) -> None:
    async with harness.sessionmaker() as session:
        for statement in statements:
            await session.execute(text(statement))
        await session.commit()


async def test_failed_commit_serves_nothing_and_the_writer_recovers(
    backend: Backend, private_database: str, served_model_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings(
        Backend(backend.name, private_database, backend.redis_url), served_model_dir, tmp_path
    )
    async with running_app(settings, backend) as harness:
        tenant, key = await create_tenant_with_key(harness, monthly_quota=1000)
        await _run(harness, SABOTAGE[backend.name])
        failed = await asyncio.gather(
            *[
                harness.client.post(PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(key))
                for _ in range(8)
            ]
        )
        for response in failed:
            assert response.status_code == 503, response.text
            assert response.headers["content-type"].startswith("application/problem+json")
            assert "prediction" not in response.json()
            assert response.headers["Retry-After"]
        assert await _records(harness, tenant.id) == []
        assert await _counter(harness, tenant.id) == 0

        await _run(harness, REPAIR[backend.name])
        recovered = await harness.client.post(
            PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(key)
        )
        assert recovered.status_code == 200
        assert [str(r.request_id) for r in await _records(harness, tenant.id)] == [
            recovered.json()["prediction_id"]
        ]
        assert await _counter(harness, tenant.id) == 1


# The server's connections are killed with pg_terminate_backend.
@only_on("postgres")
async def test_database_killed_mid_flush_never_leaves_a_2xx_unbilled(
    backend: Backend,
    private_database: str,
    served_model_dir: Path,
    tmp_path: Path,
) -> None:
    settings = make_settings(
        Backend(backend.name, private_database, backend.redis_url), served_model_dir, tmp_path
    )
    database = private_database.rsplit("/", 1)[-1]
    async with running_app(settings, backend) as harness:
        tenant, key = await create_tenant_with_key(harness)

        async def kill_connections() -> None:
            for _ in range(10):
                await asyncio.sleep(0.03)
                async with harness.sessionmaker() as session:
                    await session.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = :name AND pid <> pg_backend_pid()"
                        ),
                        {"name": database},
                    )

        async def predict() -> httpx.Response:
            return await harness.client.post(
                PREDICT, json={"features": IRIS_SETOSA}, headers=bearer(key)
            )

        async def load() -> list[httpx.Response]:
            responses: list[httpx.Response] = []
            for _ in range(12):
                responses.extend(await asyncio.gather(*[predict() for _ in range(16)]))
            return responses

        responses, _ = await asyncio.gather(load(), kill_connections())
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503}, statuses
        # Flushes were interrupted (then retried, or failed with 503s): the test did something.
        assert harness.state.usage_writer.interrupted_flushes > 0
        served = {r.json()["prediction_id"] for r in responses if r.status_code == 200}
        billed = {str(r.request_id) for r in await _records(harness, tenant.id)}
        assert served <= billed
        # Every billed record is counted exactly once in the month's counter.
        assert await _counter(harness, tenant.id) == len(billed)
        after = await predict()
        assert after.status_code == 200


@pytest.mark.parametrize("batch", [1, 2, 3])
async def test_a_flush_decides_alike_on_both_paths_around_every_bound(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    """A month's counter at every value around its alert thresholds and quota, then a batch of
    one to three single-unit requests (from nothing to past the quota, as a lowered quota
    leaves it): the refusals, the ``usage.threshold`` and
    ``quota.exhausted`` events, the counter, records and rollups are those of the rules, and on
    Postgres a batch goes to the transaction path exactly when it passes a bound (the common
    case is one statement, ``CHARGE_FITTING``)."""
    quota, thresholds = 10, (50, 80, 90, 100)
    alerts = alert_units(quota, thresholds)
    assert alerts == [5, 8, 9, 10]
    writer = harness.state.usage_writer
    transactions = 0
    charge_and_insert = writer._charge_and_insert

    async def counted(*args: object) -> object:
        nonlocal transactions
        transactions += 1
        return await charge_and_insert(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(writer, "_charge_and_insert", counted)
    now = utcnow()
    month = month_of(now)
    for start in range(quota + 2):
        tenant, _ = await create_tenant_with_key(harness, monthly_quota=quota)
        if start:
            async with harness.sessionmaker() as session:
                session.add(MonthlyUsage(tenant_id=tenant.id, month=month, units=start, requests=1))
                await session.commit()
        events = await usage_events(harness, [(tenant.id, now, "iris", "1", 1)] * batch)
        transactions = 0
        outcomes = await asyncio.gather(
            *(writer.charge(event, quota, thresholds) for event in events),
            return_exceptions=True,
        )
        served = sum(outcome is None for outcome in outcomes)
        expected = max(0, min(batch, quota - start))
        assert served == expected, (start, outcomes)
        assert all(isinstance(o, QuotaExceeded) for o in outcomes if o is not None)
        assert len(await _records(harness, tenant.id)) == served
        assert await _counter(harness, tenant.id) == start + served
        async with harness.sessionmaker() as session:
            rolled = await session.scalar(
                select(func.sum(UsageDaily.units)).where(UsageDaily.tenant_id == tenant.id)
            )
            payloads = (
                await session.scalars(select(Event.payload).where(Event.tenant_id == tenant.id))
            ).all()
        assert int(rolled or 0) == served
        types = [json.loads(payload)["type"] for payload in payloads]
        crossed = sorted(
            json.loads(p)["data"]["threshold"]
            for p in payloads
            if json.loads(p)["type"] == "usage.threshold"
        )
        assert crossed == crossed_thresholds(start, start + served, quota, thresholds)
        assert types.count("quota.exhausted") == (1 if served < batch else 0)
        if harness.backend.name == "postgres":
            passes_a_bound = start + batch > quota or any(
                start < alert <= start + batch for alert in alerts
            )
            assert transactions == (1 if passes_a_bound else 0), (start, batch)
