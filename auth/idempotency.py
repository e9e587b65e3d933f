"""``Idempotency-Key``: the key's scope and the body's fingerprint, the stored answers, the
claims of the requests in flight, and the bulk prune of expired answers.

The guarantee rests on one row per key (``IdempotentResponse``), written by the usage writer in
the very transaction that bills its request (``auth.usage.writer``): a row exists exactly when the
request was billed. A second request that reaches the writer with the same key inserts nothing,
is not billed, and is answered from the row. The claim of a request in flight
(:class:`InFlightClaims`: Redis ``SET NX PX`` with several workers, else this process's memory)
only spares the duplicate its inference and answers it 409 while the first is served; it expires
by itself, so a worker killed mid-request cannot block its key: the retry is either answered from
the row (the kill came after the commit) or served and billed once (it came before).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from auth.errors import IdempotencyKeyInvalid
from auth.models import IdempotentResponse, utcnow
from auth.turn_batch import TurnBatch

logger = structlog.get_logger(__name__)

MAX_KEY_LENGTH = 255
# Expired answers deleted per transaction by prune_expired.
PRUNE_BATCH = 5_000


def parse_key(values: list[str]) -> str:
    """The key of the request's ``Idempotency-Key`` header values: exactly one RFC 8941
    sf-string (``"..."``, printable ASCII, ``\\"`` and ``\\\\`` the only escapes) of 1 to 255
    characters. Anything else raises ``IdempotencyKeyInvalid``."""
    if len(values) != 1:
        raise IdempotencyKeyInvalid("send one Idempotency-Key header")
    raw = values[0].strip(" ")
    if len(raw) < 3 or len(raw) > 2 * MAX_KEY_LENGTH + 2 or raw[0] != '"' or raw[-1] != '"':
        raise IdempotencyKeyInvalid(
            'Idempotency-Key must be a Structured Field string: "1 to 255 printable characters"'
        )
    key: list[str] = []
    inner, index = raw[1:-1], 0
    while index < len(inner):
        char = inner[index]
        if char == "\\":
            index += 1
            if index >= len(inner) or inner[index] not in '"\\':
                raise IdempotencyKeyInvalid("Idempotency-Key has a bad escape")
            char = inner[index]
        elif char == '"' or not " " <= char <= "~":
            raise IdempotencyKeyInvalid("Idempotency-Key holds a character a string may not")
        key.append(char)
        index += 1
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise IdempotencyKeyInvalid(
            f"Idempotency-Key must hold 1 to {MAX_KEY_LENGTH} printable characters"
        )
    return "".join(key)


def key_scope(
    tenant_id: uuid.UUID, api_key_id: uuid.UUID, method: str, route: str, key: str
) -> bytes:
    """The key's identity: SHA-256 of its tenant, API key, method, route and key string (one
    tenant's key can never name another's answer)."""
    parts = (str(tenant_id), str(api_key_id), method, route, key)
    return hashlib.sha256("\n".join(parts).encode()).digest()


def fingerprint(body: bytes) -> bytes:
    """SHA-256 of the request's body as received."""
    return hashlib.sha256(body).digest()


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """An answer to remember (or remembered) under a key's scope."""

    scope: bytes
    tenant_id: uuid.UUID
    api_key_id: uuid.UUID
    fingerprint: bytes
    status_code: int
    headers: dict[str, str]
    body: bytes
    created_at: datetime
    expires_at: datetime

    def row(self) -> tuple[Any, ...]:
        """The values of an ``idempotent_response`` row, in its columns' order."""
        return (
            self.scope,
            self.tenant_id,
            self.api_key_id,
            self.fingerprint,
            self.status_code,
            json.dumps(self.headers, separators=(",", ":")),
            self.body,
            self.created_at,
            self.expires_at,
        )


ROW_COLUMNS = (
    "scope",
    "tenant_id",
    "api_key_id",
    "fingerprint",
    "status_code",
    "headers",
    "body",
    "created_at",
    "expires_at",
)


# The answers to remember, one row per key, in one statement (its VALUES are added per batch);
# a key whose unexpired answer is stored already inserts nothing (an expired one not yet pruned
# is replaced), and RETURNING names the keys that went in.
_REMEMBER_INTO = (
    "INSERT INTO idempotent_response (scope, tenant_id, api_key_id, fingerprint, status_code, "
    "headers, body, created_at, expires_at) VALUES "
)
_REMEMBER_ON_CONFLICT = (
    " ON CONFLICT (scope) DO UPDATE SET tenant_id = excluded.tenant_id, "
    "api_key_id = excluded.api_key_id, fingerprint = excluded.fingerprint, "
    "status_code = excluded.status_code, headers = excluded.headers, body = excluded.body, "
    "created_at = excluded.created_at, expires_at = excluded.expires_at "
    "WHERE idempotent_response.expires_at <= excluded.created_at RETURNING scope"
)
FORGET = "DELETE FROM idempotent_response WHERE scope = $1"


def remember_statement(dialect: str, count: int) -> str:
    """The usage writer's insert of ``count`` answers in ``dialect``'s parameter style."""
    width = len(ROW_COLUMNS)
    if dialect == "postgresql":
        values = ", ".join(
            "(" + ", ".join(f"${row * width + column + 1}" for column in range(width)) + ")"
            for row in range(count)
        )
    else:
        values = ", ".join(["(" + ", ".join(["?"] * width) + ")"] * count)
    return _REMEMBER_INTO + values + _REMEMBER_ON_CONFLICT


def expiry(created_at: datetime, ttl_seconds: int) -> datetime:
    """When an answer stored at ``created_at`` expires."""
    return created_at + timedelta(seconds=ttl_seconds)


# The lookup, through the driver (asyncpg or aiosqlite) as the usage writer speaks to it:
# SQLAlchemy's execution layer costs more CPU than the read itself, on the path of every keyed
# request. One statement answers the lookups of one event-loop turn (AnswerLookups).
_LOOKUP_COLUMNS = (
    "SELECT scope, tenant_id, api_key_id, fingerprint, status_code, headers, body, created_at, "
    "expires_at FROM idempotent_response WHERE "
)


async def lookup_many(engine: AsyncEngine, scopes: list[bytes]) -> dict[bytes, StoredResponse]:
    """The unexpired answers stored under ``scopes``, by scope: one primary-key read per scope in
    one statement, outside any transaction (no BEGIN and ROLLBACK around it)."""
    table = IdempotentResponse.__table__
    dialect = engine.dialect
    expires = table.c.expires_at.type.dialect_impl(dialect)
    now = utcnow()
    process = expires.bind_processor(dialect)
    bound_now = process(now) if process else now
    unique = list(dict.fromkeys(scopes))
    async with engine.connect() as connection:
        raw = await connection.get_raw_connection()
        driver: Any = raw.driver_connection
        if dialect.name == "postgresql":
            rows = await driver.fetch(
                _LOOKUP_COLUMNS + "scope = ANY($1::bytea[]) AND expires_at > $2", unique, bound_now
            )
        else:
            marks = ", ".join("?" * len(unique))
            cursor = await driver.execute(
                _LOOKUP_COLUMNS + f"scope IN ({marks}) AND expires_at > ?",
                (*unique, bound_now),
            )
            try:
                rows = await cursor.fetchall()
            finally:
                await cursor.close()
            # aiosqlite runs in its own transaction mode: end the read's.
            await driver.rollback()
    result = expires.result_processor(dialect, None)
    ids = table.c.tenant_id.type.dialect_impl(dialect).result_processor(dialect, None)

    def uid(value: Any) -> uuid.UUID:
        return ids(value) if ids else value  # type: ignore[return-value]

    def moment(value: Any) -> datetime:
        return result(value) if result else value  # type: ignore[return-value]

    return {
        bytes(row[0]): StoredResponse(
            scope=bytes(row[0]),
            tenant_id=uid(row[1]),
            api_key_id=uid(row[2]),
            fingerprint=bytes(row[3]),
            status_code=int(row[4]),
            headers=json.loads(row[5]),
            body=bytes(row[6]),
            created_at=moment(row[7]),
            expires_at=moment(row[8]),
        )
        for row in rows
    }


class AnswerLookups:
    """The stored answers' lookups of concurrent keyed requests, made in one statement per
    event-loop turn (``auth.turn_batch``): a keyed request would otherwise pay a pool checkout
    and a round trip of its own."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._batch: TurnBatch[bytes, StoredResponse | None] = TurnBatch(self._send)

    async def get(self, scope: bytes) -> StoredResponse | None:
        """The unexpired answer stored under ``scope``, if any."""
        return await self._batch.call(scope)

    async def _send(self, scopes: list[bytes]) -> list[StoredResponse | BaseException | None]:
        found = await lookup_many(self._engine, scopes)
        return [found.get(scope) for scope in scopes]


async def prune_expired(
    sessionmaker: async_sessionmaker[AsyncSession], *, batch: int = PRUNE_BATCH
) -> int:
    """Delete the expired answers in short transactions of ``batch`` rows (through the
    ``expires_at`` index); returns how many."""
    deleted = 0
    while True:
        async with sessionmaker() as session:
            now = utcnow()
            scopes = (
                select(IdempotentResponse.scope)
                .where(IdempotentResponse.expires_at <= now)
                .limit(batch)
            )
            result = await session.execute(
                delete(IdempotentResponse).where(IdempotentResponse.scope.in_(scopes))
            )
            await session.commit()
        count = int(getattr(result, "rowcount", 0) or 0)
        deleted += count
        if count < batch:
            return deleted


# Compare-and-delete: a claim is given back only by its holder (not after it expired and
# another request took it).
_RELEASE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)


_CLAIM_PREFIX = "modelgate:idem:"


class InFlightClaims:
    """Which keys have a request in flight: on Redis (every worker) or in this process.

    A claim expires after ``ttl_seconds`` (longer than any request may run), so a process that
    died holding one cannot block its key for longer."""

    def __init__(self, redis_client: Any, ttl_seconds: float) -> None:
        # None: no Redis, the claims are this process's.
        self._client = redis_client
        self._ttl_ms = max(1, int(ttl_seconds * 1000))
        self._local: dict[bytes, tuple[str, float]] = {}
        # On Redis, the claims (and the releases) of one event-loop turn go out in one pipeline.
        self._claims: TurnBatch[tuple[str, str], Any] = TurnBatch(self._send_claims)
        self._releases: TurnBatch[tuple[str, str], Any] = TurnBatch(self._send_releases)

    async def claim(self, scope: bytes) -> str | None:
        """A token for the claim on ``scope``, or None if another request holds it."""
        token = secrets.token_hex(8)
        if self._client is not None:
            taken = await self._claims.call((_CLAIM_PREFIX + scope.hex(), token))
            return token if taken else None
        now = time.monotonic()
        held = self._local.get(scope)
        if held is not None and held[1] > now:
            return None
        if len(self._local) > 10_000:
            self._local = {s: h for s, h in self._local.items() if h[1] > now}
        self._local[scope] = (token, now + self._ttl_ms / 1000)
        return token

    async def release(self, scope: bytes, token: str) -> None:
        """Give the claim back (only if ``token`` still holds it)."""
        if self._client is not None:
            await self._releases.call((_CLAIM_PREFIX + scope.hex(), token))
            return
        held = self._local.get(scope)
        if held is not None and held[0] == token:
            del self._local[scope]

    async def _send_claims(self, claims: list[tuple[str, str]]) -> list[Any]:
        pipeline = self._client.pipeline(transaction=False)
        for key, token in claims:
            pipeline.set(key, token, nx=True, px=self._ttl_ms)
        replies: list[Any] = await pipeline.execute(raise_on_error=False)
        return replies

    async def _send_releases(self, releases: list[tuple[str, str]]) -> list[Any]:
        pipeline = self._client.pipeline(transaction=False)
        for key, token in releases:
            pipeline.eval(_RELEASE, 1, key, token)
        replies: list[Any] = await pipeline.execute(raise_on_error=False)
        return replies


class AlreadyAnswered(Exception):
    """The usage writer found an answer already stored under the request's key: the request was
    not billed, and is to be answered from the store."""


@dataclass(slots=True)
class KeyedRequest:
    """A request that holds the claim on its key: what its answer is stored under."""

    scope: bytes
    fingerprint: bytes
    tenant_id: uuid.UUID
    api_key_id: uuid.UUID
    claims: InFlightClaims
    token: str

    def to_store(
        self, status_code: int, headers: dict[str, str], body: bytes, ttl_seconds: int
    ) -> StoredResponse:
        """The answer to store for this request, created now."""
        now = utcnow()
        return StoredResponse(
            scope=self.scope,
            tenant_id=self.tenant_id,
            api_key_id=self.api_key_id,
            fingerprint=self.fingerprint,
            status_code=status_code,
            headers=headers,
            body=body,
            created_at=now,
            expires_at=expiry(now, ttl_seconds),
        )


class ClaimHold:
    """The request's claim on its key, if it sent one; held around the whole request by the
    request-context middleware (``async with``), which gives it back on leaving, once the
    answer is sent or the request failed, timed out or lost its client."""

    __slots__ = ("request",)

    def __init__(self) -> None:
        self.request: KeyedRequest | None = None

    async def __aenter__(self) -> ClaimHold:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        keyed, self.request = self.request, None
        if keyed is None:
            return
        # Detached: a request cancelled meanwhile still gives its claim back.
        task = asyncio.ensure_future(keyed.claims.release(keyed.scope, keyed.token))
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.shield(task)


# How often each worker prunes the expired answers (in batches, through their expiry index).
PRUNE_INTERVAL_SECONDS = 600.0


async def prune_answers_periodically(
    sessionmaker: async_sessionmaker[AsyncSession], interval_seconds: float = PRUNE_INTERVAL_SECONDS
) -> None:
    """Every ``interval_seconds``, delete the expired answers; a failure (the database away)
    is logged and tried again next time, never fatal."""
    while True:
        await asyncio.sleep(interval_seconds)
        try:
            pruned = await prune_expired(sessionmaker)
            if pruned:
                logger.info("pruned expired idempotent answers", count=pruned)
        except Exception as exc:
            logger.warning("pruning idempotent answers failed", error=type(exc).__name__)
