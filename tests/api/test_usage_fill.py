"""bench/usage_fill.py writes through the service's write path: records spread evenly over the
days asked for, with their rollups and monthly counters."""

from __future__ import annotations

from sqlalchemy import func, select

from auth.models import MonthlyUsage, UsageDaily, UsageRecord, utcnow
from bench.usage_fill import fill
from tests.conftest import Harness, create_tenant_with_key


async def test_the_fill_spreads_records_over_the_days_with_their_rollups(
    harness: Harness,
) -> None:
    tenant, _ = await create_tenant_with_key(harness)
    rate = await fill(harness.backend.database_url, tenant.id, rows=300, days=3)
    assert rate > 0
    async with harness.sessionmaker() as session:
        records = await session.scalar(
            select(func.count()).where(UsageRecord.tenant_id == tenant.id)
        )
        days = (
            await session.execute(
                select(UsageDaily.day, UsageDaily.requests)
                .where(UsageDaily.tenant_id == tenant.id)
                .order_by(UsageDaily.day)
            )
        ).all()
        counted = await session.scalar(
            select(func.sum(MonthlyUsage.units)).where(MonthlyUsage.tenant_id == tenant.id)
        )
    assert records == counted == 300
    assert len(days) == 3
    assert days[-1].day == utcnow().date()
    assert sum(row.requests for row in days) == 300
    # Evenly: the first two days are whole and get the same share; today gets what is left.
    assert abs(days[0].requests - days[1].requests) <= 1
    assert days[2].requests <= days[0].requests + 1
