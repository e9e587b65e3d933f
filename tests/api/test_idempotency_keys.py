"""Idempotency-Key on the billable POST routes (issue 23): a retry is answered once and billed
once, on both backends."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import event, func, select, update

from auth.idempotency import (
    AlreadyAnswered,
    AnswerLookups,
    InFlightClaims,
    StoredResponse,
    prune_expired,
)
from auth.models import ApiKey, IdempotentResponse, Tenant, UsageRecord, utcnow
from auth.usage.ledger import UsageEvent
from tests.conftest import IRIS_SETOSA, Harness, bearer, create_admin_key, create_tenant_with_key
from tests.factories import usage_events

PREDICT = "/api/v1/predict"
BATCH = "/api/v1/predict/batch"
V2 = "/v2/models/iris/infer"
V2_BODY = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": IRIS_SETOSA}]}


def keyed(key: str, value: str) -> dict[str, str]:
    return {**bearer(key), "Idempotency-Key": value}


def sf(value: str) -> str:
    return f'"{value}"'


async def records(harness: Harness, tenant_id: uuid.UUID) -> tuple[int, int]:
    """The tenant's usage records and their units."""
    async with harness.sessionmaker() as session:
        count, units = (
            await session.execute(
                select(func.count(), func.coalesce(func.sum(UsageRecord.units), 0)).where(
                    UsageRecord.tenant_id == tenant_id
                )
            )
        ).one()
    return int(count), int(units)


async def change_tenant(harness: Harness, tenant_id: uuid.UUID, **values: object) -> None:
    """Change the tenant behind the app's back, as an operator would, and wait out the key
    cache (MODELGATE_KEY_CACHE_TTL_SECONDS, at most a second)."""
    async with harness.sessionmaker() as session:
        await session.execute(update(Tenant).where(Tenant.id == tenant_id).values(**values))
        await session.commit()
    await asyncio.sleep(1.1)


async def test_a_retry_is_the_first_answer_byte_for_byte_and_billed_once(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    idem = sf(f"order-{uuid.uuid4()}")
    first = await harness.client.post(
        BATCH, json={"instances": [IRIS_SETOSA] * 3}, headers=keyed(key, idem)
    )
    assert first.status_code == 200, first.text
    assert "Idempotency-Replayed" not in first.headers
    retries = [
        await harness.client.post(
            BATCH, json={"instances": [IRIS_SETOSA] * 3}, headers=keyed(key, idem)
        )
        for _ in range(2)
    ]
    for retry in retries:
        assert retry.status_code == 200
        assert retry.content == first.content
        assert retry.headers["Idempotency-Replayed"] == "true"
        assert retry.headers["content-type"] == first.headers["content-type"]
        assert retry.headers["X-Request-ID"] != first.headers["X-Request-ID"]
    assert await records(harness, tenant.id) == (1, 3)
    usage = (await harness.client.get("/api/v1/me/usage", headers=bearer(key))).json()
    assert (usage["total_requests"], usage["total_units"]) == (1, 3)
    assert usage["quota"]["used"] == 3
    month = utcnow().strftime("%Y-%m")
    export = await harness.client.get(
        "/api/v1/admin/billing/export",
        params={"month": month, "format": "csv"},
        headers=bearer(admin),
    )
    rows = [r for r in csv.DictReader(io.StringIO(export.text)) if r["tenant_id"] == str(tenant.id)]
    assert sum(int(r["requests"]) for r in rows) == 1
    assert sum(int(r["units"]) for r in rows) == 3


@pytest.mark.parametrize(
    ("path", "body"),
    [(PREDICT, {"features": IRIS_SETOSA}), (V2, V2_BODY)],
)
async def test_predict_and_v2_replay_their_stored_answer(
    harness: Harness, path: str, body: dict[str, object]
) -> None:
    tenant, key = await create_tenant_with_key(harness)
    idem = sf("same-string-on-every-route")
    first = await harness.client.post(path, json=body, headers=keyed(key, idem))
    again = await harness.client.post(path, json=body, headers=keyed(key, idem))
    assert first.status_code == again.status_code == 200, first.text
    assert again.content == first.content
    assert again.headers["Idempotency-Replayed"] == "true"
    assert await records(harness, tenant.id) == (1, 1)


async def test_the_key_is_scoped_to_the_route(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness)
    idem = sf("route-scope")
    one = await harness.client.post(
        PREDICT, json={"features": IRIS_SETOSA}, headers=keyed(key, idem)
    )
    batch = await harness.client.post(
        BATCH, json={"instances": [IRIS_SETOSA]}, headers=keyed(key, idem)
    )
    assert one.status_code == batch.status_code == 200
    assert "Idempotency-Replayed" not in batch.headers
    assert await records(harness, tenant.id) == (2, 2)


async def test_twenty_concurrent_requests_with_one_key_are_served_and_billed_once(
    harness: Harness,
) -> None:
    tenant, key = await create_tenant_with_key(harness)
    idem = sf(f"burst-{uuid.uuid4()}")
    body = {"instances": [IRIS_SETOSA] * 2}
    answers = await asyncio.gather(
        *[harness.client.post(BATCH, json=body, headers=keyed(key, idem)) for _ in range(20)]
    )
    served = [
        a for a in answers if a.status_code == 200 and "Idempotency-Replayed" not in a.headers
    ]
    replayed = [a for a in answers if a.headers.get("Idempotency-Replayed") == "true"]
    busy = [a for a in answers if a.status_code == 409]
    assert len(served) == 1
    assert len(served) + len(replayed) + len(busy) == 20
    assert all(a.json()["type"] == "idempotency-key-in-use" for a in busy)
    assert all(a.headers["Retry-After"] == "1" for a in busy)
    assert all(a.content == served[0].content for a in replayed)
    assert await records(harness, tenant.id) == (1, 2)
    after = await harness.client.post(BATCH, json=body, headers=keyed(key, idem))
    assert after.content == served[0].content
    assert await records(harness, tenant.id) == (1, 2)


async def test_the_same_key_with_another_body_is_422(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness)
    idem = sf("body-bound")
    first = await harness.client.post(
        PREDICT, json={"features": IRIS_SETOSA}, headers=keyed(key, idem)
    )
    assert first.status_code == 200
    other = await harness.client.post(
        PREDICT, json={"features": [6.0, 3.0, 4.8, 1.8]}, headers=keyed(key, idem)
    )
    assert other.status_code == 422
    assert other.json()["type"] == "idempotency-key-reused"
    # The same JSON with other bytes (spacing) is another body too: the fingerprint is of bytes.
    spaced = await harness.client.post(
        PREDICT,
        content=b'{"features": [5.1, 3.5, 1.4, 0.2] }',
        headers={**keyed(key, idem), "Content-Type": "application/json"},
    )
    assert spaced.status_code == 422
    assert await records(harness, tenant.id) == (1, 1)


async def test_another_tenant_with_the_same_key_string_is_served_independently(
    harness: Harness,
) -> None:
    first_tenant, first_key = await create_tenant_with_key(harness)
    second_tenant, second_key = await create_tenant_with_key(harness)
    idem = sf("shared-string")
    body = {"features": IRIS_SETOSA}
    a = await harness.client.post(PREDICT, json=body, headers=keyed(first_key, idem))
    b = await harness.client.post(PREDICT, json=body, headers=keyed(second_key, idem))
    assert a.status_code == b.status_code == 200
    assert "Idempotency-Replayed" not in b.headers
    assert a.json()["prediction_id"] != b.json()["prediction_id"]
    # The other tenant's different body is not a reuse of the first tenant's key.
    c = await harness.client.post(
        BATCH, json={"instances": [IRIS_SETOSA]}, headers=keyed(second_key, idem)
    )
    assert c.status_code == 200
    assert await records(harness, first_tenant.id) == (1, 1)
    assert await records(harness, second_tenant.id) == (2, 2)


async def test_a_request_refused_by_the_quota_can_be_retried_with_its_key(
    harness: Harness,
) -> None:
    tenant, key = await create_tenant_with_key(harness, monthly_quota=4)
    spent = await harness.client.post(
        BATCH, json={"instances": [IRIS_SETOSA] * 2}, headers=bearer(key)
    )
    assert spent.status_code == 200
    idem = sf("after-the-quota")
    body = {"instances": [IRIS_SETOSA] * 3}
    # Refused by the usage writer's quota decision, in the transaction that would have stored
    # the answer.
    refused = await harness.client.post(BATCH, json=body, headers=keyed(key, idem))
    assert refused.status_code == 429
    assert refused.json()["type"] == "quota-exceeded"
    assert await records(harness, tenant.id) == (1, 2)
    # The operator raises the quota; the same key is served and billed once.
    await change_tenant(harness, tenant.id, monthly_quota=10)
    served = await harness.client.post(BATCH, json=body, headers=keyed(key, idem))
    assert served.status_code == 200, served.text
    assert "Idempotency-Replayed" not in served.headers
    again = await harness.client.post(BATCH, json=body, headers=keyed(key, idem))
    assert again.headers["Idempotency-Replayed"] == "true"
    assert await records(harness, tenant.id) == (2, 5)


async def test_a_request_refused_by_the_rate_limit_can_be_retried_with_its_key(
    harness: Harness,
) -> None:
    tenant, key = await create_tenant_with_key(harness, rate_limit="1/minute")
    body = {"features": IRIS_SETOSA}
    assert (await harness.client.post(PREDICT, json=body, headers=bearer(key))).status_code == 200
    idem = sf("after-the-rate-limit")
    refused = await harness.client.post(PREDICT, json=body, headers=keyed(key, idem))
    assert refused.status_code == 429
    assert refused.json()["type"] == "rate-limited"
    await change_tenant(harness, tenant.id, rate_limit="100/minute")
    served = await harness.client.post(PREDICT, json=body, headers=keyed(key, idem))
    assert served.status_code == 200, served.text
    assert "Idempotency-Replayed" not in served.headers
    again = await harness.client.post(PREDICT, json=body, headers=keyed(key, idem))
    assert again.headers["Idempotency-Replayed"] == "true"
    assert again.content == served.content
    assert await records(harness, tenant.id) == (2, 2)


async def test_a_replay_costs_no_rate_limit_unit(harness: Harness) -> None:
    _tenant, key = await create_tenant_with_key(harness, rate_limit="2/minute")
    body = {"features": IRIS_SETOSA}
    idem = sf("replayed-past-the-limit")
    served = await harness.client.post(PREDICT, json=body, headers=keyed(key, idem))
    assert served.status_code == 200, served.text
    for _ in range(3):
        again = await harness.client.post(PREDICT, json=body, headers=keyed(key, idem))
        assert again.status_code == 200, again.text
        assert again.headers["Idempotency-Replayed"] == "true"
    # The replays left the second unit of the minute: a new request is served, the next refused.
    assert (await harness.client.post(PREDICT, json=body, headers=bearer(key))).status_code == 200
    refused = await harness.client.post(PREDICT, json=body, headers=bearer(key))
    assert refused.status_code == 429
    # Past the limit, the stored answer is still the retry's; a new key is limited.
    again = await harness.client.post(PREDICT, json=body, headers=keyed(key, idem))
    assert again.status_code == 200
    assert again.content == served.content
    fresh = await harness.client.post(PREDICT, json=body, headers=keyed(key, sf("new")))
    assert fresh.status_code == 429


async def test_a_key_without_the_predict_scope_gets_no_replay(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness)
    body = {"features": IRIS_SETOSA}
    idem = sf("scope-taken-away")
    served = await harness.client.post(PREDICT, json=body, headers=keyed(key, idem))
    assert served.status_code == 200, served.text
    async with harness.sessionmaker() as session:
        await session.execute(
            update(ApiKey).where(ApiKey.tenant_id == tenant.id).values(scopes="usage:read")
        )
        await session.commit()
    await asyncio.sleep(1.1)
    refused = await harness.client.post(PREDICT, json=body, headers=keyed(key, idem))
    assert refused.status_code == 403, refused.text


@pytest.mark.parametrize(
    "values",
    [
        ["plain-token"],
        ['""'],
        [sf("x" * 256)],
        [sf("tab\there")],
        ['"bad\\escape"'],
        [sf("one"), sf("two")],
        [sf("caf\u00e9").encode()],
        [b'"\x00"'],
    ],
)
async def test_a_bad_key_is_a_400_problem(harness: Harness, values: list[str | bytes]) -> None:
    tenant, key = await create_tenant_with_key(harness)
    headers = [("Authorization", f"Bearer {key}")] + [("Idempotency-Key", v) for v in values]
    try:
        response = await harness.client.post(
            PREDICT, json={"features": IRIS_SETOSA}, headers=headers
        )
    except UnicodeEncodeError:
        pytest.skip("httpx refuses to send a non-ASCII header")
    assert response.status_code == 400, response.text
    assert response.json()["type"] == "idempotency-key-invalid"
    assert await records(harness, tenant.id) == (0, 0)


async def test_a_key_with_escapes_and_255_characters_is_accepted(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    value = '"' + 'a\\"b\\\\' + "c" * 250 + '"'
    response = await harness.client.post(
        PREDICT, json={"features": IRIS_SETOSA}, headers=keyed(key, value)
    )
    assert response.status_code == 200, response.text


async def test_concurrent_lookups_share_one_statement_and_get_their_own_answers(
    harness: Harness,
) -> None:
    tenant, key = await create_tenant_with_key(harness)
    body = {"features": IRIS_SETOSA}
    stored = {}
    for index in range(5):
        idem = sf(f"looked-up-{index}")
        answer = await harness.client.post(PREDICT, json=body, headers=keyed(key, idem))
        assert answer.status_code == 200
        stored[idem] = answer.content
    async with harness.sessionmaker() as session:
        scopes = (
            await session.scalars(
                select(IdempotentResponse.scope).where(IdempotentResponse.tenant_id == tenant.id)
            )
        ).all()
    unknown = [uuid.uuid4().bytes * 2 for _ in range(15)]
    checkouts = 0

    def count(*_: object) -> None:
        nonlocal checkouts
        checkouts += 1

    pool = harness.state.engine.sync_engine.pool
    event.listen(pool, "checkout", count)
    try:
        lookups = AnswerLookups(harness.state.engine)
        found = await asyncio.gather(*[lookups.get(scope) for scope in [*scopes, *unknown]])
    finally:
        event.remove(pool, "checkout", count)
    assert checkouts == 1
    assert [answer.scope for answer in found[: len(scopes)]] == list(scopes)
    assert {answer.body for answer in found[: len(scopes)]} == set(stored.values())
    assert found[len(scopes) :] == [None] * len(unknown)


async def test_expired_answers_are_served_again_and_pruned_in_bulk(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness)
    body = {"features": IRIS_SETOSA}
    for index in range(3):
        ok = await harness.client.post(PREDICT, json=body, headers=keyed(key, sf(f"old-{index}")))
        assert ok.status_code == 200
    async with harness.sessionmaker() as session:
        await session.execute(
            update(IdempotentResponse)
            .where(IdempotentResponse.tenant_id == tenant.id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        await session.commit()
    # An expired answer is not replayed: the request is served (and billed) anew.
    again = await harness.client.post(PREDICT, json=body, headers=keyed(key, sf("old-0")))
    assert again.status_code == 200
    assert "Idempotency-Replayed" not in again.headers
    assert await records(harness, tenant.id) == (4, 4)
    assert await prune_expired(harness.sessionmaker, batch=1) >= 2
    async with harness.sessionmaker() as session:
        left = await session.scalar(
            select(func.count())
            .select_from(IdempotentResponse)
            .where(IdempotentResponse.tenant_id == tenant.id)
        )
    assert left == 1


async def test_a_key_answered_by_an_earlier_flush_is_not_billed_by_a_later_one(
    harness: Harness,
) -> None:
    """Two workers racing past their lookups: the second charge of one key reaches the usage
    writer after the first's flush committed. Its answer's row conflicts, so it is not billed
    (``AlreadyAnswered``) and the first answer stays the stored one."""
    tenant, _ = await create_tenant_with_key(harness)
    writer = harness.state.usage_writer
    now = utcnow()
    scope = uuid.uuid4().bytes * 2

    def keyed_event(event: UsageEvent, body: bytes) -> UsageEvent:
        answer = StoredResponse(
            scope=scope,
            tenant_id=event.tenant_id,
            api_key_id=event.api_key_id,
            fingerprint=b"f" * 32,
            status_code=200,
            headers={"content-type": "application/json"},
            body=body,
            created_at=now,
            expires_at=now + timedelta(days=1),
        )
        return dataclasses.replace(event, response=answer)

    first, second = await usage_events(harness, [(tenant.id, now, "iris", "1", 2)] * 2)
    await writer.charge(keyed_event(first, b"first"), None)
    with pytest.raises(AlreadyAnswered):
        await writer.charge(keyed_event(second, b"second"), None)
    assert await records(harness, tenant.id) == (1, 2)
    async with harness.sessionmaker() as session:
        stored = await session.scalar(
            select(IdempotentResponse.body).where(IdempotentResponse.scope == scope)
        )
    assert stored == b"first"


async def test_a_key_is_billed_once_even_when_no_claim_holds_it(harness: Harness) -> None:
    """The claims only spare a duplicate its inference: with claims that expire at once (a
    worker that died, two workers racing), the usage writer's transaction still bills the key
    once, and every duplicate is answered with the first answer."""
    tenant, key = await create_tenant_with_key(harness)
    claims = harness.state.idempotency_claims
    harness.state.idempotency_claims = InFlightClaims(None, ttl_seconds=0)
    try:
        idem = sf(f"unclaimed-{uuid.uuid4()}")
        body = {"instances": [IRIS_SETOSA] * 2}
        answers = await asyncio.gather(
            *[harness.client.post(BATCH, json=body, headers=keyed(key, idem)) for _ in range(20)]
        )
    finally:
        harness.state.idempotency_claims = claims
    assert {a.status_code for a in answers} <= {200, 409}
    bodies = {a.content for a in answers if a.status_code == 200}
    assert len(bodies) == 1
    assert (
        sum("Idempotency-Replayed" not in a.headers for a in answers if a.status_code == 200) >= 1
    )
    assert await records(harness, tenant.id) == (1, 2)
