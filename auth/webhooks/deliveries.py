"""Each signed webhook delivery id is accepted once, across every replica.

The first replica to insert ``(source, delivery_id)`` into ``webhook_delivery`` accepts the
delivery; any other insert of the pair (a retry, a replay, the same delivery sent to two
replicas behind a balancer) finds it there and is refused. The insert is in the transaction
that records the delivery's audit event, so a delivery whose transaction fails is not
remembered and its sender's retry is accepted. Rows are pruned in bulk once older than twice the
allowed clock skew: a delivery signed up to the skew ahead of our clock stays valid until the
skew after its timestamp, and no longer, so its row is not needed after that.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from auth.models import WebhookDelivery
from auth.webhooks.signatures import MAX_SKEW_SECONDS, WebhookSource

# How long an accepted delivery id is remembered.
REMEMBERED = timedelta(seconds=2 * MAX_SKEW_SECONDS)


async def claim_delivery(
    session: AsyncSession, source: WebhookSource, delivery_id: str, now: datetime
) -> bool:
    """Record the delivery as accepted, in the session's transaction: True if it is the first
    time, False if some replica already accepted this id (a concurrent insert of the same pair
    waits for the other transaction and then finds it)."""
    dialect = session.get_bind().dialect.name
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    result = await session.execute(
        insert(WebhookDelivery)
        .values(source=source, delivery_id=delivery_id, received_at=now)
        .on_conflict_do_nothing(
            index_elements=[WebhookDelivery.source, WebhookDelivery.delivery_id]
        )
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


async def prune_deliveries(session: AsyncSession, now: datetime) -> int:
    """Delete, in one statement, the delivery ids received longer than ``REMEMBERED`` ago."""
    result = await session.execute(
        delete(WebhookDelivery).where(WebhookDelivery.received_at < now - REMEMBERED)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
