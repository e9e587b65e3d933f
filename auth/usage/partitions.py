"""Monthly partitions of ``usage_record`` on Postgres (SQLite keeps one table).

The raw records only ever grow, and are read by month (rebuilding rollups, audits) and deleted
by age (``modelgate usage prune``): one partition per UTC month keeps each month's indexes small
and lets a prune drop whole months instead of deleting their rows one by one. A month's partition
is created when the first record of that month is written (by the usage writer, under an
advisory lock, so concurrent writers create it once), so no month can lack one, whatever the
date: there is no default partition to fill up.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

# pg_advisory_xact_lock's key for creating partitions ("mgup").
_PARTITION_LOCK = 0x6D677570
_MONTH = re.compile(r"^(2[0-9]{3})-(0[1-9]|1[0-2])$")
_PARTITION_NAME = re.compile(r"^usage_record_(2[0-9]{3})_(0[1-9]|1[0-2])$")

IS_PARTITIONED = (
    "SELECT EXISTS (SELECT 1 FROM pg_partitioned_table "
    "WHERE partrelid = to_regclass('usage_record'))"
)
_PARTITIONS = (
    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
    "WHERE i.inhparent = to_regclass('usage_record')"
)


def _first_days(month: str) -> tuple[date, date]:
    """The first day of a ``YYYY-MM`` month (the product's years 2000-2999) and of the next."""
    match = _MONTH.fullmatch(month)
    if match is None:
        raise ValueError(f"not a month of the product's calendar: {month!r}")
    year, number = int(match[1]), int(match[2])
    following = date(year + 1, 1, 1) if number == 12 else date(year, number + 1, 1)
    return date(year, number, 1), following


def partition_name(month: str) -> str:
    """``usage_record_YYYY_MM``."""
    _first_days(month)  # validated: the name is put into DDL, where nothing can be bound
    return "usage_record_" + month.replace("-", "_")


def create_partition_sql(month: str) -> str:
    """The DDL of one month's partition (a no-op when it exists)."""
    first, following = _first_days(month)
    return (
        f"CREATE TABLE IF NOT EXISTS {partition_name(month)} PARTITION OF usage_record "
        f"FOR VALUES FROM ('{first.isoformat()} 00:00:00+00') "
        f"TO ('{following.isoformat()} 00:00:00+00')"
    )


async def create_partitions(driver: Any, months: set[str]) -> None:
    """Create the partitions of these months that do not exist yet, on an asyncpg connection,
    in a transaction of their own; concurrent callers (other workers) wait for one another."""
    async with driver.transaction():
        await driver.execute(f"SELECT pg_advisory_xact_lock({_PARTITION_LOCK})")
        for month in sorted(months):
            await driver.execute(create_partition_sql(month))


async def drop_months_before(session: AsyncSession, before: date) -> int:
    """Drop the partitions of every month that ends on or before ``before`` (so holds only
    records older than it); returns how many records they held. Postgres only; the caller
    commits."""
    names = (await session.execute(text(_PARTITIONS))).scalars().all()
    dropped = 0
    for name in sorted(names):
        match = _PARTITION_NAME.fullmatch(name)
        if match is None:
            continue  # not one of ours: never dropped
        month = f"{match[1]}-{match[2]}"
        if _first_days(month)[1] > before:
            continue
        # Only names that matched the pattern reach the SQL.
        count = await session.scalar(text(f"SELECT count(*) FROM {name}"))  # noqa: S608
        await session.execute(text(f"DROP TABLE {name}"))
        dropped += int(count or 0)
    return dropped


def months_between(first: datetime, last: datetime) -> set[str]:
    """Every ``YYYY-MM`` from the month of ``first`` to the month of ``last`` (UTC moments)."""
    months = set()
    year, month = first.year, first.month
    while (year, month) <= (last.year, last.month):
        months.add(f"{year:04d}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return months
