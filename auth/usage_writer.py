"""Group commit of usage: the one way a billable request is recorded.

Each worker runs one :class:`UsageWriter`. A request hands it its usage event and waits; the
writer coalesces the events of concurrent requests into one transaction (one multi-row insert,
one quota decision per tenant and month, one commit) and then answers every waiting request at
once. So the database stays the one source of truth for the quota, a 2xx is sent only after its
record is durable, and the cost of a commit is shared by everything that arrived while the
previous one was in flight.

- The quota is decided before anything is inserted: a refused request costs no row and no
  sequence value. Each tenant's counter gets one conditional upsert for the whole batch; only
  when that would cross the quota are its events decided one by one, in arrival order, so the
  requests that fit are served and the one that would cross is refused whole.
- Counters are locked in (tenant, month) order, so two workers' batches cannot deadlock.
- A failed or timed-out flush answers 503 to every request in it (nothing is served unbilled)
  and the writer goes on with the next batch: it recovers by itself when the database does.
- Every record keeps its request id under a unique index, so a write that is retried can never
  bill twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy import insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from auth.errors import DependencyUnavailable, QuotaExceeded
from auth.models import MonthlyUsage, UsageRecord
from auth.usage import UsageEvent, month_of, seconds_to_next_month

logger = structlog.get_logger(__name__)


@dataclass(eq=False)
class _Pending:
    event: UsageEvent
    monthly_quota: int | None
    future: asyncio.Future[None] = field(repr=False)


class UsageWriter:
    """Records usage events in batches; :meth:`charge` returns once the event is durable."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_batch: int = 500,
        max_wait_seconds: float = 0.0,
        timeout_seconds: float = 5.0,
    ) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._max_wait = max_wait_seconds
        self._timeout = timeout_seconds
        self._queue: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        dialect = engine.dialect.name
        self._dialect_insert: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert

    def start(self) -> None:
        """Start the background flush loop (in the running event loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="usage-writer")

    async def close(self) -> None:
        """Flush what is queued, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def charge(self, event: UsageEvent, monthly_quota: int | None) -> None:
        """Record ``event`` against the tenant's month and wait until it is committed.

        Raises ``QuotaExceeded`` (nothing recorded) if it would cross ``monthly_quota``, and
        ``DependencyUnavailable`` if the record could not be committed.
        """
        if self._closing or self._task is None:
            raise DependencyUnavailable("usage cannot be recorded: the server is shutting down")
        if monthly_quota is not None and event.units > monthly_quota:
            raise _quota_exceeded(event, monthly_quota)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(event, monthly_quota, future))
        self._wakeup.set()
        # shield: a client that goes away must not cancel a commit that others share.
        await asyncio.shield(future)

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                if self._max_wait > 0 and len(self._queue) < self._max_batch:
                    # Optional: trade a little latency for bigger batches.
                    await asyncio.sleep(self._max_wait)
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._flush(batch)
            if self._closing:
                return

    async def _flush(self, batch: list[_Pending]) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                refused = await self._write(batch)
        except Exception as exc:
            # The driver's message may carry SQL parameters: log the class only.
            logger.warning("usage flush failed", error=type(exc).__name__, records=len(batch))
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(
                        DependencyUnavailable("usage could not be recorded", retry_after=2)
                    )
            return
        for pending in batch:
            if pending.future.done():
                continue
            if pending in refused:
                assert pending.monthly_quota is not None  # noqa: S101 (only quotas refuse)
                pending.future.set_exception(_quota_exceeded(pending.event, pending.monthly_quota))
            else:
                pending.future.set_result(None)

    async def _write(self, batch: list[_Pending]) -> set[_Pending]:
        """One transaction: charge every tenant's month, insert the accepted records, commit.
        Returns the events refused for their quota."""
        groups: dict[tuple[uuid.UUID, str], list[_Pending]] = {}
        for pending in batch:
            key = (pending.event.tenant_id, month_of(pending.event.created_at))
            groups.setdefault(key, []).append(pending)
        refused: set[_Pending] = set()
        async with self._engine.begin() as connection:
            for tenant_id, month in sorted(groups, key=lambda key: (str(key[0]), key[1])):
                members = groups[(tenant_id, month)]
                refused.update(await self._charge_month(connection, tenant_id, month, members))
            rows = [_record(p.event) for p in batch if p not in refused]
            if rows:
                await connection.execute(insert(UsageRecord), rows)
        return refused

    async def _charge_month(
        self,
        connection: AsyncConnection,
        tenant_id: uuid.UUID,
        month: str,
        members: Sequence[_Pending],
    ) -> list[_Pending]:
        quotas = [p.monthly_quota for p in members if p.monthly_quota is not None]
        quota = min(quotas) if quotas else None
        units = sum(p.event.units for p in members)
        if quota is None or units <= quota:
            charged = await self._add(connection, tenant_id, month, units, len(members), quota)
            if charged:
                return []
        # The batch as a whole would cross the quota: decide request by request, in order.
        refused = []
        for pending in members:
            if not await self._add(
                connection, tenant_id, month, pending.event.units, 1, pending.monthly_quota
            ):
                refused.append(pending)
        return refused

    async def _add(
        self,
        connection: AsyncConnection,
        tenant_id: uuid.UUID,
        month: str,
        units: int,
        requests: int,
        quota: int | None,
    ) -> bool:
        """Add to the month's counter unless that would cross ``quota``; whether it was added.

        One statement whether or not the month has a row yet (an upsert). The caller has
        ensured ``units <= quota``, so creating the row can never cross it either.
        """
        statement = self._dialect_insert(MonthlyUsage).values(
            tenant_id=tenant_id, month=month, units=units, requests=requests
        )
        statement = statement.on_conflict_do_update(
            index_elements=[MonthlyUsage.tenant_id, MonthlyUsage.month],
            set_={
                "units": MonthlyUsage.units + statement.excluded.units,
                "requests": MonthlyUsage.requests + statement.excluded.requests,
            },
            where=(MonthlyUsage.units + statement.excluded.units <= quota)
            if quota is not None
            else None,
        ).returning(MonthlyUsage.units)
        result = await connection.execute(statement)
        return result.first() is not None


def _record(event: UsageEvent) -> dict[str, Any]:
    return {
        "request_id": event.request_id,
        "tenant_id": event.tenant_id,
        "api_key_id": event.api_key_id,
        "model": event.model,
        "model_version": event.model_version,
        "units": event.units,
        "status_code": event.status_code,
        "latency_ms": event.latency_ms,
        "created_at": event.created_at,
    }


def _quota_exceeded(event: UsageEvent, monthly_quota: int) -> QuotaExceeded:
    return QuotaExceeded(
        f"this request needs {event.units} units and would exceed the monthly quota "
        f"of {monthly_quota}",
        retry_after=seconds_to_next_month(event.created_at),
    )
