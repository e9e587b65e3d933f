"""GET /admin/audit/verify: the whole chain's verification, as ``modelgate audit verify`` gives
it, over HTTP; admin only. Its own module: a test here commits a tampered event (and puts it
back), which the other modules' databases never see."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from auth.audit import verify_chain
from tests.conftest import Harness, bearer, create_admin_key, create_tenant_with_key, unique

VERIFY = "/api/v1/admin/audit/verify"


async def _verify(harness: Harness, credential: str) -> dict[str, Any]:
    response = await harness.client.get(VERIFY, headers=bearer(credential))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def _newest_event_id(harness: Harness, admin: str) -> int:
    page = await harness.client.get(
        "/api/v1/admin/audit", params={"limit": 1}, headers=bearer(admin)
    )
    newest: int = page.json()["events"][0]["id"]
    return newest


@asynccontextmanager
async def committed_tampering(harness: Harness) -> AsyncIterator[AsyncSession]:
    """Commit a change to the append-only trail behind the app's back (as the database's owner
    could), with the triggers that forbid it off only meanwhile."""
    async with harness.sessionmaker() as session:
        if harness.backend.name == "postgres":
            await session.execute(text("ALTER TABLE audit_event DISABLE TRIGGER USER"))
            yield session
            await session.execute(text("ALTER TABLE audit_event ENABLE TRIGGER USER"))
        else:
            await session.execute(text("UPDATE audit_chain_head SET id = id"))
            rows = await session.execute(
                text("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = :t"),
                {"t": "audit_event"},
            )
            triggers = [sql for (sql,) in rows]
            await session.execute(text("DROP TRIGGER audit_event_no_update"))
            await session.execute(text("DROP TRIGGER audit_event_no_delete"))
            yield session
            for sql in triggers:
                await session.execute(text(sql))
        await session.commit()


async def _set_actor(harness: Harness, event_id: int, actor: str) -> None:
    async with committed_tampering(harness) as session:
        await session.execute(
            text("UPDATE audit_event SET actor = :actor WHERE id = :id"),
            {"actor": actor, "id": event_id},
        )


async def test_an_intact_chain_is_reported_with_its_head(harness: Harness) -> None:
    admin = await create_admin_key(harness)
    for _ in range(3):
        created = await harness.client.post(
            "/api/v1/admin/tenants", json={"name": unique("verified")}, headers=bearer(admin)
        )
        assert created.status_code == 201
    body = await _verify(harness, admin)
    async with harness.sessionmaker() as session:
        report = await verify_chain(session)  # what `modelgate audit verify` prints
    assert body == {
        "intact": True,
        "events": report.events,
        "head": report.head_hash,
        "first_bad_id": None,
        "problem": None,
    }
    newest = await _newest_event_id(harness, admin)
    assert body["events"] == newest  # every event, from the first to the recorded end
    page = await harness.client.get(
        "/api/v1/admin/audit", params={"limit": 1}, headers=bearer(admin)
    )
    assert body["head"] == page.json()["events"][0]["hash"]


async def test_an_edited_event_is_named_until_it_is_put_back(harness: Harness) -> None:
    admin = await create_admin_key(harness)
    await harness.client.post(
        "/api/v1/admin/tenants", json={"name": unique("edited")}, headers=bearer(admin)
    )
    edited = await _newest_event_id(harness, admin)
    page = await harness.client.get(
        "/api/v1/admin/audit", params={"limit": 1}, headers=bearer(admin)
    )
    actor = page.json()["events"][0]["actor"]
    # A later event, so that the edited one is not the last.
    await harness.client.post(
        "/api/v1/admin/tenants", json={"name": unique("later")}, headers=bearer(admin)
    )
    await _set_actor(harness, edited, "admin:someone-else")
    try:
        body = await _verify(harness, admin)
        assert body["intact"] is False
        assert body["first_bad_id"] == edited
        assert body["problem"] == f"event {edited} was edited"
        assert body["events"] == edited - 1  # those verified before it
    finally:
        await _set_actor(harness, edited, actor)
    assert (await _verify(harness, admin))["intact"] is True


async def test_only_an_operator_may_verify(harness: Harness) -> None:
    _, key = await create_tenant_with_key(harness, scopes=("predict", "usage:read", "keys:manage"))
    assert (await harness.client.get(VERIFY, headers=bearer(key))).status_code == 403
    assert (await harness.client.get(VERIFY)).status_code == 401
