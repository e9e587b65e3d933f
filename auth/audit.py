"""The audit trail: an append-only hash chain of every administrative and self-service change.

Each event carries the SHA-256 of the previous event's canonical form (``prev_hash``) and of its
own (``hash``), and its ``id`` is its position in the chain. ``verify_chain`` recomputes the
chain and names the first event that was edited, deleted or moved. The chain detects tampering
by anyone who does not also rewrite every later hash and the head row; an operator who keeps the
head hash that ``modelgate audit verify`` prints somewhere else detects even that.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from auth.models import AuditChainHead, AuditEvent, utcnow

# The previous hash of the first event.
GENESIS_HASH = "0" * 64
_USER_AGENT_LENGTH = 256
_ADDRESS_LENGTH = 64
_REQUEST_ID_LENGTH = 64


@dataclass(frozen=True)
class Actor:
    """Who is making a change, and from where: every service that changes state takes one,
    so that no entry point (HTTP route, CLI) can make a change without its audit event."""

    name: str  # "admin:<name>", "tenant:<id>" or "cli"
    key_id: uuid.UUID | None = None
    client_addr: str | None = None
    user_agent: str | None = None
    request_id: str | None = None


CLI_ACTOR = Actor(name="cli")


def canonical_form(event: AuditEvent) -> bytes:
    """The bytes an event's hash is taken over: every field but the hash itself, as JSON with
    sorted keys and no insignificant whitespace."""
    document = {
        "id": event.id,
        "created_at": event.created_at.astimezone(UTC).isoformat(timespec="microseconds"),
        "actor": event.actor,
        "actor_key_id": str(event.actor_key_id) if event.actor_key_id else None,
        "action": event.action,
        "target_type": event.target_type,
        "target_id": event.target_id,
        "tenant_id": str(event.tenant_id) if event.tenant_id else None,
        "remote_addr": event.remote_addr,
        "user_agent": event.user_agent,
        "request_id": event.request_id,
        "detail": event.detail,
        "prev_hash": event.prev_hash,
    }
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def event_hash(event: AuditEvent) -> str:
    """The hex SHA-256 of the event's canonical form."""
    return hashlib.sha256(canonical_form(event)).hexdigest()


def _clip(value: str | None, length: int) -> str | None:
    return value[:length] if value is not None else None


async def record_event(
    session: AsyncSession,
    actor: Actor,
    *,
    action: str,
    target_type: str,
    target_id: str,
    tenant_id: uuid.UUID | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append an event to the chain, in the session's transaction (committed with the change it
    records). ``detail`` holds the changed fields and never a secret."""
    # The head row is updated before it is read: the update takes the row's lock (Postgres) or
    # the database's write lock (SQLite) and holds it until the transaction ends, so concurrent
    # writers extend the chain one after the other and never from the same event.
    position, previous = (
        await session.execute(
            update(AuditChainHead)
            .where(AuditChainHead.id == 1)
            .values(last_event_id=AuditChainHead.last_event_id + 1)
            .returning(AuditChainHead.last_event_id, AuditChainHead.last_hash)
            .execution_options(synchronize_session=False)
        )
    ).one()
    event = AuditEvent(
        id=position,
        created_at=utcnow(),
        actor=actor.name,
        actor_key_id=actor.key_id,
        action=action,
        target_type=target_type,
        target_id=target_id,
        tenant_id=tenant_id,
        remote_addr=_clip(actor.client_addr, _ADDRESS_LENGTH),
        user_agent=_clip(actor.user_agent, _USER_AGENT_LENGTH),
        request_id=_clip(actor.request_id, _REQUEST_ID_LENGTH),
        # Through JSON once, so that the hash is taken over what the database will give back.
        detail=json.loads(json.dumps(detail or {}, default=str)),
        prev_hash=previous,
    )
    event.hash = event_hash(event)
    session.add(event)
    await session.execute(
        update(AuditChainHead)
        .where(AuditChainHead.id == 1)
        .values(last_hash=event.hash)
        .execution_options(synchronize_session=False)
    )
    await session.flush()
    return event


@dataclass(frozen=True)
class EventFilter:
    """Which events ``list_events`` returns; every field is optional."""

    tenant_id: uuid.UUID | None = None
    actor: str | None = None
    action: str | None = None
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive


EventQuery = Select[AuditEvent]


def _filtered(statement: EventQuery, where: EventFilter) -> EventQuery:
    if where.tenant_id is not None:
        statement = statement.where(AuditEvent.tenant_id == where.tenant_id)
    if where.actor is not None:
        statement = statement.where(AuditEvent.actor == where.actor)
    if where.action is not None:
        statement = statement.where(AuditEvent.action == where.action)
    if where.since is not None:
        statement = statement.where(AuditEvent.created_at >= where.since)
    if where.until is not None:
        statement = statement.where(AuditEvent.created_at < where.until)
    return statement


async def list_events(
    session: AsyncSession,
    where: EventFilter | None = None,
    *,
    before_id: int | None = None,
    limit: int = 100,
) -> Sequence[AuditEvent]:
    """A page of events, newest first; the next page starts before the last one's id."""
    statement = _filtered(select(AuditEvent), where or EventFilter())
    if before_id is not None:
        statement = statement.where(AuditEvent.id < before_id)
    result = await session.scalars(statement.order_by(AuditEvent.id.desc()).limit(limit))
    return result.all()


@dataclass(frozen=True)
class ChainReport:
    """What ``verify_chain`` found: ``first_bad_id`` and ``problem`` are None when it is intact."""

    events: int
    head_hash: str
    first_bad_id: int | None = None
    problem: str | None = None

    @property
    def intact(self) -> bool:
        """Whether no tampering was found."""
        return self.problem is None


async def _chain_head(session: AsyncSession) -> tuple[int, str] | None:
    """Where the head row says the chain ends: (last event id, its hash), read now (columns,
    not the row's object, which the session could hold from an earlier read)."""
    row = (
        await session.execute(
            select(AuditChainHead.last_event_id, AuditChainHead.last_hash).where(
                AuditChainHead.id == 1
            )
        )
    ).one_or_none()
    return (row[0], row[1]) if row is not None else None


async def verify_chain(session: AsyncSession, *, batch: int = 1000) -> ChainReport:
    """Recompute the whole chain in id order, in constant memory, and report the first event
    that was edited (its hash no longer matches), deleted (a gap, or a cut-off end) or moved
    (its previous hash names another event).

    The chain's recorded end is read before the walk and again after it, so that events that
    concurrent writers append meanwhile (each moves the head on in its own transaction) are
    not taken for a tampered end: the walk must reach the end read first, with the hash
    recorded for it, and may go on only as far as the end read last."""
    before = await _chain_head(session)
    expected_id = 1
    previous_hash = GENESIS_HASH
    # The hash of the event at the end read first, once the walk has reached it.
    hash_at_start_end = GENESIS_HASH if before is not None and before[0] == 0 else None
    count = 0
    stream = await session.stream_scalars(
        select(AuditEvent).order_by(AuditEvent.id).execution_options(yield_per=batch)
    )
    async for event in stream:
        if event.id != expected_id:
            return ChainReport(count, previous_hash, expected_id, f"event {expected_id} is missing")
        if event.prev_hash != previous_hash:
            return ChainReport(
                count,
                previous_hash,
                event.id,
                f"event {event.id} does not follow event {event.id - 1} "
                "(deleted, inserted or reordered)",
            )
        if event_hash(event) != event.hash:
            return ChainReport(count, previous_hash, event.id, f"event {event.id} was edited")
        previous_hash = event.hash
        expected_id += 1
        count += 1
        if before is not None and count == before[0]:
            hash_at_start_end = previous_hash
        # Each event is checked once; the session need not keep it.
        session.expunge(event)
    after = await _chain_head(session)
    if before is None or after is None:
        end: tuple[int, str] | None = None
    elif count < before[0] or hash_at_start_end != before[1]:
        end = before  # cut off before the end recorded when the walk began, or that end moved
    elif count > after[0] or (count == after[0] and previous_hash != after[1]):
        end = after  # events beyond the end recorded now, or the last one is not it
    else:
        return ChainReport(count, previous_hash)
    return ChainReport(
        count,
        previous_hash,
        count + 1,
        f"the chain's recorded end is event {end[0] if end else '?'}: "
        "events after the last one found were deleted",
    )
