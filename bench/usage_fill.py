"""Fill a tenant's usage: ``python -m bench.usage_fill --database-url URL --tenant ID --rows N
--days D``.

Writes N usage records for the tenant (on its oldest key), spread evenly over the D UTC days that
end today, through the service's own write path (the transaction ``auth.usage.writer.UsageWriter``
commits for a flush: records, monthly counters and daily rollups together, 5,000 records each),
and prints its rate. Quotas are
not checked: this is test data, not traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from auth.db import create_engine, create_sessionmaker
from auth.models import ApiKey, Tenant
from auth.usage.ledger import UsageEvent
from auth.usage.writer import UsageWriter

# Records per transaction (the service's own flushes hold at most 5,000).
BATCH = 5_000


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.usage_fill", description=__doc__)
    parser.add_argument("--database-url", required=True, help="SQLAlchemy async URL")
    parser.add_argument("--tenant", required=True, type=uuid.UUID, help="the tenant's id")
    parser.add_argument("--rows", required=True, type=int, help="records to write")
    parser.add_argument("--days", type=int, default=31, help="UTC days ending today (31)")
    return parser


async def fill(database_url: str, tenant_id: uuid.UUID, rows: int, days: int) -> float:
    """Write the records; returns the rate in records per second."""
    engine = create_engine(database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            tenant = await session.get(Tenant, tenant_id)
            if tenant is None:
                raise SystemExit(f"no tenant {tenant_id}")
            plan_id = tenant.plan_id
            key_id = await session.scalar(
                select(ApiKey.id)
                .where(ApiKey.tenant_id == tenant_id)
                .order_by(ApiKey.created_at)
                .limit(1)
            )
            if key_id is None:
                raise SystemExit(f"tenant {tenant_id} has no key")
        writer = UsageWriter(engine)
        now = datetime.now(UTC)
        first_day = (now - timedelta(days=days - 1)).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        span = (now - first_day).total_seconds()
        started = time.monotonic()
        try:
            for chunk_start in range(0, rows, BATCH):
                events = [
                    UsageEvent(
                        request_id=uuid.uuid4(),
                        tenant_id=tenant_id,
                        api_key_id=key_id,
                        model="iris",
                        model_version="1",
                        plan_id=plan_id,
                        units=1,
                        status_code=200,
                        latency_ms=1.0,
                        # Evenly spread from the first day's midnight to now.
                        created_at=first_day + timedelta(seconds=span * index / rows),
                    )
                    for index in range(chunk_start, min(rows, chunk_start + BATCH))
                ]
                await writer.write_unmetered(events)
                done = chunk_start + len(events)
                rate = done / (time.monotonic() - started)
                print(f"\r{done:,} / {rows:,} records, {rate:,.0f}/s", end="", file=sys.stderr)
        finally:
            await writer.close()
        print(file=sys.stderr)
        return rows / (time.monotonic() - started)
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    if not 1 <= args.rows <= 100_000_000 or not 1 <= args.days <= 3660:
        raise SystemExit("--rows must be 1 to 100,000,000 and --days 1 to 3,660")
    rate = asyncio.run(fill(args.database_url, args.tenant, args.rows, args.days))
    print(f"wrote {args.rows} records over {args.days} days at {rate:,.0f} records/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
