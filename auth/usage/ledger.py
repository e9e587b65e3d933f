"""Usage accounting: the billable event of each prediction, the monthly quota, and reports.

Records are written by ``auth.usage.writer.UsageWriter`` (group commit), the one write path."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal

from sqlalchemy import Date, cast, delete, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from auth.errors import InvalidRequest
from auth.idempotency import StoredResponse
from auth.models import ApiKey, MonthlyUsage, Plan, Tenant, UsageDaily, UsageRecord, utcnow
from auth.usage.partitions import drop_months_before

# A report may span at most this many days: the query stays bounded.
MAX_REPORT_DAYS = 366
# The calendar usage can be asked about. Every day in it, and the day after, is a valid date
# and timestamp on both databases, so no report's arithmetic can overflow.
EARLIEST_DAY = date(2000, 1, 1)
LATEST_DAY = date(2999, 12, 31)


def month_of(moment: datetime) -> str:
    """The quota period ("YYYY-MM", UTC) a moment falls in."""
    utc = moment if moment.tzinfo is UTC else moment.astimezone(UTC)
    return f"{utc.year:04d}-{utc.month:02d}"


def seconds_to_next_month(moment: datetime) -> int:
    """Whole seconds from ``moment`` until the next UTC month (the quota's reset)."""
    first = moment.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    following = (first + timedelta(days=32)).replace(day=1)
    return max(1, int((following - moment).total_seconds()))


# A daily rollup row's columns, key first: the usage writer's upsert and the rebuild fill them.
DAILY_COLUMNS = (
    "tenant_id",
    "day",
    "api_key_id",
    "model",
    "model_version",
    "plan_id",
    "requests",
    "units",
)


@dataclass(frozen=True)
class UsageEvent:
    """One successful prediction request, as it is billed."""

    request_id: uuid.UUID
    tenant_id: uuid.UUID
    api_key_id: uuid.UUID
    model: str
    model_version: str
    # The tenant's plan when the request was served: it prices the units.
    plan_id: uuid.UUID
    units: int
    status_code: int
    latency_ms: float
    created_at: datetime
    # Sent with an Idempotency-Key: its answer, stored in the transaction that bills it.
    response: StoredResponse | None = None


@dataclass(frozen=True)
class QuotaStatus:
    """The current month's quota position."""

    monthly_quota: int | None
    used: int
    remaining: int | None


async def quota_status(
    session: AsyncSession, tenant_id: uuid.UUID, monthly_quota: int | None
) -> QuotaStatus:
    """Units used this month against the quota."""
    used = await session.scalar(
        select(MonthlyUsage.units).where(
            MonthlyUsage.tenant_id == tenant_id, MonthlyUsage.month == month_of(utcnow())
        )
    )
    used = int(used or 0)
    remaining = None if monthly_quota is None else max(0, monthly_quota - used)
    return QuotaStatus(monthly_quota=monthly_quota, used=used, remaining=remaining)


def report_window(start: date | None, end: date | None) -> tuple[date, date]:
    """Default to the current month so far; refuse inverted or oversized windows."""
    today = utcnow().date()
    end = end or today
    start = start or end.replace(day=1)
    for name, day in (("start", start), ("end", end)):
        if not EARLIEST_DAY <= day <= LATEST_DAY:
            raise InvalidRequest(
                f"{name} must be between {EARLIEST_DAY} and {LATEST_DAY}", loc=(name,)
            )
    if start > end:
        raise InvalidRequest("start must not be after end", loc=("start",))
    if (end - start).days >= MAX_REPORT_DAYS:
        raise InvalidRequest(f"a report spans at most {MAX_REPORT_DAYS} days", loc=("start",))
    return start, end


def _as_date(value: Any) -> date:
    # Postgres returns a date; SQLite returns the text "YYYY-MM-DD".
    return value if isinstance(value, date) else date.fromisoformat(str(value))


@dataclass(frozen=True)
class DayUsage:
    """Requests and units on one UTC day."""

    date: date
    requests: int
    units: int


@dataclass(frozen=True)
class ModelUsage:
    """Requests and units for one model version."""

    model: str
    model_version: str
    requests: int
    units: int


@dataclass(frozen=True)
class DayModelUsage:
    """Requests and units for one model version on one UTC day."""

    date: date
    model: str
    model_version: str
    requests: int
    units: int


@dataclass(frozen=True)
class KeyUsage:
    """Requests and units of one API key."""

    api_key_id: uuid.UUID
    name: str
    prefix: str
    requests: int
    units: int


# The breakdowns a usage report may carry; by day and by model unless asked otherwise.
Breakdown = Literal["day", "model", "key"]
DEFAULT_BREAKDOWNS: tuple[Breakdown, ...] = ("day", "model")


@dataclass(frozen=True)
class UsageSummary:
    """A tenant's usage over a window of days, plus its current quota position."""

    tenant_id: uuid.UUID
    start: date
    end: date
    total_requests: int
    total_units: int
    quota: QuotaStatus
    by_day: list[DayUsage]
    by_model: list[ModelUsage]
    by_key: list[KeyUsage]
    # By day and model version together: filled when both the day and the model breakdowns are.
    by_day_and_model: list[DayModelUsage]


async def usage_summary(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    monthly_quota: int | None,
    start: date,
    end: date,
    breakdowns: Iterable[Breakdown] = DEFAULT_BREAKDOWNS,
) -> UsageSummary:
    """A tenant's usage between two UTC dates (inclusive) with the breakdowns asked for (the
    others are empty), from the daily rollups: the cost depends on the days, model versions and
    keys in the window, not on the number of records."""
    wanted = set(breakdowns)
    in_window = (
        UsageDaily.tenant_id == tenant_id,
        UsageDaily.day >= start,
        UsageDaily.day <= end,
    )
    requests, units = func.sum(UsageDaily.requests), func.sum(UsageDaily.units)
    total_requests, total_units = (
        await session.execute(select(requests, units).where(*in_window))
    ).one()
    by_day, by_model, by_key = [], [], []
    if "day" in wanted:
        day_rows = await session.execute(
            select(UsageDaily.day, requests, units)
            .where(*in_window)
            .group_by(UsageDaily.day)
            .order_by(UsageDaily.day)
        )
        by_day = [DayUsage(_as_date(d), int(r), int(u)) for d, r, u in day_rows]
    if "model" in wanted:
        model_rows = await session.execute(
            select(UsageDaily.model, UsageDaily.model_version, requests, units)
            .where(*in_window)
            .group_by(UsageDaily.model, UsageDaily.model_version)
            .order_by(UsageDaily.model, UsageDaily.model_version)
        )
        by_model = [ModelUsage(m, v, int(r), int(u)) for m, v, r, u in model_rows]
    if "key" in wanted:
        key_rows = await session.execute(
            select(ApiKey.id, ApiKey.name, ApiKey.display_prefix, requests, units)
            .join(ApiKey, ApiKey.id == UsageDaily.api_key_id)
            .where(*in_window)
            .group_by(ApiKey.id, ApiKey.name, ApiKey.display_prefix)
            .order_by(ApiKey.name, ApiKey.id)
        )
        by_key = [KeyUsage(i, n, p, int(r), int(u)) for i, n, p, r, u in key_rows]
    by_day_and_model = []
    if {"day", "model"} <= wanted:
        # One grouped query, as the billing export's (one row per day and model version).
        pair_rows = await session.execute(
            select(UsageDaily.day, UsageDaily.model, UsageDaily.model_version, requests, units)
            .where(*in_window)
            .group_by(UsageDaily.day, UsageDaily.model, UsageDaily.model_version)
            .order_by(UsageDaily.day, UsageDaily.model, UsageDaily.model_version)
        )
        by_day_and_model = [
            DayModelUsage(_as_date(d), m, v, int(r), int(u)) for d, m, v, r, u in pair_rows
        ]
    return UsageSummary(
        tenant_id=tenant_id,
        start=start,
        end=end,
        total_requests=int(total_requests or 0),
        total_units=int(total_units or 0),
        quota=await quota_status(session, tenant_id, monthly_quota),
        by_day=by_day,
        by_model=by_model,
        by_key=by_key,
        by_day_and_model=by_day_and_model,
    )


@dataclass(frozen=True)
class BillingRow:
    """One row of the billing export: a tenant's usage of one model version on one day under
    one plan, and what it costs."""

    tenant_id: uuid.UUID
    tenant_name: str
    date: date
    model: str
    model_version: str
    requests: int
    units: int
    plan: str
    price_per_1000_units: int
    currency: str

    @property
    def amount(self) -> int:
        """The row's price in the currency's minor unit: units times the price per 1,000 units,
        divided by 1,000 and rounded half up, in integers (no float ever touches money)."""
        return (self.units * self.price_per_1000_units + 500) // 1000


def parse_month(value: str) -> tuple[date, date]:
    """The first and last day of a ``YYYY-MM`` month."""
    try:
        first = datetime.strptime(value, "%Y-%m").date()
    except ValueError:
        raise InvalidRequest("month must be YYYY-MM", loc=("month",)) from None
    if not EARLIEST_DAY <= first <= LATEST_DAY:
        raise InvalidRequest(
            f"month must be between {EARLIEST_DAY:%Y-%m} and {LATEST_DAY:%Y-%m}", loc=("month",)
        )
    following = (first + timedelta(days=32)).replace(day=1)
    return first, following - timedelta(days=1)


async def billing_rows(session: AsyncSession, month: str) -> AsyncIterator[BillingRow]:
    """Stream the month's billing rows, ordered by tenant, day, model and version, from the
    daily rollups (read through their day index)."""
    start, end = parse_month(month)
    statement = (
        select(
            Tenant.id,
            Tenant.name,
            UsageDaily.day,
            UsageDaily.model,
            UsageDaily.model_version,
            func.sum(UsageDaily.requests),
            func.sum(UsageDaily.units),
            Plan.name,
            Plan.price_per_1000_units,
            Plan.currency,
        )
        .join(Tenant, Tenant.id == UsageDaily.tenant_id)
        .join(Plan, Plan.id == UsageDaily.plan_id)
        .where(UsageDaily.day >= start, UsageDaily.day <= end)
        .group_by(
            Tenant.id,
            Tenant.name,
            UsageDaily.day,
            UsageDaily.model,
            UsageDaily.model_version,
            Plan.id,
            Plan.name,
            Plan.price_per_1000_units,
            Plan.currency,
        )
        .order_by(
            Tenant.name,
            Tenant.id,
            UsageDaily.day,
            UsageDaily.model,
            UsageDaily.model_version,
            Plan.name,
        )
    )
    result = await session.stream(statement)
    async for tenant_id, name, d, model, version, requests, units, plan, price, currency in result:
        yield BillingRow(
            tenant_id,
            name,
            _as_date(d),
            model,
            version,
            int(requests),
            int(units),
            plan,
            int(price),
            currency,
        )


async def rebuild_rollups(session: AsyncSession) -> int:
    """Recompute the daily rollups from the raw records (a repair: the usage writer keeps them
    equal); returns the number of rollup rows rebuilt. Days before the oldest raw record are
    kept as they are: their records were pruned (``prune_records``), and the rollups are all
    that is left of them. The table is locked meanwhile on Postgres, so flushes wait for it:
    run it when the service is quiet."""
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(text("LOCK TABLE usage_daily IN EXCLUSIVE MODE"))
        day: Any = cast(func.timezone("UTC", UsageRecord.created_at), Date)
    else:
        day = func.date(UsageRecord.created_at)
    oldest = await session.scalar(select(func.min(UsageRecord.created_at)))
    if oldest is None:
        return 0
    first_day = oldest.astimezone(UTC).date() if isinstance(oldest, datetime) else oldest
    await session.execute(delete(UsageDaily).where(UsageDaily.day >= _as_date(first_day)))
    columns = (
        UsageRecord.tenant_id,
        day,
        UsageRecord.api_key_id,
        UsageRecord.model,
        UsageRecord.model_version,
        UsageRecord.plan_id,
    )
    await session.execute(
        insert(UsageDaily).from_select(
            list(DAILY_COLUMNS),
            select(*columns, func.count(), func.sum(UsageRecord.units)).group_by(*columns),
        )
    )
    rebuilt = select(func.count()).select_from(UsageDaily).where(UsageDaily.day >= first_day)
    return int(await session.scalar(rebuilt) or 0)


# Records deleted per transaction by ``prune_records``: short transactions, so that the usage
# writer's flushes never wait long behind a prune.
PRUNE_BATCH = 10_000


async def prune_records(
    sessionmaker: async_sessionmaker[AsyncSession], before: date, *, batch: int = PRUNE_BATCH
) -> int:
    """Delete the raw usage records of every UTC day before ``before``, in short transactions;
    returns how many. The rollups, the monthly counters and so every report and export keep
    those days: only the per-request detail goes. On Postgres the months that end by then are
    dropped whole, partition by partition (``auth.usage.partitions``), and only the rest of the
    last month is deleted row by row."""
    if not EARLIEST_DAY <= before <= LATEST_DAY:
        raise InvalidRequest(f"before must be between {EARLIEST_DAY} and {LATEST_DAY}")
    cutoff = datetime.combine(before, time.min, tzinfo=UTC)
    deleted = 0
    async with sessionmaker() as session:
        if session.get_bind().dialect.name == "postgresql":
            deleted += await drop_months_before(session, before)
            await session.commit()
    while True:
        async with sessionmaker() as session:
            ids = select(UsageRecord.id).where(UsageRecord.created_at < cutoff).limit(batch)
            result = await session.execute(delete(UsageRecord).where(UsageRecord.id.in_(ids)))
            await session.commit()
        count = int(getattr(result, "rowcount", 0) or 0)
        deleted += count
        if count < batch:
            return deleted
