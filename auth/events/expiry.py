"""``key.expiring``: a periodic sweep tells a tenant 7 days and 1 day before one of its keys
expires. Each notice's event has a dedupe key (key, notice), so every worker may sweep and each
notice is still sent once; the outbox row is the record of what was sent."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from auth.events.outbox import emit
from auth.models import ApiKey, utcnow

logger = structlog.get_logger(__name__)

# Days before expiry at which a tenant is told, largest first.
NOTICE_DAYS = (7, 1)


async def sweep_key_expiry(session: AsyncSession) -> int:
    """Queue the expiry notices due now (in the session's transaction); how many were new."""
    now = utcnow()
    horizon = now + timedelta(days=max(NOTICE_DAYS))
    keys = await session.scalars(
        select(ApiKey).where(
            ApiKey.tenant_id.is_not(None),
            ApiKey.revoked_at.is_(None),
            ApiKey.expires_at.is_not(None),
            ApiKey.expires_at > now,
            ApiKey.expires_at <= horizon,
        )
    )
    queued = 0
    for key in keys:
        assert key.expires_at is not None  # noqa: S101 (the query's condition)
        left = key.expires_at - now
        # The nearest notice that is due: a key created 2 days before its expiry is told once
        # (the 7-day notice), and again the day before.
        due = [days for days in NOTICE_DAYS if left <= timedelta(days=days)]
        days = min(due)
        added = await emit(
            session,
            "key.expiring",
            {
                "key_id": str(key.id),
                "name": key.name,
                "prefix": key.display_prefix,
                "expires_at": key.expires_at.isoformat(),
                "days_before": days,
            },
            tenant_id=key.tenant_id,
            dedupe_key=f"key.expiring:{key.id}:{days}",
        )
        queued += int(added)
    return queued


async def sweep_key_expiry_periodically(
    sessionmaker: async_sessionmaker[AsyncSession], interval_seconds: float
) -> None:
    """Run :func:`sweep_key_expiry` every ``interval_seconds`` (each worker; once per notice),
    the first time one interval after start (a notice a few minutes late is harmless, and
    starting a worker costs no query)."""
    while True:
        await asyncio.sleep(interval_seconds)
        try:
            async with sessionmaker() as session, session.begin():
                await sweep_key_expiry(session)
        except Exception as exc:
            logger.warning("key expiry sweep failed", error=type(exc).__name__)
