"""Failed-login throttling at ``POST /auth/token`` (SECURITY.md line 8).

Failed attempts are counted per client address and per account (an API key's display prefix or
an admin user's e-mail address) in a moving window, on the rate limiter's Redis when configured
(so every worker shares the counts; process memory otherwise).
An address or account whose budget is spent is refused with 429 before any credential is looked
up or any password verified. A success resets nothing: an attacker cannot clear a victim's
counter by logging in as himself.
"""

from __future__ import annotations

from limits.aio.storage import Storage

from auth.errors import DependencyUnavailable, ModelgateError
from auth.identity.failure_throttle import FailureBudget, address_identifier


class LoginThrottled(ModelgateError):
    """Too many failed logins from this address or for this account."""

    status_code = 429
    type = "login-throttled"
    title = "Too many failed logins"

    def __init__(self, retry_after: int) -> None:
        super().__init__("too many failed logins; try again later")
        self.retry_after = retry_after


class LoginThrottle:
    """Counts failed logins per address and per account, and refuses both once over budget
    (two ``FailureBudget``s of ``auth.identity.failure_throttle``)."""

    def __init__(self, storage: Storage, per_address: str, per_account: str) -> None:
        self._per_address = FailureBudget(storage, per_address, "mg:login:address")
        self._per_account = FailureBudget(storage, per_account, "mg:login:account")

    def _budgets(self, address: str, account: str) -> list[tuple[str, FailureBudget, str]]:
        return [
            # An IPv6 client is counted by its /64, as for failed credentials.
            ("address", self._per_address, address_identifier(address)),
            ("account", self._per_account, account),
        ]

    async def check(self, address: str, account: str) -> None:
        """Raise ``LoginThrottled`` (with the seconds until a slot frees) when the address or
        the account has no failure left in its budget."""
        try:
            for _, budget, identifier in self._budgets(address, account):
                retry_after = await budget.retry_after(identifier)
                if retry_after is not None:
                    raise LoginThrottled(retry_after)
        except LoginThrottled:
            raise
        except Exception as exc:
            # Fail closed, as the rate limiter does: no throttle, no login.
            raise DependencyUnavailable("login throttle unavailable") from exc

    async def failed(self, address: str, account: str) -> list[str]:
        """Count one failure against both budgets; returns which budgets ("address",
        "account") this very failure used up, so that the caller records the start of a burst
        once."""
        try:
            return [
                label
                for label, budget, identifier in self._budgets(address, account)
                if await budget.spend(identifier)
            ]
        except Exception as exc:
            raise DependencyUnavailable("login throttle unavailable") from exc
