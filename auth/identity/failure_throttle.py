"""Budgets of failures: how many failed credentials (or logins) one identifier, such as a client
address, may produce in a moving window of ``limits`` before it is refused with 429.

The counts live on the rate limiter's own storage (Redis when configured, so every worker shares
them; process memory otherwise). A failure is counted when it happens; a success clears nothing,
so an attacker cannot reset a budget by succeeding once. Any error of the storage fails closed
(503), as the rate limiter does.

Two users: ``auth.identity.login_throttle`` (``POST /auth/token``, per address and per account)
and ``CredentialThrottle`` below (every failed API key or JWT, per client address), which
``KeyAuthenticator`` consults on a cache miss, before any database lookup.
"""

from __future__ import annotations

import ipaddress
import time

from limits import RateLimitItem, parse
from limits.aio.storage import Storage
from limits.aio.strategies import MovingWindowRateLimiter

from auth.errors import DependencyUnavailable, ModelgateError

# Bounds what a client's input can make a storage key (a long e-mail, an address string).
MAX_IDENTIFIER = 200
# An IPv6 client usually holds a whole /64: counting each of its addresses apart would give it
# 2^64 budgets.
IPV6_PREFIX = 64


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


def _seconds_until(reset_time: float) -> int:
    return max(1, int(reset_time - time.time() + 0.999))


class FailureBudget:
    """Failures per identifier under one limit (``"20/minute"``), in one storage namespace."""

    def __init__(self, strategy: MovingWindowRateLimiter, limit: str, namespace: str) -> None:
        self._strategy = strategy
        self._item: RateLimitItem = parse(limit)
        self._namespace = namespace

    @property
    def amount(self) -> int:
        """Failures allowed per window."""
        return int(self._item.amount)

    async def window(self, identifier: str) -> tuple[int, int]:
        """Failures left to ``identifier`` now, and the seconds until one more frees up."""
        stats = await self._strategy.get_window_stats(
            self._item, self._namespace, identifier[:MAX_IDENTIFIER]
        )
        return int(stats.remaining), _seconds_until(stats.reset_time)

    async def retry_after(self, identifier: str) -> int | None:
        """None while ``identifier`` has a failure left; else the seconds until it has one."""
        key = identifier[:MAX_IDENTIFIER]
        if await self._strategy.test(self._item, self._namespace, key):
            return None
        stats = await self._strategy.get_window_stats(self._item, self._namespace, key)
        return _seconds_until(stats.reset_time)

    async def spend(self, identifier: str) -> bool:
        """Count one failure; True when this very failure used the budget up (so that the
        caller can record the start of a burst once)."""
        key = identifier[:MAX_IDENTIFIER]
        if await self._strategy.hit(self._item, self._namespace, key):
            stats = await self._strategy.get_window_stats(self._item, self._namespace, key)
            return stats.remaining <= 0
        return False


class CredentialThrottled(ModelgateError):
    """Too many failed credentials from this client address."""

    status_code = 429
    type = "auth-throttled"
    title = "Too many failed credentials"

    def __init__(self, retry_after: int) -> None:
        super().__init__("too many failed credentials from this address; try again later")
        self.retry_after = retry_after


class CredentialThrottle:
    """Failed API keys and JWTs per client address (``MODELGATE_AUTH_FAILURES_PER_ADDRESS``).

    ``admit`` is called for a credential that the authenticator does not hold verified, before
    anything is looked up: it refuses with 429 once the address has no failure left, and
    otherwise holds the credential as being checked until ``release``, so that a burst of
    concurrent guesses from one address cannot all pass before the first of them is counted:
    in one worker, an address never has more distinct credentials being checked at once than
    failures left (concurrent requests with the same credential, which share one lookup, hold
    one). ``failed`` counts a failed request (shared by every worker).
    """

    _NAMESPACE = "mg:authfail:address"

    def __init__(self, storage: Storage, per_address: str) -> None:
        self._budget = FailureBudget(MovingWindowRateLimiter(storage), per_address, self._NAMESPACE)
        # identifier -> credential being checked -> requests checking it, in this worker;
        # entries are dropped as they end, so the map holds only what is in flight.
        self._in_flight: dict[str, dict[object, int]] = {}

    async def admit(self, address: str | None, credential: object) -> str:
        """Hold ``credential`` (its cache entry, or any object unique to the request) as being
        checked for ``address``; 429 when the address has no failure left, 503 when the
        storage cannot say. Returns the identifier for ``failed`` and ``release``."""
        identifier = address_identifier(address)
        try:
            remaining, retry_after = await self._budget.window(identifier)
        except Exception as exc:
            # Fail closed, as the rate limiter does: no throttle, no lookup.
            raise DependencyUnavailable("credential throttle unavailable") from exc
        if remaining <= 0:
            raise CredentialThrottled(retry_after)
        checking = self._in_flight.setdefault(identifier, {})
        if credential not in checking and len(checking) >= remaining:
            # Every failure left is held by a credential being checked (whose outcome frees it
            # within a lookup's time).
            if not checking:
                del self._in_flight[identifier]
            raise CredentialThrottled(1)
        checking[credential] = checking.get(credential, 0) + 1
        return identifier

    def release(self, identifier: str, credential: object) -> None:
        """End the check that ``admit`` began."""
        checking = self._in_flight.get(identifier)
        if checking is None:
            return
        left = checking.get(credential, 0) - 1
        if left > 0:
            checking[credential] = left
        else:
            checking.pop(credential, None)
            if not checking:
                del self._in_flight[identifier]

    async def failed(self, identifier: str) -> None:
        """Count one failed credential against the address."""
        try:
            await self._budget.spend(identifier)
        except Exception as exc:
            raise DependencyUnavailable("credential throttle unavailable") from exc

    @property
    def checks_in_flight(self) -> int:
        """Requests admitted and not yet released, over every address (for tests)."""
        return sum(sum(checking.values()) for checking in self._in_flight.values())
