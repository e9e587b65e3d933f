"""The admin audit trail."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from auth.models import AuditEvent


async def record_event(
    session: AsyncSession,
    *,
    actor: str,
    action: str,
    target_type: str,
    target_id: str,
    actor_key_id: uuid.UUID | None = None,
    tenant_id: uuid.UUID | None = None,
    remote_addr: str | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    """Add an audit event to the session's transaction (committed with the change it records)."""
    event = AuditEvent(
        actor=actor,
        actor_key_id=actor_key_id,
        action=action,
        target_type=target_type,
        target_id=target_id,
        tenant_id=tenant_id,
        remote_addr=remote_addr,
        detail=detail or {},
    )
    session.add(event)
    await session.flush()
    return event


async def list_events(session: AsyncSession, limit: int = 100) -> Sequence[AuditEvent]:
    """The newest audit events first."""
    result = await session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit))
    return result.all()
