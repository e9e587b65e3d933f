"""Failed-login throttling at ``POST /auth/token`` (SECURITY.md line 8).

Failed attempts are counted per client address and per account (an API key's display prefix or
an admin user's e-mail address) with a moving window of ``limits``, on the rate limiter's own
storage (Redis when configured, so every worker shares the counts; process memory otherwise).
An address or account whose budget is spent is refused with 429 before any credential is looked
up or any password verified. A success resets nothing: an attacker cannot clear a victim's
counter by logging in as himself.
"""

from __future__ import annotations

import time

from limits import RateLimitItem, parse
from limits.aio.storage import Storage
from limits.aio.strategies import MovingWindowRateLimiter

from auth.errors import DependencyUnavailable, ModelgateError

_ADDRESS_NAMESPACE = "mg:login:address"
_ACCOUNT_NAMESPACE = "mg:login:account"
# Bounds what a client's input can make a storage key (a long e-mail, an address string).
_MAX_IDENTIFIER = 200


class LoginThrottled(ModelgateError):
    """Too many failed logins from this address or for this account."""

    status_code = 429
    type = "login-throttled"
    title = "Too many failed logins"

    def __init__(self, retry_after: int) -> None:
        super().__init__("too many failed logins; try again later")
        self.retry_after = retry_after


class LoginThrottle:
    """Counts failed logins per address and per account, and refuses both once over budget."""

    def __init__(self, storage: Storage, per_address: str, per_account: str) -> None:
        self._strategy = MovingWindowRateLimiter(storage)
        self._per_address: RateLimitItem = parse(per_address)
        self._per_account: RateLimitItem = parse(per_account)

    def _budgets(self, address: str, account: str) -> list[tuple[RateLimitItem, str, str]]:
        return [
            (self._per_address, _ADDRESS_NAMESPACE, address[:_MAX_IDENTIFIER]),
            (self._per_account, _ACCOUNT_NAMESPACE, account[:_MAX_IDENTIFIER]),
        ]

    async def check(self, address: str, account: str) -> None:
        """Raise ``LoginThrottled`` (with the seconds until a slot frees) when the address or
        the account has no failure left in its budget."""
        try:
            for item, namespace, identifier in self._budgets(address, account):
                if not await self._strategy.test(item, namespace, identifier):
                    stats = await self._strategy.get_window_stats(item, namespace, identifier)
                    raise LoginThrottled(max(1, int(stats.reset_time - time.time() + 0.999)))
        except LoginThrottled:
            raise
        except Exception as exc:
            # Fail closed, as the rate limiter does: no throttle, no login.
            raise DependencyUnavailable("login throttle unavailable") from exc

    async def failed(self, address: str, account: str) -> list[str]:
        """Count one failure against both budgets; returns which budgets ("address",
        "account") this very failure used up, so that the caller records the start of a burst
        once."""
        exhausted = []
        try:
            for label, (item, namespace, identifier) in zip(
                ("address", "account"), self._budgets(address, account), strict=True
            ):
                if await self._strategy.hit(item, namespace, identifier):
                    stats = await self._strategy.get_window_stats(item, namespace, identifier)
                    if stats.remaining <= 0:
                        exhausted.append(label)
        except Exception as exc:
            raise DependencyUnavailable("login throttle unavailable") from exc
        return exhausted
