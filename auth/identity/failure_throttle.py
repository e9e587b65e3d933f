"""Budgets of failures: how many failed credentials (or logins) one identifier, such as a client
address, may produce in a moving window before it is refused with 429.

The failures live on the rate limiter's Redis when it has one (so every worker and every
instance shares them), in process memory otherwise: per identifier, a sorted set of its failures
(member: a random id; score: when, by the Redis server's clock), read, tested and added to by one
script, so that no two workers can both take the last failure left. A success clears nothing:
an attacker cannot reset a budget by succeeding once. Any error of the storage fails closed
(503), as the rate limiter does.

Two users: ``auth.identity.login_throttle`` (``POST /auth/token``, per address and per account:
it reads the budget before a login and counts a failure after), and ``CredentialThrottle`` below
(every failed API key or JWT, per client address), which ``KeyAuthenticator`` consults on a cache
miss, before any database lookup. The credential throttle reserves a failure before the lookup
(the atomic check-and-count) and gives it back when the credential turns out live: a concurrent
burst of guesses from one address, however it is spread over workers and instances, gets at most
the budget in lookups.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog
from limits import parse
from limits.aio.storage import Storage

from auth.errors import DependencyUnavailable, ModelgateError
from auth.redis_connection import redis_client

logger = structlog.get_logger(__name__)

# Bounds what a client's input can make a storage key (a long e-mail, an address string).
MAX_IDENTIFIER = 200
# An IPv6 client usually holds a whole /64: counting each of its addresses apart would give it
# 2^64 budgets.
IPV6_PREFIX = 64
# Identifiers a budget in process memory holds before it drops those whose failures all left
# the window.
_MEMORY_SWEEP = 10_000

# KEYS[1]: an identifier's failures. ARGV: the budget, the window (ms), and the id of a failure
# to add if one is left ('': only read). The reply: 1 if it was added (else 0), the failures now
# in the window, and the milliseconds until the oldest of them leaves it.
_COUNT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
local added = 0
if ARGV[3] ~= '' and count < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  count = count + 1
  added = 1
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local frees_in = 0
if oldest[2] then frees_in = tonumber(oldest[2]) + window - now end
return {added, count, frees_in}
"""


def address_identifier(address: str | None) -> str:
    """What a client address is counted as: the address itself (IPv4), its /64 (IPv6), or the
    text the server reported when it is no IP address (a Unix socket, a test client)."""
    if not address:
        return "unknown"
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address[:MAX_IDENTIFIER]
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, IPV6_PREFIX), strict=False))
    return str(parsed)


def _whole_seconds(seconds: float) -> int:
    return max(1, int(seconds + 0.999))


@dataclass(frozen=True)
class _Count:
    """One answer of the budget: whether the failure was added, how many are in the window,
    and the seconds until the oldest leaves it."""

    added: bool
    count: int
    frees_in: float


class FailureBudget:
    """Failures per identifier under one limit (``"20/minute"``), in one namespace, on the
    storage's Redis or in this process (a ``limits`` memory storage has no Redis)."""

    def __init__(self, storage: Storage, limit: str, namespace: str) -> None:
        item = parse(limit)
        self.amount = int(item.amount)
        self._window = float(item.get_expiry())
        self._namespace = namespace
        self._client: Any = redis_client(storage)
        self._script = self._client.register_script(_COUNT) if self._client else None
        # In process memory: storage key -> failure id -> monotonic time it was counted.
        self._memory: dict[str, dict[str, float]] = {}

    def _key(self, identifier: str) -> str:
        return f"{self._namespace}:{identifier[:MAX_IDENTIFIER]}"

    async def _count(self, identifier: str, failure: str = "") -> _Count:
        """Drop the failures that left the window, then add ``failure`` if one is left."""
        key = self._key(identifier)
        if self._script is None:
            return self._count_in_memory(key, failure)
        # Bounded by the client's socket timeouts, which are the configured Redis timeout.
        added, count, frees_in = await self._script(
            keys=[key], args=[self.amount, int(self._window * 1000), failure]
        )
        return _Count(bool(added), int(count), int(frees_in) / 1000)

    def _count_in_memory(self, key: str, failure: str) -> _Count:
        now = time.monotonic()
        if len(self._memory) > _MEMORY_SWEEP:
            horizon = now - self._window
            for stale in [k for k, v in self._memory.items() if max(v.values()) <= horizon]:
                del self._memory[stale]
        failures = self._memory.setdefault(key, {})
        for old in [f for f, at in failures.items() if at <= now - self._window]:
            del failures[old]
        added = bool(failure) and len(failures) < self.amount
        if added:
            failures[failure] = now
        frees_in = min(failures.values()) + self._window - now if failures else 0.0
        if not failures:
            del self._memory[key]
        return _Count(added, len(failures), frees_in)

    async def retry_after(self, identifier: str) -> int | None:
        """None while ``identifier`` has a failure left; else the seconds until it has one."""
        counted = await self._count(identifier)
        return None if counted.count < self.amount else _whole_seconds(counted.frees_in)

    async def spend(self, identifier: str) -> bool:
        """Count one failure; True when this very failure used the budget up (so that the
        caller can record the start of a burst once)."""
        counted = await self._count(identifier, uuid.uuid4().hex)
        return counted.added and counted.count >= self.amount

    async def reserve(self, identifier: str) -> str | int:
        """Take one failure of ``identifier``'s budget before knowing whether there is one:
        the reservation's id, to ``give_back`` if there was none; else (the budget is spent)
        the seconds until a failure frees up."""
        reservation = uuid.uuid4().hex
        counted = await self._count(identifier, reservation)
        return reservation if counted.added else _whole_seconds(counted.frees_in)

    async def give_back(self, identifier: str, reservation: str) -> None:
        """Return a reservation that turned out not to be a failure."""
        key = self._key(identifier)
        if self._client is None:
            failures = self._memory.get(key)
            if failures is not None:
                failures.pop(reservation, None)
                if not failures:
                    del self._memory[key]
            return
        await self._client.zrem(key, reservation)


class CredentialThrottled(ModelgateError):
    """Too many failed credentials from this client address."""

    status_code = 429
    type = "auth-throttled"
    title = "Too many failed credentials"

    def __init__(self, retry_after: int) -> None:
        super().__init__("too many failed credentials from this address; try again later")
        self.retry_after = retry_after


@dataclass(eq=False)
class CredentialCheck:
    """One credential being checked for one address in this worker, shared by the concurrent
    requests that present it (they share one lookup): the failure reserved for it, and whether
    it failed."""

    reservation: asyncio.Future[str | int]
    requests: int = 0
    failed: bool = field(default=False)

    def fail(self) -> None:
        """The credential failed: its reserved failure stays counted."""
        self.failed = True


class CredentialThrottle:
    """Failed API keys and JWTs per client address (``MODELGATE_AUTH_FAILURES_PER_ADDRESS``).

    ``checking`` is entered for a credential that the authenticator does not hold verified,
    before anything is looked up: it reserves one of the address's failures, atomically on
    Redis (shared by every worker and instance), and refuses with 429 when none is left; so an
    address never has more credentials being checked, anywhere, than failures left, and a
    burst of concurrent guesses costs at most the budget in lookups. Concurrent requests in
    one worker with the same credential (which share one lookup) share one reservation. When
    the check ends, a credential that failed (``CredentialCheck.fail``) keeps its reservation,
    which is its failure; any other outcome (a live credential, a database error, a request
    gone) gives it back.
    """

    _NAMESPACE = "mg:authfail:address"

    def __init__(self, storage: Storage, per_address: str) -> None:
        self._budget = FailureBudget(storage, per_address, self._NAMESPACE)
        # (identifier, credential) -> its check in this worker; entries are dropped as they
        # end, so the map holds only what is in flight.
        self._checks: dict[tuple[str, object], CredentialCheck] = {}
        self._giving_back: set[asyncio.Task[None]] = set()

    @asynccontextmanager
    async def checking(
        self, address: str | None, credential: object
    ) -> AsyncIterator[CredentialCheck]:
        """Hold ``credential`` (its cache entry, or any object unique to the request) as being
        checked for ``address`` for the duration of the block; 429 when the address has no
        failure left, 503 when the storage cannot say."""
        identifier = address_identifier(address)
        key = (identifier, credential)
        check = self._checks.get(key)
        if check is None:
            check = CredentialCheck(asyncio.ensure_future(self._reserve(identifier)))
            self._checks[key] = check
        check.requests += 1
        try:
            # shield: one request going away must not cancel the reservation the others share.
            reserved = await asyncio.shield(check.reservation)
            if isinstance(reserved, int):
                raise CredentialThrottled(reserved)
            yield check
        finally:
            check.requests -= 1
            if check.requests == 0:
                del self._checks[key]
                self._settle(identifier, check)

    async def _reserve(self, identifier: str) -> str | int:
        try:
            return await self._budget.reserve(identifier)
        except Exception as exc:
            # Fail closed, as the rate limiter does: no throttle, no lookup.
            raise DependencyUnavailable("credential throttle unavailable") from exc

    def _settle(self, identifier: str, check: CredentialCheck) -> None:
        """Give the check's reservation back unless the credential failed (then the
        reservation is its failure), once it is known."""
        if check.failed:
            return

        def settle(reservation: asyncio.Future[str | int]) -> None:
            if reservation.cancelled() or reservation.exception() is not None:
                return
            reserved = reservation.result()
            if isinstance(reserved, str):
                # In a task of its own: the request's answer does not wait for it.
                task = asyncio.ensure_future(self._give_back(identifier, reserved))
                self._giving_back.add(task)
                task.add_done_callback(self._giving_back.discard)

        if check.reservation.done():
            settle(check.reservation)
        else:
            # Every request went away before the reservation was answered.
            check.reservation.add_done_callback(settle)

    async def _give_back(self, identifier: str, reservation: str) -> None:
        try:
            await self._budget.give_back(identifier, reservation)
        except Exception as exc:
            # The reservation stays counted until it leaves the window: fail safe.
            logger.warning("could not give back a credential check", error=type(exc).__name__)

    @property
    def checks_in_flight(self) -> int:
        """Requests admitted and not yet released, over every address (for tests)."""
        return sum(check.requests for check in self._checks.values())
