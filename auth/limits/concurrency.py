"""The concurrency limit: how many requests of one key may be in flight at once, across every
worker (``AuthSubject.max_in_flight``).

A request's ``Slot`` is made here (``ConcurrencyLimiter.slot``) and taken by the rate limiter in
the same step as the request's rate-limit check (``RateLimiter.hit(..., slot=slot)``): on Redis,
in the very script and round trip of that check (``auth.limits.redis_checks``), so that a key
with ``max_in_flight`` costs one round trip more than one without (the release), not two. Each
key has a sorted set of its requests in flight there (member: the slot's random id; score: the
Redis server's time when it was taken); the script drops the entries older than
``concurrency_slot_ttl_seconds`` (so a worker killed mid-request leaks its slots for that long at
most), counts, and adds the slot only if the rate limit lets the request through as well. Giving
it back is one ``ZREM``. Without Redis, and for the fail-open fallback, the counts live in the
process. A request beyond the limit is refused at once (429 ``concurrency-limit-exceeded``),
never queued.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING, Any, Literal

import structlog

from auth.errors import ModelgateError
from auth.redis_connection import hash_tag

if TYPE_CHECKING:
    from auth.limits.limiter import RateLimiter

logger = structlog.get_logger(__name__)

_NAMESPACE = "mg:inflight:"


class ConcurrencyLimitExceeded(ModelgateError):
    """The key already has as many requests in flight as it may."""

    status_code = 429
    type = "concurrency-limit-exceeded"
    title = "Too many requests in flight"

    def __init__(self, limit: int) -> None:
        super().__init__(f"this key may have at most {limit} requests in flight")
        self.retry_after = 1


class Slot:
    """One request's place among its key's requests in flight (at most ``limit``). It is held
    once the rate limiter's check took it; ``release`` gives it back, once however often it is
    called, and is a no-op for a slot that was never taken."""

    __slots__ = ("_limiter", "held_in", "key_id", "limit", "released", "slot_id")

    def __init__(self, limiter: ConcurrencyLimiter, key_id: str, limit: int) -> None:
        self._limiter = limiter
        self.key_id = key_id
        self.limit = limit
        self.slot_id = uuid.uuid4().hex
        # Where the slot may be held: None (not taken), "redis" (taken, or sent to be taken
        # by a check whose answer never came back: the release removes it either way) or
        # "memory" (this process's counts).
        self.held_in: Literal["redis", "memory"] | None = None
        self.released = False

    @property
    def redis_key(self) -> str:
        """The key's set of slots on Redis (in its limits' hash slot: the rate-limit check's
        script takes the slot)."""
        return _NAMESPACE + hash_tag(self.key_id)

    @property
    def ttl_ms(self) -> int:
        """How long the slot lives on Redis if never given back (milliseconds)."""
        return self._limiter.ttl_ms

    def take_in_memory(self) -> None:
        """Take the slot in this process's counts, or raise ``ConcurrencyLimitExceeded``."""
        self._limiter._take_in_memory(self)

    async def release(self) -> None:
        """Give the slot back (a no-op after the first call, and for a slot not taken; never
        raises)."""
        if self.released:
            return
        self.released = True
        if self.held_in is not None:
            await self._limiter._release(self)


class ConcurrencyLimiter:
    """Makes each request's slot, and keeps the counts in process memory (without Redis, and
    for the fail-open fallback) and gives slots back; the rate limiter takes them.

    It uses the rate limiter's Redis client, and follows its failure mode: while Redis fails,
    ``closed`` answers 503 and ``open`` counts in this process's memory."""

    def __init__(self, rate_limiter: RateLimiter, slot_ttl_seconds: float) -> None:
        self._client: Any = rate_limiter.client
        self.ttl_ms = int(slot_ttl_seconds * 1000)
        # In process memory: without Redis, and for the fallback in fail-open mode.
        self._counts: dict[str, int] = {}

    def slot(self, key_id: str, limit: int) -> Slot:
        """A slot for one request of ``key_id``, not yet taken: pass it to
        ``RateLimiter.hit`` (which takes it with the rate-limit check or raises
        ``ConcurrencyLimitExceeded``), and ``release`` it when the request is over."""
        return Slot(self, key_id, limit)

    def held(self, key_id: str) -> int:
        """Slots this process holds in memory for ``key_id`` (for tests and metrics)."""
        return self._counts.get(key_id, 0)

    def _take_in_memory(self, slot: Slot) -> None:
        held = self._counts.get(slot.key_id, 0)
        if held >= slot.limit:
            raise ConcurrencyLimitExceeded(slot.limit)
        self._counts[slot.key_id] = held + 1
        slot.held_in = "memory"

    async def _release(self, slot: Slot) -> None:
        if slot.held_in == "memory":
            remaining = self._counts.get(slot.key_id, 1) - 1
            if remaining > 0:
                self._counts[slot.key_id] = remaining
            else:
                self._counts.pop(slot.key_id, None)
            return
        if self._client is None:
            return
        try:
            await self._client.zrem(slot.redis_key, slot.slot_id)
        except Exception as exc:
            # The response is already sent; the slot expires by itself after the slot TTL.
            logger.warning("could not release a concurrency slot", error=type(exc).__name__)


async def release_detached(slot: Slot) -> None:
    """Release ``slot`` even if the caller is cancelled meanwhile (a client that went away): the
    release runs as a task of its own, which the caller's cancellation does not stop."""
    if slot.released:
        return
    task = asyncio.ensure_future(slot.release())
    _releasing.add(task)  # a task nobody references may be collected before it ends
    task.add_done_callback(_releasing.discard)
    await asyncio.shield(task)


_releasing: set[asyncio.Task[None]] = set()
