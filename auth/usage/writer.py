"""Group commit of usage: the one way a billable request is recorded.

Each worker runs one :class:`UsageWriter`. A request hands it its usage event and waits; the
writer coalesces the events of concurrent requests into one write (one quota decision per tenant
and month, one multi-row insert, one upsert of the daily rollups the records add to, one commit)
and then answers every waiting request at once. So the database stays the one source of truth for
the quota, a 2xx is sent only after its record is durable, and the cost of a commit is shared by
everything that arrived while the previous one was in flight.

On Postgres the common case is one statement in one round trip (``CHARGE_FITTING``): every
tenant's month that stays within its quota and passes none of its alert thresholds is charged,
recorded and rolled up by it, decided under the counter's row lock. What it leaves (a month at a
threshold or its quota, or events with an ``Idempotency-Key``) goes through the transaction
described below, so every rule is decided in one place each: the one statement only ever does what
the transaction would have done with no event and no refusal. On SQLite every batch takes the
transaction (one process; its commit is the fsync, not the round trips).

- The quota is decided before anything is inserted: a refused request costs no row and no
  sequence value. Each tenant's counter gets one conditional upsert for the whole batch; only
  when that would cross the quota are its events decided one by one, in arrival order, so the
  requests that fit are served and the one that would cross is refused whole.
- Counters are locked in (tenant, month) order, so two workers' batches cannot deadlock.
- A failed or timed-out flush answers 503 to every request in it (nothing is served unbilled)
  and the writer goes on with the next batch: it recovers by itself when the database does.
- The same transaction writes the events the batch caused (``auth.events.outbox``): a
  ``usage.threshold`` for each alert threshold the month's counter passed (read from the
  counter's own upsert, whose row lock makes every unit count pass once across all workers) and
  a ``quota.exhausted`` for the month's first refusal. No event exists for a flush that failed.
- Every record keeps its request id under a unique index, so a write that is retried can never
  bill twice.
- A request sent with an ``Idempotency-Key`` carries its answer: the answer's row is inserted
  first, in the same transaction, and only an event whose row went in is charged and recorded
  (a key already answered raises ``AlreadyAnswered`` instead: not billed, answered from the
  store). An event the quota refuses takes its row out again. So "billed" and "remembered" are
  one commit (``auth.idempotency``).

The writer keeps one connection of its own and speaks to it through the driver (asyncpg or
aiosqlite) with two fixed statements: SQLAlchemy's execution layer cost about 1 ms of CPU per
flush, several times the database's own work (measured by ``bench``). Values still go through
the columns' SQLAlchemy bind processors, so they are stored exactly as the ORM stores them.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date
from operator import attrgetter
from typing import Any

import structlog
from sqlalchemy import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from auth.errors import DependencyUnavailable, QuotaExceeded
from auth.events.outbox import (
    DEFAULT_THRESHOLDS,
    EVENT_COLUMNS,
    INSERT_EVENT,
    PendingEvent,
    alert_units,
    crossed_thresholds,
    event_row,
    exhausted_event,
    threshold_event,
)
from auth.idempotency import FORGET, ROW_COLUMNS, AlreadyAnswered, remember_statement
from auth.models import Event, IdempotentResponse, UsageDaily, UsageRecord
from auth.usage.ledger import DAILY_COLUMNS, UsageEvent, month_of, seconds_to_next_month
from auth.usage.partitions import IS_PARTITIONED, create_partitions

logger = structlog.get_logger(__name__)


# (tenant, month) pairs remembered as exhausted before the set is emptied.
_MAX_EXHAUSTED_REMEMBERED = 100_000


@dataclass(eq=False)
class _Pending:
    event: UsageEvent
    monthly_quota: int | None
    future: asyncio.Future[None] = field(repr=False)
    # The tenant's usage alert thresholds, percentages of monthly_quota.
    thresholds: tuple[int, ...] = DEFAULT_THRESHOLDS


@dataclass(frozen=True, slots=True)
class FlushStats:
    """One flush, for an observer (metrics): its records, how long it took, how many records
    were queued behind it when it ended, and whether it failed (its requests got 503)."""

    records: int
    seconds: float
    queued: int
    failed: bool


FlushObserver = Callable[[FlushStats], None]


# The writer's statements in Postgres' parameter style; SQLite's "?" is derived from them.
# Adding units to a tenant's month (creating the row if needed):
_ADD = (
    "INSERT INTO monthly_usage (tenant_id, month, units, requests) VALUES ($1, $2, $3, $4) "
    "ON CONFLICT (tenant_id, month) DO UPDATE SET "
    "units = monthly_usage.units + excluded.units, "
    "requests = monthly_usage.requests + excluded.requests"
)
# The same only if the month stays within the quota ($5). A new row is only ever created with
# units <= quota (the caller checks), so the bound matters on conflict only.
_ADD_WITHIN_QUOTA = _ADD + " WHERE monthly_usage.units + excluded.units <= $5"
# A usage record's columns, in the order of the writer's rows (UsageWriter._row); the bench
# inserts the same rows both as the writer does and by COPY (bench/micro.py).
RECORD_COLUMNS = (
    "request_id",
    "tenant_id",
    "api_key_id",
    "model",
    "model_version",
    "plan_id",
    "units",
    "status_code",
    "latency_ms",
    "created_at",
)
INSERT_RECORDS = "INSERT INTO usage_record ({}) VALUES ({})".format(  # noqa: S608 (constants)
    ", ".join(RECORD_COLUMNS), ", ".join(f"${i + 1}" for i in range(len(RECORD_COLUMNS)))
)
# Adding the batch's records to their daily rollups, in the same transaction.
_ADD_DAILY = (
    "INSERT INTO usage_daily "
    "(tenant_id, day, api_key_id, model, model_version, plan_id, requests, units) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
    "ON CONFLICT (tenant_id, day, api_key_id, model, model_version, plan_id) DO UPDATE SET "
    "requests = usage_daily.requests + excluded.requests, "
    "units = usage_daily.units + excluded.units"
)


# The common case of a Postgres flush in one statement, so one round trip in autocommit instead
# of five (BEGIN, counters, records, rollups, COMMIT): under load each round trip resumes only
# after the requests queued ahead of it on the event loop, and the flush's waits, not its CPU,
# were what a billed request waited for (docs/performance.md). A (tenant, month) group is
# charged here only if its counter stays within its quota and passes none of its alert
# thresholds' unit counts, decided under the counter's row lock as the transaction path decides;
# its records and rollups go in only for the groups charged (joined on the counters' RETURNING).
# A group left out (at a threshold or its quota, or carrying idempotency keys) is charged by the
# transaction path, which writes its events and refusals with it.
CHARGE_FITTING = """
WITH batch AS (
    SELECT * FROM unnest(
        $1::uuid[], $2::varchar[], $3::bigint[], $4::bigint[], $5::bigint[], $6::text[]
    ) AS batch (tenant_id, month, units, requests, quota, alerts)
), charged AS (
    INSERT INTO monthly_usage AS counter (tenant_id, month, units, requests)
    SELECT tenant_id, month, units, requests FROM batch
    -- a new row goes from 0 to units
    WHERE (quota IS NULL OR units <= quota) AND units < ALL (alerts::bigint[])
    ORDER BY tenant_id, month
    ON CONFLICT (tenant_id, month) DO UPDATE SET
        units = counter.units + excluded.units,
        requests = counter.requests + excluded.requests
    WHERE EXISTS (
        SELECT FROM batch
        WHERE batch.tenant_id = excluded.tenant_id AND batch.month = excluded.month
            AND (batch.quota IS NULL OR counter.units + excluded.units <= batch.quota)
            AND NOT EXISTS (
                SELECT FROM unnest(batch.alerts::bigint[]) AS alert
                WHERE counter.units < alert AND alert <= counter.units + excluded.units
            )
    )
    RETURNING tenant_id, month
), records AS (
    INSERT INTO usage_record ({record_columns})
    SELECT {record_columns} FROM unnest(
        $7::uuid[], $8::uuid[], $9::uuid[], $10::varchar[], $11::varchar[], $12::uuid[],
        $13::integer[], $14::smallint[], $15::float8[], $16::timestamptz[], $17::varchar[]
    ) AS record ({record_columns}, month)
    JOIN charged USING (tenant_id, month)
), rollups AS (
    INSERT INTO usage_daily AS rollup ({daily_columns})
    SELECT {daily_columns} FROM unnest(
        $18::uuid[], $19::date[], $20::uuid[], $21::varchar[], $22::varchar[], $23::uuid[],
        $24::bigint[], $25::bigint[], $26::varchar[]
    ) AS day ({daily_columns}, month)
    JOIN charged USING (tenant_id, month)
    ON CONFLICT (tenant_id, day, api_key_id, model, model_version, plan_id) DO UPDATE SET
        requests = rollup.requests + excluded.requests,
        units = rollup.units + excluded.units
)
SELECT tenant_id, month FROM charged
""".format(  # noqa: S608 (column names are constants)
    record_columns=", ".join(RECORD_COLUMNS), daily_columns=", ".join(DAILY_COLUMNS)
)


@dataclass(frozen=True)
class _Statements:
    """The writer's SQL in one dialect's parameter style."""

    add: str
    add_within_quota: str
    insert_records: str
    add_daily: str
    forget: str
    insert_event: str

    @classmethod
    def for_dialect(cls, dialect: str) -> _Statements:
        if dialect not in ("postgresql", "sqlite"):
            raise ValueError(f"the usage writer does not support {dialect}")

        def styled(sql: str) -> str:
            return sql if dialect == "postgresql" else re.sub(r"\$\d+", "?", sql)

        return cls(
            add=styled(_ADD + " RETURNING units"),
            add_within_quota=styled(_ADD_WITHIN_QUOTA + " RETURNING units"),
            insert_records=styled(INSERT_RECORDS),
            add_daily=styled(_ADD_DAILY),
            forget=styled(FORGET),
            insert_event=styled(INSERT_EVENT),
        )


class UsageWriter:
    """Records usage events in batches; :meth:`charge` returns once the event is durable."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_batch: int = 500,
        max_wait_seconds: float = 0.0,
        timeout_seconds: float = 5.0,
        observer: FlushObserver | None = None,
    ) -> None:
        self._engine = engine
        self._observer = observer
        self._max_batch = max_batch
        self._max_wait = max_wait_seconds
        self._timeout = timeout_seconds
        self._queue: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._dialect = engine.dialect.name
        self._sql = _Statements.for_dialect(self._dialect)
        self._processors = _bind_processors(UsageRecord, RECORD_COLUMNS, engine.dialect)
        self._daily_processors = _bind_processors(UsageDaily, DAILY_COLUMNS, engine.dialect)
        self._response_processors = _bind_processors(
            IdempotentResponse, ROW_COLUMNS, engine.dialect
        )
        self._event_processors = _bind_processors(Event, EVENT_COLUMNS, engine.dialect)
        # (tenant, month) pairs whose quota.exhausted event is known to be committed: later
        # refusals of that month cost no statement.
        self._exhausted: set[tuple[uuid.UUID, str]] = set()
        # Events committed by this writer, for an observer (metrics).
        self.events_written = 0
        self._connection: AsyncConnection | None = None
        self._driver_connection: Any = None
        # Postgres: whether usage_record is partitioned by month (None: not asked yet), and the
        # months whose partition is known to exist (auth.usage.partitions).
        self._partitioned: bool | None = None
        self._months_ready: set[str] = set()
        # Flushes whose first attempt failed (retried or answered 503): for operators and tests.
        self.interrupted_flushes = 0

    def start(self) -> None:
        """Start the background flush loop (in the running event loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="usage-writer")

    async def close(self) -> None:
        """Flush what is queued, then stop and return the connection."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._drop_connection()

    async def charge(
        self,
        event: UsageEvent,
        monthly_quota: int | None,
        thresholds: tuple[int, ...] = DEFAULT_THRESHOLDS,
    ) -> None:
        """Record ``event`` against the tenant's month and wait until it is committed.

        Raises ``QuotaExceeded`` (nothing recorded) if it would cross ``monthly_quota``,
        ``AlreadyAnswered`` (nothing recorded) if the event's idempotency key has an answer
        stored already, and ``DependencyUnavailable`` if the record could not be committed.
        """
        if self._closing or self._task is None:
            raise DependencyUnavailable("usage cannot be recorded: the server is shutting down")
        if monthly_quota is not None and event.units > monthly_quota:
            raise _quota_exceeded(event, monthly_quota)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(event, monthly_quota, future, thresholds))
        self._wakeup.set()
        # A request cancelled while waiting cancels only its own future: a batch already being
        # written is unaffected, and one still queued is dropped (nothing was served).
        await future

    async def write_unmetered(self, events: Sequence[UsageEvent]) -> None:
        """Record ``events`` in one transaction of the writer's own kind (records, monthly
        counters, daily rollups), with no quota and no queue: for bulk loads such as
        bench/usage_fill.py, on a writer that was not started."""
        if self._task is not None:
            raise RuntimeError("write_unmetered is for a writer whose loop is not running")
        loop = asyncio.get_running_loop()
        await self._write([_Pending(event, None, loop.create_future()) for event in events])

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                if self._max_wait > 0 and len(self._queue) < self._max_batch:
                    # Optional: trade a little latency for bigger batches.
                    await asyncio.sleep(self._max_wait)
                batch = [p for p in self._queue[: self._max_batch] if not p.future.done()]
                del self._queue[: self._max_batch]
                if batch:
                    started = time.perf_counter()
                    failed = not await self._flush(batch)
                    if self._observer is not None:
                        elapsed = time.perf_counter() - started
                        self._observe(self._observer, len(batch), elapsed, failed)
            if self._closing:
                return

    def _observe(self, observer: FlushObserver, records: int, seconds: float, failed: bool) -> None:
        try:
            observer(FlushStats(records, seconds, len(self._queue), failed))
        except Exception as exc:
            # Measuring must never stop billing.
            logger.warning("usage flush observer failed", error=type(exc).__name__)

    async def _flush(self, batch: list[_Pending]) -> bool:
        """Write ``batch`` and answer its requests; whether the write succeeded."""
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    refused, answered = await self._write(batch)
                except Exception as first:
                    self.interrupted_flushes += 1
                    # Usually a connection the server dropped while it sat idle: retry once on a
                    # fresh one. Safe even if the first attempt did commit: its request ids are
                    # unique, so the retry fails whole instead of billing twice.
                    await self._drop_connection()
                    logger.info("usage flush retried", error=type(first).__name__)
                    # What the first attempt committed and answered is not written again.
                    refused, answered = await self._write([p for p in batch if not p.future.done()])
        except Exception as exc:
            # The connection's state is unknown: start the next batch on a fresh one.
            await self._drop_connection()
            # The driver's message may carry SQL parameters: log the class only.
            logger.warning("usage flush failed", error=type(exc).__name__, records=len(batch))
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(
                        DependencyUnavailable("usage could not be recorded", retry_after=2)
                    )
            return False
        for pending in batch:
            if pending.future.done():
                continue
            if pending in refused:
                assert pending.monthly_quota is not None  # noqa: S101 (only quotas refuse)
                pending.future.set_exception(_quota_exceeded(pending.event, pending.monthly_quota))
            elif pending in answered:
                pending.future.set_exception(AlreadyAnswered())
            else:
                pending.future.set_result(None)
        return True

    async def _driver(self) -> Any:
        """The driver connection (asyncpg or aiosqlite) the writer keeps for itself: asked of
        SQLAlchemy once per connection (each asking costs a greenlet switch), not per flush."""
        if self._driver_connection is None:
            if self._connection is None:
                self._connection = await self._engine.connect()
            raw = await self._connection.get_raw_connection()
            self._driver_connection = raw.driver_connection
        return self._driver_connection

    async def _drop_connection(self) -> None:
        # Whatever failed, ask the server again about partitions too (a prune may have dropped
        # a month that a late record still belongs to).
        self._partitioned = None
        self._months_ready.clear()
        self._driver_connection = None
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.invalidate()
            with contextlib.suppress(Exception):
                await connection.close()

    async def _write(self, batch: list[_Pending]) -> tuple[set[_Pending], set[_Pending]]:
        """One transaction: store the answers of the keyed events, charge every tenant's month,
        insert the accepted records, commit. Returns the events refused for their quota and
        those whose key was answered already."""
        groups: dict[tuple[uuid.UUID, str], list[_Pending]] = {}
        for pending in batch:
            key = (pending.event.tenant_id, month_of(pending.event.created_at))
            groups.setdefault(key, []).append(pending)
        driver = await self._driver()
        events: list[PendingEvent] = []
        outcome: tuple[set[_Pending], set[_Pending]] = (set(), set())
        if self._dialect == "postgresql":
            await self._ensure_partitions(driver, {month for _, month in groups})
            for key in await self._charge_fitting(driver, groups):
                # Committed: answered now, and not written again by a retry of this flush.
                for pending in groups.pop(key):
                    if not pending.future.done():
                        pending.future.set_result(None)
            if groups:
                async with driver.transaction():
                    outcome = await self._charge_and_insert(driver, groups, events)
        else:
            try:
                outcome = await self._charge_and_insert(driver, groups, events)
                await driver.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    await driver.rollback()
                raise
        # Committed: the months that had their first refusal need no statement for it again.
        if len(self._exhausted) > _MAX_EXHAUSTED_REMEMBERED:
            # Only a saving: forgetting costs one statement (a no-op insert) per month again.
            self._exhausted.clear()
        self._exhausted.update(
            (e.tenant_id, e.dedupe_key.rsplit(":", 1)[1])
            for e in events
            if e.type == "quota.exhausted"
        )
        self.events_written += len(events)
        return outcome

    async def _charge_fitting(
        self, driver: Any, groups: dict[tuple[uuid.UUID, str], list[_Pending]]
    ) -> list[tuple[uuid.UUID, str]]:
        """Charge, record and roll up, in one autocommitted statement (``CHARGE_FITTING``), the
        groups that cross no alert threshold and no quota; the groups it charged."""
        candidates = {
            key: members
            for key, members in groups.items()
            if all(p.event.response is None for p in members)
        }
        if not candidates:
            return []
        counters = []
        for (tenant_id, month), members in candidates.items():
            quota, thresholds, units = _group_terms(members)
            alerts = [] if quota is None else alert_units(quota, thresholds)
            alerts_literal = "{" + ",".join(map(str, alerts)) + "}"
            counters.append((tenant_id, month, units, len(members), quota, alerts_literal))
        events = [p.event for members in candidates.values() for p in members]
        # Built column by column (the statement takes arrays): a row tuple per record, turned
        # into columns afterwards, cost the flush a third more client CPU.
        columns = [list(column) for column in zip(*counters, strict=True)]
        for name, process in zip(RECORD_COLUMNS, self._processors, strict=True):
            values = list(map(attrgetter(name), events))
            columns.append(list(map(process, values)) if process else values)
        columns.append([month for (_, month), members in candidates.items() for _ in members])
        rollups = self._daily_rows(events)
        columns += [list(column) for column in zip(*rollups, strict=True)]
        columns.append([f"{row[1].year:04d}-{row[1].month:02d}" for row in rollups])
        rows = await driver.fetch(CHARGE_FITTING, *columns)
        return [(row[0], row[1]) for row in rows]

    async def _ensure_partitions(self, driver: Any, months: set[str]) -> None:
        """Create the monthly partitions these records need, once per month and process: a set
        lookup per flush in the steady state."""
        if self._partitioned is None:
            self._partitioned = bool(await driver.fetchval(IS_PARTITIONED))
        missing = months - self._months_ready
        if self._partitioned and missing:
            await create_partitions(driver, missing)
            self._months_ready |= missing

    async def _charge_and_insert(
        self,
        driver: Any,
        groups: dict[tuple[uuid.UUID, str], list[_Pending]],
        events: list[PendingEvent],
    ) -> tuple[set[_Pending], set[_Pending]]:
        answered = await self._remember(driver, groups)
        refused: set[_Pending] = set()
        for tenant_id, month in sorted(groups, key=lambda key: (str(key[0]), key[1])):
            members = [p for p in groups[(tenant_id, month)] if p not in answered]
            if members:
                refused.update(await self._charge_month(driver, tenant_id, month, members, events))
        for pending in refused:
            # Not billed, so not remembered: the client may retry with the same key.
            if pending.event.response is not None:
                scope = self._response_row(pending.event)[0]
                await self._execute(driver, self._sql.forget, (scope,))
        accepted = [
            p.event
            for members in groups.values()
            for p in members
            if p not in refused and p not in answered
        ]
        if accepted:
            await driver.executemany(self._sql.insert_records, [self._row(e) for e in accepted])
            await driver.executemany(self._sql.add_daily, self._daily_rows(accepted))
        if events:
            # The dedupe key makes a second insert of an event that happened already a no-op.
            await driver.executemany(self._sql.insert_event, [self._event_row(e) for e in events])
        return refused, answered

    def _event_row(self, event: PendingEvent) -> tuple[Any, ...]:
        return tuple(
            process(value) if process else value
            for process, value in zip(self._event_processors, event_row(event), strict=True)
        )

    async def _remember(
        self, driver: Any, groups: dict[tuple[uuid.UUID, str], list[_Pending]]
    ) -> set[_Pending]:
        """Insert the keyed events' answers in one statement (in scope order, so that two
        writers lock keys in the same order); returns the events whose key already had one (a
        second event of one key in the batch included)."""
        first: dict[bytes, _Pending] = {}
        answered: set[_Pending] = set()
        for members in groups.values():
            for pending in members:
                response = pending.event.response
                if response is None:
                    continue
                if response.scope in first:
                    answered.add(pending)
                else:
                    first[response.scope] = pending
        if not first:
            return answered
        rows = [self._response_row(first[scope].event) for scope in sorted(first)]
        inserted = await self._fetch_column(
            driver, remember_statement(self._dialect, len(rows)), rows
        )
        kept = {bytes(scope) for scope in inserted}
        answered.update(p for scope, p in first.items() if scope not in kept)
        return answered

    async def _fetch_column(self, driver: Any, sql: str, rows: list[tuple[Any, ...]]) -> list[Any]:
        parameters = [value for row in rows for value in row]
        if self._dialect == "postgresql":
            return [record[0] for record in await driver.fetch(sql, *parameters)]
        cursor = await driver.execute(sql, parameters)
        try:
            return [record[0] for record in await cursor.fetchall()]
        finally:
            await cursor.close()

    def _response_row(self, event: UsageEvent) -> tuple[Any, ...]:
        assert event.response is not None  # noqa: S101 (only keyed events get here)
        return tuple(
            process(value) if process else value
            for process, value in zip(self._response_processors, event.response.row(), strict=True)
        )

    async def _execute(self, driver: Any, sql: str, parameters: tuple[Any, ...]) -> None:
        if self._dialect == "postgresql":
            await driver.execute(sql, *parameters)
            return
        cursor = await driver.execute(sql, parameters)
        await cursor.close()

    async def _charge_month(
        self,
        driver: Any,
        tenant_id: uuid.UUID,
        month: str,
        members: Sequence[_Pending],
        events: list[PendingEvent],
    ) -> list[_Pending]:
        quota, thresholds, units = _group_terms(members)
        if quota is None or units <= quota:
            after = await self._add(driver, tenant_id, month, units, len(members), quota)
            if after is not None:
                self._thresholds(events, tenant_id, month, after - units, after, quota, thresholds)
                return []
        # The batch as a whole would cross the quota: decide request by request, in order.
        refused = []
        used: int | None = None
        for pending in members:
            units = pending.event.units
            after = await self._add(driver, tenant_id, month, units, 1, pending.monthly_quota)
            if after is None:
                refused.append(pending)
            else:
                used = after
                self._thresholds(events, tenant_id, month, after - units, after, quota, thresholds)
        if refused and quota is not None and (tenant_id, month) not in self._exhausted:
            # The counter's value when nothing in this batch fitted is not read: the quota's.
            events.append(
                exhausted_event(tenant_id, month, used if used is not None else quota, quota)
            )
        return refused

    @staticmethod
    def _thresholds(
        events: list[PendingEvent],
        tenant_id: uuid.UUID,
        month: str,
        before: int,
        after: int,
        quota: int | None,
        thresholds: tuple[int, ...],
    ) -> None:
        """Add the usage.threshold events of the counter's move from ``before`` to ``after``."""
        if quota is None:
            return
        for percent in crossed_thresholds(before, after, quota, thresholds):
            events.append(threshold_event(tenant_id, month, percent, after, quota))

    async def _add(
        self,
        driver: Any,
        tenant_id: uuid.UUID,
        month: str,
        units: int,
        requests: int,
        quota: int | None,
    ) -> int | None:
        """Add to the month's counter unless that would cross ``quota``; the month's units
        after the addition, or None if it was not added.

        One statement whether or not the month has a row yet (an upsert). The caller has
        ensured ``units <= quota``, so creating the row can never cross it either.
        """
        process_tenant = self._processors[RECORD_COLUMNS.index("tenant_id")]
        parameters: tuple[Any, ...] = (
            process_tenant(tenant_id) if process_tenant else tenant_id,
            month,
            units,
            requests,
        )
        if quota is None:
            return await self._fetch_one(driver, self._sql.add, parameters)
        return await self._fetch_one(driver, self._sql.add_within_quota, (*parameters, quota))

    async def _fetch_one(self, driver: Any, sql: str, parameters: tuple[Any, ...]) -> int | None:
        """The first column of the statement's one row (RETURNING units), or None."""
        if self._dialect == "postgresql":
            row = await driver.fetchrow(sql, *parameters)
        else:
            cursor = await driver.execute(sql, parameters)
            try:
                row = await cursor.fetchone()
            finally:
                await cursor.close()
        return None if row is None else int(row[0])

    def _daily_rows(self, events: Sequence[UsageEvent]) -> list[tuple[Any, ...]]:
        """The batch summed per rollup row, in key order (so that two writers touching the
        same rows lock them in the same order)."""
        sums: dict[tuple[uuid.UUID, date, uuid.UUID, str, str, uuid.UUID], list[int]] = {}
        for event in events:
            day = event.created_at.astimezone(UTC).date()
            key = (
                event.tenant_id,
                day,
                event.api_key_id,
                event.model,
                event.model_version,
                event.plan_id,
            )
            totals = sums.setdefault(key, [0, 0])
            totals[0] += 1
            totals[1] += event.units
        return [
            tuple(
                process(value) if process else value
                for process, value in zip(self._daily_processors, (*key, *totals), strict=True)
            )
            for key, totals in sorted(sums.items(), key=lambda item: str(item[0]))
        ]

    def _row(self, event: UsageEvent) -> tuple[Any, ...]:
        values = (
            event.request_id,
            event.tenant_id,
            event.api_key_id,
            event.model,
            event.model_version,
            event.plan_id,
            event.units,
            event.status_code,
            event.latency_ms,
            event.created_at,
        )
        return tuple(
            process(value) if process else value
            for process, value in zip(self._processors, values, strict=True)
        )


def _group_terms(members: Sequence[_Pending]) -> tuple[int | None, tuple[int, ...], int]:
    """A (tenant, month) group's quota (the tightest its requests were sent with), alert
    thresholds (its latest request's) and units: the terms both the one statement and the
    transaction decide the group by."""
    quotas = [p.monthly_quota for p in members if p.monthly_quota is not None]
    return (
        min(quotas) if quotas else None,
        members[-1].thresholds,
        sum(p.event.units for p in members),
    )


def _bind_processors(
    table: type[UsageRecord | UsageDaily | IdempotentResponse | Event],
    names: Sequence[str],
    dialect: Dialect,
) -> list[Any]:
    """Each column's bind processor as the ORM applies it on this dialect. ``dialect_impl``
    matters: the generic type's processor skips the dialect's own formatting (SQLite's
    timestamp text), and a value stored in another format than the ORM's compares wrongly
    with the ORM's parameters (``'... 00:00:00' < '... 00:00:00.000000'`` in SQLite)."""
    columns = table.__table__.c
    return [columns[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names]


def _quota_exceeded(event: UsageEvent, monthly_quota: int) -> QuotaExceeded:
    return QuotaExceeded(
        f"this request needs {event.units} units and would exceed the monthly quota "
        f"of {monthly_quota}",
        retry_after=seconds_to_next_month(event.created_at),
    )
