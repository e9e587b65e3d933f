"""Small factories for tests that need data the API cannot make on demand (usage on past days)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime

from sqlalchemy import select

from auth.models import ApiKey, Tenant
from auth.usage.ledger import UsageEvent
from tests.conftest import Harness


def utc_at(day: str, clock: str = "12:00:00") -> datetime:
    """A timezone-aware UTC moment, e.g. ``utc_at("2001-02-28", "23:59:59.999999")``."""
    return datetime.fromisoformat(f"{day}T{clock}+00:00")


async def usage_events(
    harness: Harness, records: list[tuple[uuid.UUID, datetime, str, str, int]]
) -> list[UsageEvent]:
    """Usage events (tenant id, when, model, version, units) as a request would bill them, for
    any moment. Each tenant must already have a key (the events name it)."""
    events = []
    async with harness.sessionmaker() as session:
        for tenant_id, created_at, model, version, units in records:
            key_id = await session.scalar(select(ApiKey.id).where(ApiKey.tenant_id == tenant_id))
            assert key_id is not None, "the tenant has no key"
            plan_id = await session.scalar(select(Tenant.plan_id).where(Tenant.id == tenant_id))
            assert plan_id is not None
            events.append(
                UsageEvent(
                    request_id=uuid.uuid4(),
                    tenant_id=tenant_id,
                    api_key_id=key_id,
                    model=model,
                    model_version=version,
                    plan_id=plan_id,
                    units=units,
                    status_code=200,
                    latency_ms=1.0,
                    created_at=created_at,
                )
            )
    return events


async def insert_usage(
    harness: Harness, records: list[tuple[uuid.UUID, datetime, str, str, int]]
) -> None:
    """Usage records (tenant id, when, model, version, units) for any day, written through the
    app's usage writer (the one write path: records, monthly counters and daily rollups in one
    transaction), with no quota. Each tenant must already have a key (the records name it)."""
    events = await usage_events(harness, records)
    writer = harness.state.usage_writer
    await asyncio.gather(*(writer.charge(event, None) for event in events))
