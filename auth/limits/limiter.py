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
from math import floor, inf
from typing import Any

from limits import RateLimitItem, parse
from limits.aio.storage import Storage
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.storage import storage_from_string
from limits.util import WindowStats
from redis.exceptions import NoScriptError
from slowapi import Limiter
from slowapi.errors import RateLimitExceeded
from slowapi.wrappers import Limit

from auth.errors import DependencyUnavailable, InvalidRequest
from auth.settings import Settings

_NAMESPACE = "mg:key"
# Redis key names remembered per (key id, limit); cleared when this many are held.
_KEY_NAMES_CACHED = 10_000


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
        raise InvalidRequest(
            "invalid rate limit; expected e.g. '100/minute'", loc=("rate_limit",)
        ) from exc


_ASYNC_STRATEGIES: dict[
    str,
    type[FixedWindowRateLimiter | MovingWindowRateLimiter | SlidingWindowCounterRateLimiter],
] = {
    "fixed-window": FixedWindowRateLimiter,
    "moving-window": MovingWindowRateLimiter,
    "sliding-window-counter": SlidingWindowCounterRateLimiter,
}


def _sliding_window_stats(item: RateLimitItem, window: Any, now: float) -> WindowStats:
    """The remaining count and reset time of a sliding window counter, from the reply of
    limits' ``sliding_window`` script, as ``SlidingWindowCounterRateLimiter`` computes them."""
    previous_count, previous_ttl, current_count, current_ttl = 0, 0.0, 0, 0.0
    if window:
        previous_count, current_count = int(window[0] or 0), int(window[2] or 0)
        previous_ttl = max(0.0, float(window[1] or 0)) / 1000
        current_ttl = max(0.0, float(window[3] or 0)) / 1000
    expiry = item.get_expiry()
    weighted = previous_count * previous_ttl / expiry + current_count
    remaining = max(0, item.amount - floor(weighted))
    if not (previous_count or current_count):
        return WindowStats(now, remaining)
    previous_reset, current_reset = inf, inf
    if previous_count:
        previous_reset = previous_ttl % (expiry / previous_count)
    if current_count:
        # A window's counter lives for two windows, so its TTL is twice the expiry when the
        # window opens. Read in the very call that opened it (Redis stops the clock during a
        # script), limits' modulo would give 0, "resets now", for a window that has all of its
        # length left; limits itself reads the window in a later call and never sees that.
        current_reset = current_ttl % expiry if current_ttl < 2 * expiry else expiry
    return WindowStats(now + min(previous_reset, current_reset), remaining)


def _subject_key(request: Any) -> str:
    # slowapi requires a key function; the limiter is only ever checked per API key id.
    return str(request.state.subject.limit_id)


# One check waiting for its pipeline: the script's keys and arguments, and where the reply goes.
_Check = tuple[list[str], list[Any], "asyncio.Future[Any]"]


class _PipelinedRedis:
    """Runs one Lua script per limit check, sending the checks of concurrent requests to Redis in
    one pipeline per event-loop turn: the per-call overhead of the client, not Redis itself, is
    what a request would otherwise pay, so it is paid once for everything that arrived
    together."""

    def __init__(self, client: Any, script: Any) -> None:
        self._client = client
        self._script = script
        self._pending: list[_Check] = []
        self._flush_scheduled = False
        self._in_flight: set[asyncio.Task[None]] = set()

    async def run(self, keys: list[str], args: list[Any]) -> Any:
        """Queue one run of the script and await its reply."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((keys, args, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # call_soon runs after every callback already ready in this turn, so the checks of
            # all requests that reached this point together go out together.
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._send(batch))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _send(self, batch: list[_Check]) -> None:
        try:
            try:
                replies = await self._execute(batch)
            except NoScriptError:
                # Redis restarted (or was flushed) and forgot the script: load it, once.
                await self._client.script_load(self._script.script)
                replies = await self._execute(batch)
        except Exception as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue  # the request went away
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _execute(self, batch: list[_Check]) -> list[Any]:
        # No MULTI: each check is atomic by itself (a Lua script), and a transaction would add
        # work on the server without making the limit any more exact. EVALSHA rather than the
        # Script object: a pipeline holding Script objects first asks Redis whether they exist,
        # a second round trip every time.
        pipeline = self._client.pipeline(transaction=False)
        for keys, args, _ in batch:
            pipeline.evalsha(self._script.sha, len(keys), *keys, *args)
        replies: list[Any] = await pipeline.execute(raise_on_error=False)
        if any(isinstance(reply, NoScriptError) for reply in replies):
            raise NoScriptError("script not loaded")
        return replies


def _as_function(name: str, script: str | bytes) -> str:
    # A limits script, unchanged, as a local Lua function of its own KEYS and ARGV.
    text = script.decode() if isinstance(script, bytes) else script
    return f"local function {name}(KEYS, ARGV)\n{text}\nend\n"


def _hit_and_window_scripts(bridge: Any) -> dict[str, str]:
    """Per strategy, one Lua script that runs limits' own "hit" script and then the script that
    reads the window it leaves: one EVALSHA per check, whose answer carries the headers."""
    return {
        "sliding-window-counter": _as_function("hit", bridge.SCRIPT_ACQUIRE_SLIDING_WINDOW)
        + _as_function("window", bridge.SCRIPT_SLIDING_WINDOW)
        # ARGV: limit, expiry, cost
        + "local allowed = hit(KEYS, {ARGV[1], ARGV[2], ARGV[3]})\n"
        + "return {allowed and 1 or 0, window(KEYS, {ARGV[2]})}\n",
        "moving-window": _as_function("hit", bridge.SCRIPT_ACQUIRE_MOVING_WINDOW)
        + _as_function("window", bridge.SCRIPT_MOVING_WINDOW)
        # ARGV: now, limit, expiry, cost, now - expiry
        + "local allowed = hit(KEYS, {ARGV[1], ARGV[2], ARGV[3], ARGV[4]})\n"
        + "return {allowed and 1 or 0, window(KEYS, {ARGV[5], ARGV[2]})}\n",
        "fixed-window": _as_function("hit", bridge.SCRIPT_INCR_EXPIRE)
        # ARGV: expiry, cost
        + "return {hit(KEYS, ARGV), redis.call('ttl', KEYS[1])}\n",
    }


class RateLimiter:
    """Checks per-key limits on Redis (``async+redis://``) or in process memory.

    On Redis a check is one EVALSHA, and the checks of concurrent requests of an event-loop turn
    share one pipeline (one round trip). The script is the strategy's own Lua from ``limits``
    (the hit, then the read of the window it leaves) wrapped in one call, and the
    ``X-RateLimit-*`` figures are computed from its answer as ``limits`` computes its window
    statistics.
    """

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
        self.strategy_name = settings.rate_limit_strategy
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
        self._redis: _PipelinedRedis | None = None
        self._key_names: dict[tuple[str, int, int], list[str]] = {}
        if self.uses_redis:
            bridge = storage.bridge  # type: ignore[attr-defined]
            self._bridge = bridge
            client = bridge.get_connection()
            script = _hit_and_window_scripts(bridge)[self.strategy_name]
            self._redis = _PipelinedRedis(client, client.register_script(script))

    async def hit(self, key_id: str, rate_limit: str | None, cost: int = 1) -> RateLimitStatus:
        """Count one request against the key's limit; raises ``KeyRateLimitExceeded`` when over.

        A storage failure or timeout fails closed with 503: an unlimited API is worse than a
        briefly unavailable one.
        """
        item = parse_rate_limit(rate_limit or self.default_limit)
        try:
            if self._redis is not None:
                # Bounded by the client's socket timeouts (connect and read), which are the
                # configured Redis timeout: no asyncio timer per request is needed.
                allowed, stats = await self._hit_redis(self._redis, item, key_id, cost)
            else:
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

    async def _hit_redis(
        self, redis: _PipelinedRedis, item: RateLimitItem, key_id: str, cost: int
    ) -> tuple[bool, WindowStats]:
        expiry = item.get_expiry()
        now = time.time()
        keys = self._redis_keys(item, key_id)
        if self.strategy_name == "sliding-window-counter":
            acquired, window = await redis.run(keys, [item.amount, expiry, cost])
            return bool(acquired), _sliding_window_stats(item, window, now)
        if self.strategy_name == "moving-window":
            acquired, window = await redis.run(keys, [now, item.amount, expiry, cost, now - expiry])
            start, count = (float(window[0]), int(window[1])) if window else (now, 0)
            return bool(acquired), WindowStats(start + expiry, item.amount - count)
        count, ttl = await redis.run(keys, [expiry, cost])
        return int(count) <= item.amount, WindowStats(
            now + max(int(ttl), 0), max(0, item.amount - int(count))
        )

    def _redis_keys(self, item: RateLimitItem, key_id: str) -> list[str]:
        """The Redis keys limits uses for this key id and limit (remembered: they are the same
        on every request of a key)."""
        cache_key = (key_id, item.amount, item.get_expiry())
        keys = self._key_names.get(cache_key)
        if keys is None:
            bridge, key = self._bridge, item.key_for(_NAMESPACE, key_id)
            if self.strategy_name == "sliding-window-counter":
                storage: Any = self._storage
                keys = [
                    bridge.prefixed_key(storage._previous_window_key(key)),
                    bridge.prefixed_key(storage._current_window_key(key)),
                ]
            else:
                keys = [bridge.prefixed_key(key)]
            if len(self._key_names) >= _KEY_NAMES_CACHED:
                self._key_names.clear()
            self._key_names[cache_key] = keys
        return keys

    @property
    def storage(self) -> Storage:
        """The limiter's asyncio storage (Redis or memory), shared by the login throttle."""
        return self._storage

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
