"""The audit trail: what the routes record, GET /admin/audit's filters and cursor, the hash chain
that detects an edited, deleted or reordered event, and the triggers that keep it append-only."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from auth.audit import verify_chain
from tests.conftest import Harness, bearer, create_admin_key, create_tenant_with_key, unique


async def _create_tenant(harness: Harness, admin: str, **headers: str) -> dict[str, Any]:
    response = await harness.client.post(
        "/api/v1/admin/tenants",
        json={"name": unique("audited")},
        headers={**bearer(admin), **headers},
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def _audit(harness: Harness, admin: str, **params: Any) -> dict[str, Any]:
    response = await harness.client.get("/api/v1/admin/audit", params=params, headers=bearer(admin))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_each_change_is_recorded_with_who_what_when_and_from_where(
    harness: Harness,
) -> None:
    admin = await create_admin_key(harness)
    tenant = await _create_tenant(harness, admin, **{"User-Agent": "audit-test/1.0"})
    suspended = await harness.client.patch(
        f"/api/v1/admin/tenants/{tenant['id']}", json={"status": "suspended"}, headers=bearer(admin)
    )
    assert suspended.status_code == 200
    page = await _audit(harness, admin, tenant_id=tenant["id"])
    suspend, create = page["events"]
    assert create["action"] == "tenant.create"
    assert create["target_id"] == tenant["id"]
    assert create["user_agent"] == "audit-test/1.0"
    assert create["client_addr"] == "127.0.0.1"
    assert create["actor"].startswith("admin:")
    assert create["actor_key_id"] is not None
    uuid.UUID(create["request_id"])
    assert create["detail"]["name"] == tenant["name"]
    assert suspend["action"] == "tenant.suspend"
    assert suspend["detail"] == {"status": "suspended"}
    assert suspend["prev_hash"] != create["prev_hash"]
    assert page["next_cursor"] is None


async def test_filters_and_cursor_walk_every_matching_event_once(harness: Harness) -> None:
    admin = await create_admin_key(harness)
    tenants = [await _create_tenant(harness, admin) for _ in range(5)]
    actor = (await _audit(harness, admin, tenant_id=tenants[0]["id"]))["events"][0]["actor"]
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"actor": actor, "action": "tenant.create", "limit": 2}
        if cursor is not None:
            params["cursor"] = cursor
        page = await _audit(harness, admin, **params)
        seen.extend(event["target_id"] for event in page["events"])
        assert len(page["events"]) <= 2
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [t["id"] for t in reversed(tenants)]
    first = (await _audit(harness, admin, tenant_id=tenants[0]["id"]))["events"][0]
    window = await _audit(harness, admin, since=first["created_at"], action="tenant.create")
    assert tenants[0]["id"] in [event["target_id"] for event in window["events"]]
    later = await _audit(harness, admin, until=first["created_at"], tenant_id=tenants[0]["id"])
    assert later["events"] == []


@pytest.mark.parametrize(
    "params",
    [
        {"cursor": 0},
        {"cursor": 2**63},
        {"limit": 10_000},
        {"since": "2026-01-01T00:00:00"},  # no zone
        {"since": "9999-12-31T23:59:59+00:00"},
        {"action": "DROP TABLE"},
        {"actor": "a\x00b"},
        {"tenant_id": "1 OR 1=1"},
    ],
)
async def test_hostile_filters_are_refused_with_422(
    harness: Harness, params: dict[str, Any]
) -> None:
    admin = await create_admin_key(harness)
    response = await harness.client.get("/api/v1/admin/audit", params=params, headers=bearer(admin))
    assert response.status_code == 422, response.text
    assert response.json()["errors"]


async def test_a_tenant_credential_cannot_read_the_trail(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness)
    response = await harness.client.get("/api/v1/admin/audit", headers=bearer(key))
    assert response.status_code == 403


@asynccontextmanager
async def tampering(harness: Harness) -> AsyncIterator[AsyncSession]:
    """A session where the append-only triggers are off, as for someone with the database's
    owner rights; everything it does is rolled back."""
    async with harness.sessionmaker() as session:
        if harness.backend.name == "postgres":
            await session.execute(text("ALTER TABLE audit_event DISABLE TRIGGER USER"))
        else:
            # pysqlite opens the transaction at the first write only: open it before the DDL
            # so that dropping the triggers is rolled back too.
            await session.execute(text("UPDATE audit_chain_head SET id = id"))
            await session.execute(text("DROP TRIGGER audit_event_no_update"))
            await session.execute(text("DROP TRIGGER audit_event_no_delete"))
        try:
            yield session
        finally:
            await session.rollback()


async def _recent_event_ids(harness: Harness, count: int) -> list[int]:
    admin = await create_admin_key(harness)
    for _ in range(count):
        await _create_tenant(harness, admin)
    page = await _audit(harness, admin, limit=count)
    return sorted(event["id"] for event in page["events"])


async def test_an_intact_chain_verifies(harness: Harness) -> None:
    await _recent_event_ids(harness, 3)
    async with harness.sessionmaker() as session:
        report = await verify_chain(session)
    assert report.intact, report.problem
    assert report.events >= 3


async def test_an_edited_event_is_named(harness: Harness) -> None:
    _, middle, _ = await _recent_event_ids(harness, 3)
    async with tampering(harness) as session:
        await session.execute(
            text("UPDATE audit_event SET actor = 'admin:someone-else' WHERE id = :id"),
            {"id": middle},
        )
        report = await verify_chain(session)
    assert report.first_bad_id == middle
    assert report.problem == f"event {middle} was edited"


async def test_an_edited_last_event_is_named(harness: Harness) -> None:
    *_, last = await _recent_event_ids(harness, 2)
    async with tampering(harness) as session:
        await session.execute(
            text("UPDATE audit_event SET target_id = 'forged' WHERE id = :id"), {"id": last}
        )
        report = await verify_chain(session)
    assert report.first_bad_id == last


async def test_a_deleted_event_is_named(harness: Harness) -> None:
    _, middle, _ = await _recent_event_ids(harness, 3)
    async with tampering(harness) as session:
        await session.execute(text("DELETE FROM audit_event WHERE id = :id"), {"id": middle})
        report = await verify_chain(session)
    assert report.first_bad_id == middle
    assert report.problem == f"event {middle} is missing"


async def test_a_deleted_last_event_is_named(harness: Harness) -> None:
    *_, last = await _recent_event_ids(harness, 2)
    async with tampering(harness) as session:
        await session.execute(text("DELETE FROM audit_event WHERE id = :id"), {"id": last})
        report = await verify_chain(session)
    assert report.first_bad_id == last
    assert "deleted" in (report.problem or "")


async def test_reordered_events_are_named(harness: Harness) -> None:
    first, second, _ = await _recent_event_ids(harness, 3)
    async with tampering(harness) as session:
        # Swap the two events' positions (a free id in between keeps the key unique).
        swap = {"a": first, "b": second, "spare": -first}
        await session.execute(text("UPDATE audit_event SET id = :spare WHERE id = :a"), swap)
        await session.execute(text("UPDATE audit_event SET id = :a WHERE id = :b"), swap)
        await session.execute(text("UPDATE audit_event SET id = :b WHERE id = :spare"), swap)
        report = await verify_chain(session)
    assert report.first_bad_id == first
    assert "does not follow" in (report.problem or "")


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_event SET actor = 'nobody'",
        "DELETE FROM audit_event",
    ],
)
async def test_the_application_cannot_change_or_delete_events(
    harness: Harness, statement: str
) -> None:
    await _recent_event_ids(harness, 1)
    async with harness.sessionmaker() as session:
        with pytest.raises(DBAPIError, match="append-only"):
            await session.execute(text(statement))
        await session.rollback()
        report = await verify_chain(session)
    assert report.intact


async def test_concurrent_changes_extend_the_chain_one_after_the_other(harness: Harness) -> None:
    """Many admin calls at once, on several connections of the pool: every event follows the
    one before it (no two extend the same event)."""
    admin = await create_admin_key(harness)
    results = await asyncio.gather(*[_create_tenant(harness, admin) for _ in range(12)])
    assert len({tenant["id"] for tenant in results}) == 12
    async with harness.sessionmaker() as session:
        report = await verify_chain(session)
    assert report.intact, report.problem


async def test_each_token_minted_is_recorded_without_the_token(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness)
    minted = await harness.client.post(
        "/api/v1/auth/token", data={"grant_type": "client_credentials", "client_secret": key}
    )
    assert minted.status_code == 200, minted.text
    admin = await create_admin_key(harness)
    page = await _audit(harness, admin, tenant_id=str(tenant.id), action="token.issue")
    [event] = page["events"]
    assert event["actor"] == f"tenant:{tenant.id}"
    assert event["detail"]["grant_type"] == "client_credentials"
    assert event["detail"]["scopes"] == ["predict", "usage:read"]
    token = minted.json()["access_token"]
    assert token not in str(page)
    assert key not in str(page)
