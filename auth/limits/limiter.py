"""Per-key rate limits: one or several limits per key, checked together in one Redis round trip.

What each library does here: ``limits`` (the library slowapi is built on) supplies the
algorithms, the limit notation (``"10/second;1000/hour"``, parsed by ``parse_many``), its own Lua
scripts and the in-process storage; the per-request check goes through its asyncio storage and
scripts, because slowapi's own checks are synchronous and would block the event loop on every
Redis round trip. slowapi supplies the error surface: ``RateLimitExceeded`` (and its ``Limit``
wrapper, whose text is the 429's detail). No slowapi ``Limiter`` is built: it would open a second,
synchronous Redis storage that nothing calls.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from functools import lru_cache
from math import floor, inf
from typing import Any

import structlog
from limits import RateLimitItem, parse, parse_many
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.util import WindowStats
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError
from slowapi.errors import RateLimitExceeded
from slowapi.wrappers import Limit

from auth.errors import ConfigurationError, DependencyUnavailable, InvalidRequest
from auth.redis_connection import connect_redis
from auth.settings import Settings

logger = structlog.get_logger(__name__)

_NAMESPACE = "mg:key"
# Redis key names remembered per (key id, limit); cleared when this many are held.
_KEY_NAMES_CACHED = 10_000
# Bounds on a limit string, wherever it comes from (a plan or tenant row is trusted, not blindly).
MAX_LIMITS = 5
MAX_AMOUNT = 10**9
# In fail-open mode, how long after a Redis failure the limiter goes straight to the fallback
# before it asks Redis again: a slow Redis must not cost every request the whole timeout.
_OPEN_RETRY_SECONDS = 1.0


# What says Redis itself is unreachable or too slow (as opposed to an error it answered with).
OUTAGE_ERRORS = (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError)


def _reset_in(reset_at: float, now: float) -> int:
    """Whole seconds from ``now`` until ``reset_at`` (rounded up, never negative)."""
    return max(0, int(reset_at - now + 0.999))


def _window_name(seconds: int) -> str:
    """A policy's name in the RateLimit headers, from its window: "1s", "2s", "1m", "1h", "1d"
    (unique per key: of two limits with the same window only the tighter is kept)."""
    for unit, length in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds % length == 0:
            return f"{seconds // length}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True)
class RateLimitPolicy:
    """A key's parsed limits, and the ``RateLimit-Policy`` header value that lists them."""

    items: tuple[RateLimitItem, ...]
    names: tuple[str, ...]
    header: str  # RateLimit-Policy: "1s";q=10;w=1, "1m";q=25;w=60


@dataclass(frozen=True)
class RateLimitStatus:
    """What the rate-limit headers report after a check: the tightest of the key's limits (the
    fewest remaining; of equals, the one that resets latest, before which no request that
    needs all of them can pass)."""

    limit: int
    remaining: int
    reset_at: float  # epoch seconds
    # Whole seconds from the check to reset_at: RateLimit's t and Retry-After say the same.
    reset_in: int
    policy: RateLimitPolicy | None = None
    name: str = "default"

    @property
    def retry_after(self) -> int:
        """Whole seconds until the window resets (at least 1)."""
        return max(1, self.reset_in)

    def headers(self) -> list[tuple[bytes, bytes]]:
        """``X-RateLimit-*``, and the IETF draft's ``RateLimit-Policy`` and ``RateLimit``
        (draft-ietf-httpapi-ratelimit-headers, structured-field syntax)."""
        reset_in = self.reset_in
        policy = (
            self.policy.header
            if self.policy is not None
            else f'"{self.name}";q={self.limit};w={max(1, reset_in)}'
        )
        return [
            (b"x-ratelimit-limit", str(self.limit).encode()),
            (b"x-ratelimit-remaining", str(self.remaining).encode()),
            (b"x-ratelimit-reset", str(int(self.reset_at)).encode()),
            (b"ratelimit-policy", policy.encode()),
            (b"ratelimit", f'"{self.name}";r={self.remaining};t={reset_in}'.encode()),
        ]


class KeyRateLimitExceeded(RateLimitExceeded):
    """slowapi's error, with the status for the ``Retry-After`` and rate-limit headers."""

    def __init__(self, limit: Limit, status: RateLimitStatus) -> None:
        super().__init__(limit)
        self.status = status


def _invalid(detail: str) -> InvalidRequest:
    return InvalidRequest(detail, loc=("rate_limit",))


@lru_cache(maxsize=256)
def parse_rate_limits(value: str) -> RateLimitPolicy:
    """Parse ``"10/second;1000/hour"``-style limits (``limits``' ``parse_many``; at most
    ``MAX_LIMITS``, amounts 1 to ``MAX_AMOUNT``). Of limits with the same window only the
    smallest amount is kept: the others can never refuse a request it lets through. Cached:
    keys share a handful of values."""
    if len(value) > 200:
        raise _invalid("rate limit too long")
    try:
        parsed = parse_many(value)
    except ValueError as exc:
        raise _invalid(
            "invalid rate limit; expected e.g. '100/minute' or '10/second;1000/hour'"
        ) from exc
    if not parsed or len(parsed) > MAX_LIMITS:
        raise _invalid(f"a rate limit holds 1 to {MAX_LIMITS} limits")
    tightest: dict[int, RateLimitItem] = {}
    for item in parsed:
        if not 1 <= item.amount <= MAX_AMOUNT:
            raise _invalid(f"a limit's amount must be 1 to {MAX_AMOUNT}")
        expiry = item.get_expiry()
        if expiry not in tightest or item.amount < tightest[expiry].amount:
            tightest[expiry] = item
    items = tuple(tightest[expiry] for expiry in sorted(tightest))
    names = tuple(_window_name(item.get_expiry()) for item in items)
    header = ", ".join(
        f'"{name}";q={item.amount};w={item.get_expiry()}'
        for name, item in zip(names, items, strict=True)
    )
    return RateLimitPolicy(items=items, names=names, header=header)


@lru_cache(maxsize=256)
def parse_rate_limit(value: str) -> RateLimitItem:
    """Parse one ``"100/minute"``-style limit (a tenant's ``rate_limit`` field)."""
    try:
        item = parse(value)
    except ValueError as exc:
        raise _invalid("invalid rate limit; expected e.g. '100/minute'") from exc
    if not 1 <= item.amount <= MAX_AMOUNT:
        raise _invalid(f"a limit's amount must be 1 to {MAX_AMOUNT}")
    return item


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
    # slowapi's Limit wants a key function; the limiter is only ever checked per API key id.
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


# Every strategy's script has the same frame. ARGV: the number of limits n, the cost, the time
# (moving window), then each limit's amount and expiry (seconds); KEYS: each limit's keys. The
# strategy defines, per limit, ``fits`` (limits' own test of its acquire script, without
# counting), ``acquire`` (limits' acquire: test and count in one step) and ``read`` (the window
# the headers are computed from). With several limits every one is tested before any is
# counted, so that a request one limit refuses costs the others nothing; one limit alone goes
# straight to its acquire. The reply: 0 when counted, else the (1-based) index of a limit that
# refused, then each limit's window.
_HEAD = """
local n, cost, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
"""
_BODY = """
local function keys_of(i) return {{{keys}}} end
local function amount_of(i) return tonumber(ARGV[2 + 2 * i]) end
local function expiry_of(i) return tonumber(ARGV[3 + 2 * i]) end
local refused = 0
if n > 1 then
  for i = 1, n do
    if not fits(keys_of(i), amount_of(i), expiry_of(i)) then refused = i break end
  end
end
local reply, counting = {{0}}, refused == 0
for i = 1, n do
  local window
  if counting then
    local counted
    counted, window = acquire(keys_of(i), amount_of(i), expiry_of(i))
    if not counted and refused == 0 then refused = i end
  else
    window = read(keys_of(i), amount_of(i), expiry_of(i))
  end
  -- a nil would end the reply's array early
  reply[i + 1] = window or {{}}
end
reply[1] = refused
return reply
"""


def _sliding_window_script(bridge: Any) -> str:
    return (
        _as_function("hit", bridge.SCRIPT_ACQUIRE_SLIDING_WINDOW)
        + _as_function("window", bridge.SCRIPT_SLIDING_WINDOW)
        + _HEAD
        + """
local function read(k, amount, expiry) return window(k, {expiry}) end
local function fits(k, amount, expiry)
  -- limits' acquire script's own test, on the window its read script leaves
  if cost > amount then return false end
  local w = window(k, {expiry})
  local previous_ttl = tonumber(w[2]) or 0
  if previous_ttl <= 0 then previous_ttl = 0 end
  local weighted = math.floor((tonumber(w[1]) or 0) * previous_ttl / (expiry * 1000))
    + (tonumber(w[3]) or 0)
  return weighted + cost <= amount
end
local function acquire(k, amount, expiry)
  local counted = hit(k, {amount, expiry, cost})
  return counted, read(k, amount, expiry)
end
"""
        + _BODY.format(keys="KEYS[2 * i - 1], KEYS[2 * i]")
    )


def _moving_window_script(bridge: Any) -> str:
    return (
        _as_function("hit", bridge.SCRIPT_ACQUIRE_MOVING_WINDOW)
        + _as_function("window", bridge.SCRIPT_MOVING_WINDOW)
        + _HEAD
        + """
local function read(k, amount, expiry) return window(k, {now - expiry, amount}) end
local function fits(k, amount, expiry)
  -- limits' acquire script's own test
  if cost > amount then return false end
  local entry = redis.call('lindex', k[1], amount - cost)
  return not (entry and tonumber(entry) >= now - expiry)
end
local function acquire(k, amount, expiry)
  local counted = hit(k, {now, amount, expiry, cost})
  return counted, read(k, amount, expiry)
end
"""
        + _BODY.format(keys="KEYS[i]")
    )


def _fixed_window_script(bridge: Any) -> str:
    return (
        _as_function("hit", bridge.SCRIPT_INCR_EXPIRE)
        + _HEAD
        + """
local function read(k, amount, expiry)
  return {tonumber(redis.call('get', k[1])) or 0, redis.call('ttl', k[1])}
end
local function fits(k, amount, expiry) return read(k)[1] + cost <= amount end
local function acquire(k, amount, expiry)
  local count = hit(k, {expiry, cost})
  return count <= amount, {count, redis.call('ttl', k[1])}
end
"""
        + _BODY.format(keys="KEYS[i]")
    )


_SCRIPTS = {
    "sliding-window-counter": _sliding_window_script,
    "moving-window": _moving_window_script,
    "fixed-window": _fixed_window_script,
}


def _parse_setting(name: str, value: str) -> RateLimitPolicy:
    try:
        return parse_rate_limits(value)
    except InvalidRequest as exc:
        raise ConfigurationError(f"MODELGATE_{name.upper()}: {exc.detail}") from None


class RateLimiter:
    """Checks per-key limits on Redis (``async+redis://``) or in process memory.

    On Redis a check is one EVALSHA of one script that tests and counts all of a key's limits
    at once, and the checks of concurrent requests of an event-loop turn share one pipeline (one
    round trip). The script is built from the strategy's own Lua from ``limits`` (its acquire,
    then the read of the window it leaves), and the rate-limit figures are computed from its
    answer as ``limits`` computes its window statistics.

    When Redis fails, ``rate_limit_on_redis_failure`` decides: ``closed`` (the default) answers
    503; ``open`` applies ``fallback_rate_limit`` per key in this process's memory until Redis
    answers again.
    """

    def __init__(self, settings: Settings, storage: Storage | None = None) -> None:
        """``storage``: the process's shared one (``auth.redis_connection``); a limiter built
        without it (tests, the bench) connects on its own."""
        self.default_limit: str = settings.default_rate_limit
        self.admin_limit: str = settings.admin_rate_limit
        self.fallback_limit: str = settings.fallback_rate_limit
        # Parsed at start: a bad setting must stop the process, not every request.
        self._default_policy = _parse_setting("default_rate_limit", self.default_limit)
        self._admin_policy = _parse_setting("admin_rate_limit", self.admin_limit)
        self._fallback_policy = _parse_setting("fallback_rate_limit", self.fallback_limit)
        # Stored limit strings found invalid (each logged once).
        self._invalid_seen: set[str] = set()
        self.fail_open = settings.rate_limit_on_redis_failure == "open"
        self.strategy_name = settings.rate_limit_strategy
        self.uses_redis = bool(settings.redis_url)
        self._timeout = settings.redis_timeout_seconds
        if storage is None:
            storage = connect_redis(settings).storage
        self._storage = storage
        strategy = _ASYNC_STRATEGIES[settings.rate_limit_strategy]
        self._strategy = strategy(storage)
        # Several limits in memory: tested then counted under one lock, as the script does.
        self._memory_lock = asyncio.Lock()
        self._redis: _PipelinedRedis | None = None
        # redis-py's asyncio client, shared with the concurrency limit (None without Redis).
        self.client: Any = None
        self._key_names: dict[tuple[str, int, int], list[str]] = {}
        # Fail-open mode: the per-process limiter used while Redis is failing.
        self._fallback = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._outage_since: float | None = None  # monotonic time of the outage's first failure
        self._skip_redis_until = 0.0
        if self.uses_redis:
            bridge = storage.bridge  # type: ignore[attr-defined]
            self._bridge = bridge
            self.client = bridge.get_connection()
            script = _SCRIPTS[self.strategy_name](bridge)
            self._redis = _PipelinedRedis(self.client, self.client.register_script(script))

    @property
    def redis_failing(self) -> bool:
        """Whether the last Redis call failed (and none has succeeded since)."""
        return self._outage_since is not None

    async def hit(
        self, key_id: str, rate_limits: str | None, cost: int = 1, *, admin: bool = False
    ) -> RateLimitStatus:
        """Count one request against each of the key's limits (``rate_limits``; None: the
        default for its kind, ``admin`` or tenant); raises ``KeyRateLimitExceeded`` when one is
        over, and then counts it against none.

        A storage failure or timeout fails closed with 503 (an unlimited API is worse than a
        briefly unavailable one), unless the fail-open mode is configured.
        """
        policy = self._policy(rate_limits, admin)
        now = time.time()
        if self._redis is None:
            refused, stats = await self._hit_memory(self._strategy, policy, key_id, cost)
        elif self.skipping_redis():
            refused, stats = await self._hit_fallback(key_id, cost)
            policy = self._fallback_policy
        else:
            try:
                # Bounded by the client's socket timeouts (connect and read), which are the
                # configured Redis timeout: no asyncio timer per request is needed.
                refused, stats = await self._hit_redis(self._redis, policy, key_id, cost, now)
            except OUTAGE_ERRORS as exc:
                self.redis_failed(exc)
                if not self.fail_open:
                    raise DependencyUnavailable("rate limiter unavailable") from exc
                refused, stats = await self._hit_fallback(key_id, cost)
                policy = self._fallback_policy
            except Exception as exc:
                # Redis answered, with an error (a key of the wrong type...): this request fails
                # closed. redis-py's errors do not all derive from OSError; none may be a 500.
                if type(exc).__module__.startswith(("redis", "limits")):
                    raise DependencyUnavailable("rate limiter unavailable") from exc
                raise
            else:
                if self._outage_since is not None:
                    self.redis_recovered()
        status = _tightest(policy, stats, now)
        if refused:
            item = policy.items[refused - 1]
            wrapper = Limit(item, _subject_key, None, False, None, None, None, cost, False)
            raise KeyRateLimitExceeded(wrapper, status)
        return status

    def _policy(self, rate_limits: str | None, admin: bool) -> RateLimitPolicy:
        default = self._admin_policy if admin else self._default_policy
        if rate_limits is None:
            return default
        try:
            return parse_rate_limits(rate_limits)
        except InvalidRequest:
            # A stored string that does not parse (written behind the API's back) is the
            # operator's to fix, not the client's: the default for the credential's kind
            # applies, and the string is logged once, not on every request.
            if rate_limits not in self._invalid_seen and len(self._invalid_seen) < 1000:
                self._invalid_seen.add(rate_limits)
                logger.error("invalid stored rate limit; the default applies", value=rate_limits)
            return default

    def skipping_redis(self) -> bool:
        """Whether, in fail-open mode, a recent failure says not to ask Redis yet."""
        return self.fail_open and time.monotonic() < self._skip_redis_until

    def redis_failed(self, exc: BaseException) -> None:
        """Note a failed Redis call: a warning once per outage, not once per request."""
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            logger.warning(
                "redis unavailable: rate limits fail "
                + ("open (fallback limit in this process)" if self.fail_open else "closed (503)"),
                error=type(exc).__name__,
            )
        self._skip_redis_until = time.monotonic() + _OPEN_RETRY_SECONDS

    def redis_recovered(self) -> None:
        """Note a successful Redis call after an outage."""
        if self._outage_since is not None:
            logger.warning(
                "redis available again",
                outage_seconds=round(time.monotonic() - self._outage_since, 3),
            )
            self._outage_since = None
            self._skip_redis_until = 0.0

    async def _hit_fallback(self, key_id: str, cost: int) -> tuple[int, list[WindowStats]]:
        return await self._hit_memory(self._fallback, self._fallback_policy, key_id, cost)

    async def _hit_memory(
        self,
        strategy: FixedWindowRateLimiter
        | MovingWindowRateLimiter
        | SlidingWindowCounterRateLimiter,
        policy: RateLimitPolicy,
        key_id: str,
        cost: int,
    ) -> tuple[int, list[WindowStats]]:
        items = policy.items
        if len(items) == 1:
            allowed = await strategy.hit(items[0], _NAMESPACE, key_id, cost=cost)
            window = await strategy.get_window_stats(items[0], _NAMESPACE, key_id)
            return (0 if allowed else 1), [window]
        async with self._memory_lock:
            refused = 0
            for index, item in enumerate(items, start=1):
                if not await strategy.test(item, _NAMESPACE, key_id, cost=cost):
                    refused = index
                    break
            if not refused:
                for item in items:
                    await strategy.hit(item, _NAMESPACE, key_id, cost=cost)
            stats = [await strategy.get_window_stats(i, _NAMESPACE, key_id) for i in items]
        return refused, stats

    async def _hit_redis(
        self,
        redis: _PipelinedRedis,
        policy: RateLimitPolicy,
        key_id: str,
        cost: int,
        now: float,
    ) -> tuple[int, list[WindowStats]]:
        keys: list[str] = []
        args: list[Any] = [len(policy.items), cost, now]
        for item in policy.items:
            keys.extend(self._redis_keys(item, key_id))
            args.extend((item.amount, item.get_expiry()))
        reply = await redis.run(keys, args)
        refused, windows = int(reply[0]), reply[1:]
        stats = [
            self._window_stats(item, window, now)
            for item, window in zip(policy.items, windows, strict=True)
        ]
        return refused, stats

    def _window_stats(self, item: RateLimitItem, window: Any, now: float) -> WindowStats:
        expiry = item.get_expiry()
        if self.strategy_name == "sliding-window-counter":
            return _sliding_window_stats(item, window, now)
        if self.strategy_name == "moving-window":
            start, count = (float(window[0]), int(window[1])) if window else (now, 0)
            return WindowStats(start + expiry, item.amount - count)
        count, ttl = int(window[0]), int(window[1])
        return WindowStats(now + max(ttl, 0), max(0, item.amount - count))

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
        """The limiter's asyncio storage (Redis or memory)."""
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


def _tightest(policy: RateLimitPolicy, stats: list[WindowStats], now: float) -> RateLimitStatus:
    """The status of the limit with the fewest requests remaining; of equals, the one that
    resets latest."""
    best = 0
    if len(stats) > 1:
        for index in range(1, len(stats)):
            this, chosen = stats[index], stats[best]
            if this.remaining < chosen.remaining or (
                this.remaining == chosen.remaining and this.reset_time > chosen.reset_time
            ):
                best = index
    window = stats[best]
    return RateLimitStatus(
        limit=policy.items[best].amount,
        remaining=max(0, window.remaining),
        reset_at=window.reset_time,
        reset_in=_reset_in(window.reset_time, now),
        policy=policy,
        name=policy.names[best],
    )
