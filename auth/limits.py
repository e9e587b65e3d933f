"""Per-key rate limits.

slowapi's ``Limiter`` holds the configuration (strategy, storage URI, default limit) and its
``RateLimitExceeded`` is the error. The per-request check goes through the asyncio API of
``limits`` (the library slowapi is built on), because slowapi's own checks are synchronous and
would block the event loop on every Redis round trip.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from limits import RateLimitItem, parse
from limits.aio.storage import Storage
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.storage import storage_from_string
from slowapi import Limiter
from slowapi.errors import RateLimitExceeded
from slowapi.wrappers import Limit

from auth.errors import DependencyUnavailable, InvalidRequest
from auth.settings import Settings

_NAMESPACE = "mg:key"


@dataclass(frozen=True)
class RateLimitStatus:
    """What the ``X-RateLimit-*`` headers report after a check."""

    limit: int
    remaining: int
    reset_at: float  # epoch seconds

    @property
    def retry_after(self) -> int:
        """Whole seconds until the window resets (at least 1)."""
        return max(1, int(self.reset_at - time.time() + 0.999))


class KeyRateLimitExceeded(RateLimitExceeded):
    """slowapi's error, with the status for the ``Retry-After`` and ``X-RateLimit-*`` headers."""

    def __init__(self, limit: Limit, status: RateLimitStatus) -> None:
        super().__init__(limit)
        self.status = status


@lru_cache(maxsize=256)
def parse_rate_limit(value: str) -> RateLimitItem:
    """Parse ``"100/minute"``-style limits (cached: tenants share a handful of values)."""
    try:
        return parse(value)
    except ValueError as exc:
        raise InvalidRequest(f"invalid rate limit {value!r}; expected e.g. '100/minute'") from exc


_ASYNC_STRATEGIES: dict[
    str,
    type[FixedWindowRateLimiter | MovingWindowRateLimiter | SlidingWindowCounterRateLimiter],
] = {
    "fixed-window": FixedWindowRateLimiter,
    "moving-window": MovingWindowRateLimiter,
    "sliding-window-counter": SlidingWindowCounterRateLimiter,
}


def _subject_key(request: Any) -> str:
    # slowapi requires a key function; the limiter is only ever checked per API key id.
    return str(request.state.subject.key_id)


class RateLimiter:
    """Checks per-key limits on Redis (``async+redis://``) or in process memory."""

    def __init__(self, settings: Settings) -> None:
        storage_uri = settings.redis_url or "memory://"
        self.config = Limiter(
            key_func=_subject_key,
            default_limits=[settings.default_rate_limit],
            storage_uri=storage_uri,
            strategy=settings.rate_limit_strategy,
            headers_enabled=True,
        )
        self.default_limit: str = settings.default_rate_limit
        self.storage_uri = storage_uri
        self.uses_redis = bool(settings.redis_url)
        self._timeout = settings.redis_timeout_seconds
        options: dict[str, Any] = {}
        if self.uses_redis:
            options = {
                # The same client library as the rest of the app (limits defaults to coredis).
                "implementation": "redispy",
                "socket_timeout": self._timeout,
                "socket_connect_timeout": self._timeout,
            }
        storage = storage_from_string("async+" + self.storage_uri, **options)
        if not isinstance(storage, Storage):  # the "async+" scheme always gives one
            raise TypeError(f"{self.storage_uri!r} did not yield an asyncio storage")
        self._storage = storage
        self._strategy = _ASYNC_STRATEGIES[settings.rate_limit_strategy](storage)

    async def hit(self, key_id: str, rate_limit: str | None, cost: int = 1) -> RateLimitStatus:
        """Count one request against the key's limit; raises ``KeyRateLimitExceeded`` when over.

        A storage failure or timeout fails closed with 503: an unlimited API is worse than a
        briefly unavailable one.
        """
        item = parse_rate_limit(rate_limit or self.default_limit)
        try:
            async with asyncio.timeout(self._timeout):
                allowed = await self._strategy.hit(item, _NAMESPACE, key_id, cost=cost)
                stats = await self._strategy.get_window_stats(item, _NAMESPACE, key_id)
        except (TimeoutError, ConnectionError, OSError) as exc:
            raise DependencyUnavailable("rate limiter unavailable") from exc
        except Exception as exc:
            # redis-py's errors do not all derive from OSError; none of them may become a 500.
            if type(exc).__module__.startswith(("redis", "limits")):
                raise DependencyUnavailable("rate limiter unavailable") from exc
            raise
        status = RateLimitStatus(
            limit=item.amount, remaining=max(0, stats.remaining), reset_at=stats.reset_time
        )
        if not allowed:
            wrapper = Limit(item, _subject_key, None, False, None, None, None, cost, False)
            raise KeyRateLimitExceeded(wrapper, status)
        return status

    async def is_healthy(self) -> bool:
        """Whether the storage answers within the timeout."""
        try:
            async with asyncio.timeout(self._timeout):
                return bool(await self._storage.check())
        except Exception:
            return False

    async def close(self) -> None:
        """Release the storage's connections."""
        reset = getattr(self._storage, "storage", None)
        close = getattr(reset, "aclose", None)
        if close is not None:
            await close()
