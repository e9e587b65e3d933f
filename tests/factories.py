"""Small factories for tests that need data the API cannot make on demand (usage on past days)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import select

from auth.models import ApiKey, MonthlyUsage, UsageRecord
from tests.conftest import Harness


def utc_at(day: str, clock: str = "12:00:00") -> datetime:
    """A timezone-aware UTC moment, e.g. ``utc_at("2001-02-28", "23:59:59.999999")``."""
    return datetime.fromisoformat(f"{day}T{clock}+00:00")


async def insert_usage(
    harness: Harness, records: list[tuple[uuid.UUID, datetime, str, str, int]]
) -> None:
    """Usage records (tenant id, when, model, version, units) written as the usage writer
    stores them, for any day, with each tenant-month counter equal to the sum of its records.
    Each tenant must already have a key (the records name it)."""
    counters: dict[tuple[uuid.UUID, str], tuple[int, int]] = {}
    async with harness.sessionmaker() as session:
        for tenant_id, created_at, model, version, units in records:
            key_id = await session.scalar(select(ApiKey.id).where(ApiKey.tenant_id == tenant_id))
            assert key_id is not None, "the tenant has no key"
            session.add(
                UsageRecord(
                    request_id=uuid.uuid4(),
                    tenant_id=tenant_id,
                    api_key_id=key_id,
                    model=model,
                    model_version=version,
                    units=units,
                    status_code=200,
                    latency_ms=1.0,
                    created_at=created_at,
                )
            )
            month = created_at.strftime("%Y-%m")
            used, requests = counters.get((tenant_id, month), (0, 0))
            counters[(tenant_id, month)] = (used + units, requests + 1)
        for (tenant_id, month), (used, requests) in counters.items():
            session.add(
                MonthlyUsage(tenant_id=tenant_id, month=month, units=used, requests=requests)
            )
        await session.commit()
