"""The concurrency limit: how many requests of one key may be in flight at once, across every
worker (``AuthSubject.max_in_flight``).

On Redis each key has a sorted set of its requests in flight (member: a random slot id; score:
the Redis server's time when it started). Taking a slot is one script (drop the entries older
than ``concurrency_slot_ttl_seconds``, count, add), so a worker killed mid-request leaks its
slots for that long at most; giving it back is one ``ZREM``. Without Redis the counts live in the
process. A request beyond the limit is refused at once (429 ``concurrency-limit-exceeded``),
never queued.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import structlog

from auth.errors import DependencyUnavailable, ModelgateError
from auth.limits.limiter import OUTAGE_ERRORS, RateLimiter

logger = structlog.get_logger(__name__)

_NAMESPACE = "mg:inflight:"

# KEYS[1]: the key's set. ARGV: the limit, the slot's id, how long a slot may live (ms).
_ACQUIRE = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""


class ConcurrencyLimitExceeded(ModelgateError):
    """The key already has as many requests in flight as it may."""

    status_code = 429
    type = "concurrency-limit-exceeded"
    title = "Too many requests in flight"

    def __init__(self, limit: int) -> None:
        super().__init__(f"this key may have at most {limit} requests in flight")
        self.retry_after = 1


class Slot:
    """One request's place among its key's requests in flight; ``release`` gives it back, once
    however often it is called."""

    __slots__ = ("_limiter", "key_id", "released", "slot_id")

    def __init__(self, limiter: ConcurrencyLimiter, key_id: str, slot_id: str) -> None:
        self._limiter = limiter
        self.key_id = key_id
        self.slot_id = slot_id
        self.released = False

    async def release(self) -> None:
        """Give the slot back (a no-op after the first call; never raises)."""
        if self.released:
            return
        self.released = True
        await self._limiter._release(self)


class ConcurrencyLimiter:
    """Counts each key's requests in flight, on Redis (shared by every worker) or in memory.

    It uses the rate limiter's Redis client and follows its failure mode: while Redis fails,
    ``closed`` answers 503 and ``open`` counts in this process's memory (the rate limiter logs
    the outage once, and tells when to try Redis again)."""

    def __init__(self, rate_limiter: RateLimiter, slot_ttl_seconds: float) -> None:
        self._rate_limiter = rate_limiter
        client = rate_limiter.client
        self._client: Any = client
        self._ttl_ms = int(slot_ttl_seconds * 1000)
        self._script = client.register_script(_ACQUIRE) if client is not None else None
        # In process memory: without Redis, and for the fallback in fail-open mode.
        self._counts: dict[str, int] = {}
        self.in_memory: set[Slot] = set()

    def held(self, key_id: str) -> int:
        """Slots this process holds in memory for ``key_id`` (for tests and metrics)."""
        return self._counts.get(key_id, 0)

    async def acquire(self, key_id: str, limit: int) -> Slot:
        """Take a slot for ``key_id`` or raise ``ConcurrencyLimitExceeded``."""
        slot = Slot(self, key_id, uuid.uuid4().hex)
        rate_limiter = self._rate_limiter
        if self._script is not None and not rate_limiter.skipping_redis():
            try:
                # Bounded by the client's socket timeouts, as the rate limiter's calls are.
                taken = await self._script(
                    keys=[_NAMESPACE + key_id], args=[limit, slot.slot_id, self._ttl_ms]
                )
            except OUTAGE_ERRORS as exc:
                rate_limiter.redis_failed(exc)
                if not rate_limiter.fail_open:
                    raise DependencyUnavailable("concurrency limiter unavailable") from exc
                return self._acquire_in_memory(slot, limit)
            except Exception as exc:
                if type(exc).__module__.startswith("redis"):
                    raise DependencyUnavailable("concurrency limiter unavailable") from exc
                raise
            if not taken:
                raise ConcurrencyLimitExceeded(limit)
            return slot
        if self._script is not None and not rate_limiter.fail_open:
            raise DependencyUnavailable("concurrency limiter unavailable")
        return self._acquire_in_memory(slot, limit)

    def _acquire_in_memory(self, slot: Slot, limit: int) -> Slot:
        held = self._counts.get(slot.key_id, 0)
        if held >= limit:
            raise ConcurrencyLimitExceeded(limit)
        self._counts[slot.key_id] = held + 1
        self.in_memory.add(slot)
        return slot

    async def _release(self, slot: Slot) -> None:
        if slot in self.in_memory:
            self.in_memory.discard(slot)
            remaining = self._counts.get(slot.key_id, 1) - 1
            if remaining > 0:
                self._counts[slot.key_id] = remaining
            else:
                self._counts.pop(slot.key_id, None)
            return
        if self._client is None:
            return
        try:
            await self._client.zrem(_NAMESPACE + slot.key_id, slot.slot_id)
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
