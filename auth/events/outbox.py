"""The transactional outbox: an event is inserted in the transaction of the change that caused
it, so it exists if and only if that change committed. ``auth.events.dispatcher`` delivers it.

Two ways in: :func:`emit` for a service that works through an ``AsyncSession`` (key and tenant
changes, model activations, the expiry sweep), and :class:`ThresholdEvents` for the usage writer,
which speaks to the driver directly and decides thresholds from the quota counter it has just
updated (no query per request)."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from auth.models import Event, utcnow

# Events about one tenant: its own endpoints (and operator endpoints that subscribe) get them.
TENANT_EVENT_TYPES = frozenset(
    {
        "usage.threshold",
        "quota.exhausted",
        "key.expiring",
        "key.revoked",
        "key.rotated",
        "tenant.suspended",
        "webhook.test",
    }
)
# Service-wide events: only operator endpoints get them.
OPERATOR_EVENT_TYPES = frozenset(
    {
        "model.activated",
        "model.activation_failed",
        "model.unhealthy",
        "endpoint.disabled",
        "webhook.test",
    }
)
# Every event type, as the routes' schema lists them.
EventType = Literal[
    "usage.threshold",
    "quota.exhausted",
    "key.expiring",
    "key.revoked",
    "key.rotated",
    "tenant.suspended",
    "webhook.test",
    "model.activated",
    "model.activation_failed",
    "model.unhealthy",
    "endpoint.disabled",
]
EVENT_TYPES = frozenset(get_args(EventType))
assert EVENT_TYPES == TENANT_EVENT_TYPES | OPERATOR_EVENT_TYPES  # noqa: S101

# Percentages of the monthly quota that raise usage.threshold, unless the plan or tenant says.
DEFAULT_THRESHOLDS: tuple[int, ...] = (50, 80, 90, 100)


def event_body(event_type: str, timestamp: datetime, data: dict[str, Any]) -> str:
    """The Standard Webhooks body ``{"type", "timestamp", "data"}``, as the exact text signed."""
    return json.dumps(
        {"type": event_type, "timestamp": timestamp.isoformat(), "data": data},
        separators=(",", ":"),
        sort_keys=True,
    )


async def emit(
    session: AsyncSession,
    event_type: str,
    data: dict[str, Any],
    *,
    tenant_id: uuid.UUID | None = None,
    dedupe_key: str | None = None,
) -> bool:
    """Add an event to the outbox in the session's transaction; whether it was added (False:
    an event with this ``dedupe_key`` exists already). ``data`` never holds a secret or a key."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    now = utcnow()
    values = {
        "id": uuid.uuid4(),
        "type": event_type,
        "tenant_id": tenant_id,
        "payload": event_body(event_type, now, data),
        "dedupe_key": dedupe_key,
        "created_at": now,
    }
    if dedupe_key is None:
        session.add(Event(**values))
        await session.flush()
        return True
    dialect = session.get_bind().dialect.name
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    result = await session.execute(
        insert(Event).values(**values).on_conflict_do_nothing(index_elements=[Event.dedupe_key])
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def threshold_units(quota: int, percent: int) -> int:
    """The units at which ``percent`` of ``quota`` is reached (at least 1)."""
    return max(1, math.ceil(quota * percent / 100))


def alert_units(quota: int, thresholds: Iterable[int]) -> list[int]:
    """The unit counts at which a month's counter crosses its alert thresholds, in order."""
    if quota <= 0:
        return []
    return sorted({threshold_units(quota, percent) for percent in thresholds})


def crossed_thresholds(before: int, after: int, quota: int, thresholds: Iterable[int]) -> list[int]:
    """The thresholds that a month's counter going from ``before`` to ``after`` units crossed.

    The counter's row is locked by the transaction that moves it, so every unit count is
    passed exactly once across all workers: each threshold is crossed by one transaction."""
    if quota <= 0:
        return []
    return sorted(
        percent for percent in set(thresholds) if before < threshold_units(quota, percent) <= after
    )


def crossed_so_far(used: int, quota: int | None, thresholds: Iterable[int]) -> list[int]:
    """The thresholds a month at ``used`` units has crossed (for ``/me/usage``)."""
    if quota is None or quota <= 0:
        return []
    return sorted(p for p in set(thresholds) if used >= threshold_units(quota, p))


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """An event the usage writer inserts in its flush transaction."""

    id: uuid.UUID
    type: str
    tenant_id: uuid.UUID
    payload: str
    dedupe_key: str
    created_at: datetime


def threshold_event(
    tenant_id: uuid.UUID, month: str, percent: int, used: int, quota: int
) -> PendingEvent:
    """``usage.threshold`` for one threshold of one tenant's month (unique per all three)."""
    data = {
        "tenant_id": str(tenant_id),
        "month": month,
        "threshold": percent,
        "units_used": used,
        "monthly_quota": quota,
    }
    return _tenant_event(
        "usage.threshold", tenant_id, data, f"usage.threshold:{tenant_id}:{month}:{percent}"
    )


def exhausted_event(tenant_id: uuid.UUID, month: str, used: int, quota: int) -> PendingEvent:
    """``quota.exhausted``: the month's first refusal (unique per tenant and month)."""
    data = {
        "tenant_id": str(tenant_id),
        "month": month,
        "units_used": used,
        "monthly_quota": quota,
    }
    return _tenant_event("quota.exhausted", tenant_id, data, f"quota.exhausted:{tenant_id}:{month}")


def _tenant_event(
    event_type: str, tenant_id: uuid.UUID, data: dict[str, Any], dedupe_key: str
) -> PendingEvent:
    """A tenant's event of the usage writer's, happening now, written once per ``dedupe_key``."""
    now = utcnow()
    return PendingEvent(
        uuid.uuid4(), event_type, tenant_id, event_body(event_type, now, data), dedupe_key, now
    )


# The usage writer's statement, in Postgres' parameter style: an event that happened already
# (its dedupe key) is not inserted again.
INSERT_EVENT = (
    "INSERT INTO event (id, type, tenant_id, payload, dedupe_key, created_at) "
    "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (dedupe_key) DO NOTHING"
)
EVENT_COLUMNS: Sequence[str] = ("id", "type", "tenant_id", "payload", "dedupe_key", "created_at")


def event_row(event: PendingEvent) -> tuple[Any, ...]:
    """The statement's values, in ``EVENT_COLUMNS`` order (before bind processing)."""
    return (
        event.id,
        event.type,
        event.tenant_id,
        event.payload,
        event.dedupe_key,
        event.created_at,
    )
