"""Per-key rate limits: one or several limits per key, checked together (with the request's
concurrency slot) in one Redis round trip, or in process memory; what a check answers, and what
happens when Redis fails.

The parts live by what they do: ``auth.limits.policy`` parses limit text,
``auth.limits.redis_checks`` is the Redis path (the script, its pipeline, the figures from its
answer), and this module holds the limiter itself, its in-process path and fail-open fallback,
and its answers.

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
from typing import Any

import structlog
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.util import WindowStats
from slowapi.errors import RateLimitExceeded
from slowapi.wrappers import Limit

from auth.errors import ConfigurationError, DependencyUnavailable, InvalidRequest
from auth.limits.concurrency import ConcurrencyLimitExceeded, Slot
from auth.limits.leases import LEASED_STRATEGY, PermitLeases, lease_terms
from auth.limits.policy import RateLimitPolicy, parse_rate_limits
from auth.limits.redis_checks import IN_FLIGHT_REFUSED, NAMESPACE, OUTAGE_ERRORS, RedisChecks
from auth.redis_connection import connect_redis
from auth.settings import Settings

logger = structlog.get_logger(__name__)


def _reset_in(reset_at: float, now: float) -> int:
    """Whole seconds from ``now`` until ``reset_at`` (rounded up, never negative)."""
    return max(0, int(reset_at - now + 0.999))


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


def _subject_key(request: Any) -> str:
    # slowapi's Limit wants a key function, and only slowapi's own Limiter calls it: modelgate
    # keys every check by the key id itself, so this is never called. (It used to read
    # request.state.subject, which no longer exists: the subject is in api's request context.)
    raise NotImplementedError("modelgate's rate limiter never asks slowapi for a key")


_Strategy = FixedWindowRateLimiter | MovingWindowRateLimiter | SlidingWindowCounterRateLimiter

_ASYNC_STRATEGIES: dict[str, type[_Strategy]] = {
    "fixed-window": FixedWindowRateLimiter,
    "moving-window": MovingWindowRateLimiter,
    "sliding-window-counter": SlidingWindowCounterRateLimiter,
}


def _parse_setting(name: str, value: str) -> RateLimitPolicy:
    try:
        return parse_rate_limits(value)
    except InvalidRequest as exc:
        raise ConfigurationError(f"MODELGATE_{name.upper()}: {exc.detail}") from None


class RateLimiter:
    """Checks per-key limits on Redis (``async+redis://``) or in process memory.

    On Redis a check is one EVALSHA of one script that tests and counts all of a key's limits
    at once (and takes the request's concurrency slot, when it has one), and the checks of
    concurrent requests of an event-loop turn share one pipeline (one round trip): see
    ``auth.limits.redis_checks``.

    When Redis fails, ``rate_limit_on_redis_failure`` decides: ``closed`` (the default) answers
    503; ``open`` applies ``fallback_rate_limit`` per key in this process's memory (and counts
    concurrency slots there) until Redis answers again, asking it again at most every
    ``rate_limit_open_retry_seconds``.
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
        # In fail-open mode, how long after a Redis failure the limiter goes straight to the
        # fallback before it asks Redis again: a slow Redis must not cost every request the
        # whole timeout.
        self.open_retry_seconds = settings.rate_limit_open_retry_seconds
        self.strategy_name = settings.rate_limit_strategy
        self.uses_redis = bool(settings.redis_url)
        self._timeout = settings.redis_timeout_seconds
        if storage is None:
            storage = connect_redis(settings).storage
        self._storage = storage
        self._strategy = _ASYNC_STRATEGIES[settings.rate_limit_strategy](storage)
        # Several limits in memory: tested then counted under one lock, as the script does.
        self._memory_lock = asyncio.Lock()
        self._redis: RedisChecks | None = None
        # redis-py's asyncio client, shared with the concurrency limit (None without Redis).
        self.client: Any = None
        # Fail-open mode: the per-process limiter used while Redis is failing.
        self._fallback = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._outage_since: float | None = None  # monotonic time of the outage's first failure
        self._skip_redis_until = 0.0
        if self.uses_redis:
            self._redis = RedisChecks(storage, self.strategy_name)
            self.client = self._redis.client
        # Leased permits (auth.limits.leases): on Redis, for the strategy a lease keeps exact.
        self._lease_max = settings.rate_limit_lease_max
        self._leasing = self._redis is not None and self.strategy_name == LEASED_STRATEGY
        # The clock looked up at each call: the tests' clock replaces this module's time.
        self._leases = PermitLeases(lambda: time.time(), self._give_back)

    @property
    def redis_failing(self) -> bool:
        """Whether the last Redis call failed (and none has succeeded since)."""
        return self._outage_since is not None

    async def hit(
        self,
        key_id: str,
        rate_limits: str | None,
        cost: int = 1,
        *,
        admin: bool = False,
        slot: Slot | None = None,
    ) -> RateLimitStatus:
        """Count one request against each of the key's limits (``rate_limits``; None: the
        default for its kind, ``admin`` or tenant); raises ``KeyRateLimitExceeded`` when one is
        over, and then counts it against none.

        With ``slot`` (``ConcurrencyLimiter.slot``: the key has a ``max_in_flight``), the slot
        is taken in the same step, first: ``ConcurrencyLimitExceeded`` when the key has no slot
        free, and then no limit counts the request; a request the rate limit refuses holds no
        slot. The caller releases the slot when the request is over (whatever happened here:
        a check cancelled while Redis had it may have taken it).

        A storage failure or timeout fails closed with 503 (an unlimited API is worse than a
        briefly unavailable one), unless the fail-open mode is configured.
        """
        policy = self._policy(rate_limits, admin)
        now = time.time()
        if self._redis is None:
            refused, stats = await self._hit_memory(self._strategy, policy, key_id, cost, slot)
        elif self.skipping_redis():
            policy = self._fallback_policy
            refused, stats = await self._hit_memory(self._fallback, policy, key_id, cost, slot)
        else:
            if slot is not None:
                # Released after the request even if this check is cancelled before its answer.
                slot.held_in = "redis"
            try:
                # Bounded by the client's socket timeouts (connect and read), which are the
                # configured Redis timeout: no asyncio timer per request is needed.
                refused, stats = await self._check_redis(
                    self._redis, policy, key_id, cost, now, slot
                )
            except Exception as exc:
                if slot is not None:
                    slot.held_in = None  # the script failed or never ran: nothing was added
                if isinstance(exc, OUTAGE_ERRORS):
                    self.redis_failed(exc)
                    if not self.fail_open:
                        raise DependencyUnavailable("rate limiter unavailable") from exc
                    policy = self._fallback_policy
                    refused, stats = await self._hit_memory(
                        self._fallback, policy, key_id, cost, slot
                    )
                elif type(exc).__module__.startswith(("redis", "limits")):
                    # Redis answered, with an error (a key of the wrong type...): this request
                    # fails closed. redis-py's errors do not all derive from OSError; none may
                    # be a 500.
                    raise DependencyUnavailable("rate limiter unavailable") from exc
                else:
                    raise
            else:
                if self._outage_since is not None:
                    self.redis_recovered()
                if slot is not None and refused:
                    slot.held_in = None  # refused: the script added no slot
        if refused == IN_FLIGHT_REFUSED and slot is not None:
            raise ConcurrencyLimitExceeded(slot.limit)
        status = _tightest(policy, stats, now)
        if refused:
            item = policy.items[refused - 1]
            wrapper = Limit(item, _subject_key, None, False, None, None, None, cost, False)
            raise KeyRateLimitExceeded(wrapper, status)
        return status

    async def _check_redis(
        self,
        redis: RedisChecks,
        policy: RateLimitPolicy,
        key_id: str,
        cost: int,
        now: float,
        slot: Slot | None,
    ) -> tuple[int, list[WindowStats]]:
        """The check on Redis: from this worker's lease of the key's permits where the key may
        be leased (``auth.limits.leases``), else one script run for the request itself."""
        terms = None
        if slot is None and self._leasing:
            terms = lease_terms(policy, self._lease_max)
        if terms is None:
            return await redis.check(policy, key_id, cost, now, slot)
        lifetime = terms.lifetime

        async def grant(size: int, at: float) -> tuple[int, list[WindowStats]]:
            return await redis.check(policy, key_id, size, at, None, lifetime)

        return await self._leases.hit(key_id, policy, cost, terms, grant)

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
        self._skip_redis_until = time.monotonic() + self.open_retry_seconds

    def redis_recovered(self) -> None:
        """Note a successful Redis call after an outage."""
        if self._outage_since is not None:
            logger.warning(
                "redis available again",
                outage_seconds=round(time.monotonic() - self._outage_since, 3),
            )
            self._outage_since = None
            self._skip_redis_until = 0.0

    async def _hit_memory(
        self,
        strategy: _Strategy,
        policy: RateLimitPolicy,
        key_id: str,
        cost: int,
        slot: Slot | None,
    ) -> tuple[int, list[WindowStats]]:
        """The check in this process's memory (without Redis, or as the fail-open fallback):
        the slot first, then the limits, as the script does."""
        if slot is not None:
            try:
                slot.take_in_memory()
            except ConcurrencyLimitExceeded:
                return IN_FLIGHT_REFUSED, []
        items = policy.items
        if len(items) == 1:
            allowed = await strategy.hit(items[0], NAMESPACE, key_id, cost=cost)
            window = await strategy.get_window_stats(items[0], NAMESPACE, key_id)
            refused, stats = (0 if allowed else 1), [window]
        else:
            async with self._memory_lock:
                refused = 0
                for index, item in enumerate(items, start=1):
                    if not await strategy.test(item, NAMESPACE, key_id, cost=cost):
                        refused = index
                        break
                if not refused:
                    for item in items:
                        await strategy.hit(item, NAMESPACE, key_id, cost=cost)
                stats = [await strategy.get_window_stats(i, NAMESPACE, key_id) for i in items]
        if refused and slot is not None:
            await slot.release()  # a request the rate limit refuses holds no slot
        return refused, stats

    async def _give_back(
        self, key_id: str, policy: RateLimitPolicy, recorded_at: float, count: int
    ) -> None:
        if self._redis is not None:
            await self._redis.give_back(policy, key_id, recorded_at, count)

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
        """Give back the permits this worker's leases hold unspent, then release the storage's
        connections."""
        await self._leases.close()
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
