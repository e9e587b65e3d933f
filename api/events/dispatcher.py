"""The dispatcher: every worker delivers the outbox's events to their endpoints, signed as
Standard Webhooks.

- **Sharing the work.** Events are fanned out (one delivery per subscribed endpoint) and due
  deliveries are claimed by a single ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED)``:
  on Postgres any number of workers and replicas take disjoint rows without a leader; on SQLite
  (which has one writer at a time and no row locks) the same statement is atomic by itself. A
  claim is a lease: the delivery's next attempt is pushed past the delivery's time budget, so a
  worker killed mid-delivery leaves it to be taken again (at least once).
- **Signing.** ``webhook-id`` (the event's stable id, the same at every attempt),
  ``webhook-timestamp`` and ``webhook-signature`` by the ``standardwebhooks`` library; during a
  secret rotation's grace period both secrets sign (space-separated signatures).
- **Retries.** Exponential backoff with jitter (``RETRY_SCHEDULE``, about a day); no order is
  promised between deliveries, even to one endpoint. An endpoint failing for
  ``MODELGATE_EVENT_DISABLE_AFTER_SECONDS`` (a day) is disabled with the reason, and an
  ``endpoint.disabled`` event goes to the operator.
- **Containment.** Each delivery resolves and checks its target again and connects to the checked
  address (``auth.events.targets``); no redirect is followed; connect and total timeouts; at most
  ``MAX_EXCERPT_BYTES`` of the answer are read; bounded concurrency overall and per endpoint, so
  a slow endpoint holds its own slots and nobody else's.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta

import httpx
import structlog
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from standardwebhooks.webhooks import Webhook

from api.observability import metrics
from auth.events.endpoints import signing_secrets
from auth.events.outbox import TENANT_EVENT_TYPES, emit
from auth.events.secrets import SecretBox
from auth.events.targets import TargetRefused, resolve_target
from auth.models import Event, EventDelivery, EventDeliveryAttempt, EventEndpoint, utcnow
from auth.settings import Settings

logger = structlog.get_logger(__name__)

# Seconds after each failed attempt (Standard Webhooks' suggested schedule, as Svix uses):
# 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h: eight attempts over about 27 hours. Each wait is
# jittered by up to +-20%, so endpoints that failed together are not retried together.
RETRY_SCHEDULE: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
JITTER = 0.2
# How much of an answer is read and kept in the delivery log.
MAX_EXCERPT_BYTES = 1024
# Events fanned out per transaction.
FAN_OUT_BATCH = 100
# How often each worker measures the age of the oldest undelivered event (two small queries).
BACKLOG_MEASURE_SECONDS = 5.0


class Dispatcher:
    """Delivers events; one per worker, started and closed with the app."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        box: SecretBox,
        settings: Settings,
        *,
        retry_schedule: Sequence[float] = RETRY_SCHEDULE,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._box = box
        self._settings = settings
        self._retry_schedule = tuple(retry_schedule)
        self._wakeup = asyncio.Event()
        self._inflight: dict[asyncio.Task[None], uuid.UUID] = {}
        self._task: asyncio.Task[None] | None = None
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            timeout=httpx.Timeout(
                settings.event_delivery_timeout_seconds,
                connect=settings.event_connect_timeout_seconds,
            ),
            limits=httpx.Limits(max_connections=settings.event_max_concurrency),
            trust_env=False,
        )
        # The lease of a claimed delivery: longer than any attempt may take.
        self._lease = timedelta(seconds=settings.event_delivery_timeout_seconds + 30)
        self._measured_at = float("-inf")

    def start(self) -> None:
        """Start delivering in the running event loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="event-dispatcher")

    def wake(self) -> None:
        """Look for work now rather than at the next interval."""
        self._wakeup.set()

    async def close(self) -> None:
        """Stop; deliveries in flight are abandoned (their lease expires and another worker,
        or this one after a restart, sends them again)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._inflight):
            task.cancel()
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        await self._client.aclose()

    async def _run(self) -> None:
        interval = self._settings.event_dispatch_interval_seconds
        while True:
            try:
                worked = await self.step()
            except Exception as exc:
                # The database may be away: try again at the next interval.
                logger.warning("event dispatch failed", error=type(exc).__name__)
                worked = False
            if not worked:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._wakeup.wait()
                self._wakeup.clear()

    async def step(self) -> bool:
        """Fan out new events and start the due deliveries there are slots for; whether there
        was anything to do."""
        fanned = await self._fan_out()
        free = self._settings.event_max_concurrency - len(self._inflight)
        claimed: list[tuple[uuid.UUID, uuid.UUID]] = []
        if free > 0:
            claimed = await self._claim(free)
            for delivery_id, endpoint_id in claimed:
                task = asyncio.create_task(self._deliver(delivery_id))
                self._inflight[task] = endpoint_id
                task.add_done_callback(self._finished)
        if time.monotonic() - self._measured_at >= BACKLOG_MEASURE_SECONDS:
            self._measured_at = time.monotonic()
            await self._measure_backlog()
        return bool(fanned or claimed)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("event delivery failed", error=type(task.exception()).__name__)
        # A slot is free: another due delivery may take it.
        self._wakeup.set()

    async def drain(self, timeout: float = 10.0) -> None:
        """Run steps until nothing is due or in flight (for tests and the CLI)."""
        async with asyncio.timeout(timeout):
            while True:
                worked = await self.step()
                if self._inflight:
                    await asyncio.wait(list(self._inflight))
                elif not worked:
                    return

    async def _fan_out(self) -> int:
        """Turn new events into deliveries, one per active endpoint that wants them."""
        now = utcnow()
        async with self._sessionmaker() as session, session.begin():
            events = (
                await session.scalars(
                    select(Event)
                    .where(Event.fanned_out_at.is_(None))
                    .order_by(Event.created_at)
                    .limit(FAN_OUT_BATCH)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not events:
                return 0
            tenants = {e.tenant_id for e in events if e.tenant_id is not None}
            endpoints = (
                await session.scalars(
                    select(EventEndpoint).where(
                        EventEndpoint.status == "active",
                        or_(
                            EventEndpoint.tenant_id.is_(None),
                            EventEndpoint.tenant_id.in_(tenants),
                        ),
                    )
                )
            ).all()
            counts: Counter[str] = Counter()
            for event in events:
                for endpoint in endpoints:
                    if _wants(endpoint, event):
                        session.add(
                            EventDelivery(
                                event_id=event.id, endpoint_id=endpoint.id, next_attempt_at=now
                            )
                        )
                event.fanned_out_at = now
                counts[event.type] += 1
        for event_type, count in counts.items():
            metrics.record_events_created(event_type, count)
        return len(events)

    async def _claim(self, limit: int) -> list[tuple[uuid.UUID, uuid.UUID]]:
        """Take up to ``limit`` due deliveries for this worker (a lease), skipping endpoints
        that already have their share in flight here."""
        now = utcnow()
        per_endpoint = self._settings.event_max_per_endpoint
        busy = [
            endpoint
            for endpoint, count in Counter(self._inflight.values()).items()
            if count >= per_endpoint
        ]
        due = (
            select(EventDelivery.id)
            .where(
                EventDelivery.status == "pending",
                EventDelivery.next_attempt_at <= now,
                EventDelivery.endpoint_id.not_in(busy) if busy else and_(True),
            )
            .order_by(EventDelivery.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        async with self._sessionmaker() as session, session.begin():
            rows = await session.execute(
                update(EventDelivery)
                .where(EventDelivery.id.in_(due.scalar_subquery()))
                .values(next_attempt_at=now + self._lease, attempts=EventDelivery.attempts + 1)
                .returning(EventDelivery.id, EventDelivery.endpoint_id)
                .execution_options(synchronize_session=False)
            )
            claimed = [(row[0], row[1]) for row in rows]
            # The query cannot count per endpoint: what is beyond an endpoint's share is given
            # back at once, so one endpoint's backlog never fills the worker's slots.
            held = Counter(self._inflight.values())
            kept: list[uuid.UUID] = []
            excess: list[uuid.UUID] = []
            for delivery_id, endpoint_id in claimed:
                held[endpoint_id] += 1
                (kept if held[endpoint_id] <= per_endpoint else excess).append(delivery_id)
            if excess:
                await session.execute(
                    update(EventDelivery)
                    .where(EventDelivery.id.in_(excess))
                    .values(next_attempt_at=now, attempts=EventDelivery.attempts - 1)
                    .execution_options(synchronize_session=False)
                )
        kept_ids = set(kept)
        return [pair for pair in claimed if pair[0] in kept_ids]

    async def _deliver(self, delivery_id: uuid.UUID) -> None:
        async with self._sessionmaker() as session:
            delivery = await session.get(EventDelivery, delivery_id)
            if delivery is None:
                return
            event = await session.get(Event, delivery.event_id)
            endpoint = await session.get(EventEndpoint, delivery.endpoint_id)
            if event is None or endpoint is None:
                return
            if endpoint.status != "active":
                delivery.status = "failed"
                await session.commit()
                return
            url = endpoint.url
            payload = event.payload
            now = utcnow()
            secrets = signing_secrets(endpoint, self._box, now)
            event_id = str(event.id)
            await session.rollback()
        outcome, status, excerpt, latency_ms = await self._send(url, event_id, payload, secrets)
        metrics.record_event_delivery(outcome)
        await self._record(delivery_id, outcome, status, excerpt, latency_ms)

    async def _send(
        self, url: str, event_id: str, payload: str, secrets: list[str]
    ) -> tuple[str, int | None, str, float]:
        """One attempt: (outcome, status code, first bytes of the answer, latency in ms)."""
        started = time.perf_counter()
        settings = self._settings
        try:
            target = await resolve_target(
                url,
                allow_private=settings.webhook_allow_private_targets,
                production=settings.is_production,
            )
        except TargetRefused as exc:
            return "refused", None, str(exc.detail or "refused"), _ms(started)
        timestamp = datetime.fromtimestamp(int(time.time()), tz=utcnow().tzinfo)
        body = payload.encode()
        signature = " ".join(Webhook(s).sign(event_id, timestamp, body) for s in secrets)
        headers = {
            "host": target.host_header,
            "content-type": "application/json",
            "user-agent": "modelgate-webhooks/1",
            "webhook-id": event_id,
            "webhook-timestamp": str(int(timestamp.timestamp())),
            "webhook-signature": signature,
        }
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        request = self._client.build_request(
            "POST", target.connect_url, content=body, headers=headers, extensions=extensions
        )
        try:
            async with asyncio.timeout(settings.event_delivery_timeout_seconds):
                response = await self._client.send(request, stream=True)
                try:
                    excerpt = await _read_excerpt(response)
                finally:
                    await response.aclose()
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            return "network_error", None, type(exc).__name__, _ms(started)
        outcome = "delivered" if 200 <= response.status_code < 300 else "http_error"
        return outcome, response.status_code, excerpt, _ms(started)

    async def _record(
        self,
        delivery_id: uuid.UUID,
        outcome: str,
        status_code: int | None,
        excerpt: str,
        latency_ms: float,
    ) -> None:
        """The attempt in the log, the delivery's next state, and the endpoint's health."""
        now = utcnow()
        async with self._sessionmaker() as session, session.begin():
            delivery = await session.get(EventDelivery, delivery_id, with_for_update=True)
            if delivery is None:
                return
            endpoint = await session.get(EventEndpoint, delivery.endpoint_id, with_for_update=True)
            if endpoint is None:
                return
            session.add(
                EventDeliveryAttempt(
                    delivery_id=delivery.id,
                    endpoint_id=delivery.endpoint_id,
                    event_id=delivery.event_id,
                    attempted_at=now,
                    outcome=outcome,
                    status_code=status_code,
                    latency_ms=latency_ms,
                    response_excerpt=excerpt,
                )
            )
            if outcome == "delivered":
                delivery.status = "delivered"
                delivery.delivered_at = now
                endpoint.failing_since = None
                return
            failed_attempts = delivery.attempts
            if failed_attempts > len(self._retry_schedule):
                delivery.status = "failed"
            else:
                wait = self._retry_schedule[failed_attempts - 1]
                wait *= 1 + random.uniform(-JITTER, JITTER)  # noqa: S311 (jitter, not secrecy)
                delivery.next_attempt_at = now + timedelta(seconds=wait)
            if endpoint.failing_since is None:
                endpoint.failing_since = now
            elif (
                endpoint.status == "active"
                and (now - endpoint.failing_since).total_seconds()
                >= self._settings.event_disable_after_seconds
            ):
                await _disable(session, endpoint, now)

    async def _measure_backlog(self) -> None:
        async with self._sessionmaker() as session:
            oldest = await session.scalar(
                select(func.min(Event.created_at))
                .select_from(EventDelivery)
                .join(Event, Event.id == EventDelivery.event_id)
                .where(EventDelivery.status == "pending")
            )
            unfanned = await session.scalar(
                select(func.min(Event.created_at)).where(Event.fanned_out_at.is_(None))
            )
        moments = [m for m in (oldest, unfanned) if m is not None]
        age = (utcnow() - min(moments)).total_seconds() if moments else 0.0
        metrics.record_event_backlog(max(0.0, age))


def _wants(endpoint: EventEndpoint, event: Event) -> bool:
    if event.type not in endpoint.event_types:
        return False
    if endpoint.tenant_id is None:
        # The operator's endpoints: service-wide events, and tenants' events they subscribe to.
        return True
    return event.tenant_id == endpoint.tenant_id and event.type in TENANT_EVENT_TYPES


async def _disable(session: AsyncSession, endpoint: EventEndpoint, now: datetime) -> None:
    """Disable an endpoint that failed for too long, fail its pending deliveries and tell the
    operator (``endpoint.disabled``)."""
    assert endpoint.failing_since is not None  # noqa: S101 (the caller checked)
    reason = f"every delivery failed since {endpoint.failing_since.isoformat()}"
    endpoint.status = "disabled"
    endpoint.disabled_reason = reason
    await session.execute(
        update(EventDelivery)
        .where(EventDelivery.endpoint_id == endpoint.id, EventDelivery.status == "pending")
        .values(status="failed")
        .execution_options(synchronize_session=False)
    )
    await emit(
        session,
        "endpoint.disabled",
        {
            "endpoint_id": str(endpoint.id),
            "tenant_id": str(endpoint.tenant_id) if endpoint.tenant_id else None,
            "reason": reason,
        },
    )
    logger.warning("event endpoint disabled", endpoint_id=str(endpoint.id), at=now.isoformat())


async def _read_excerpt(response: httpx.Response) -> str:
    """Up to ``MAX_EXCERPT_BYTES`` of the answer, never more read."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        chunks.append(chunk)
        size += len(chunk)
        if size >= MAX_EXCERPT_BYTES:
            break
    return b"".join(chunks)[:MAX_EXCERPT_BYTES].decode("utf-8", errors="replace")


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
