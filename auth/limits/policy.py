"""Rate-limit text and what it means: ``parse_rate_limits`` turns ``"10/second;1000/hour"`` (a
setting, a plan's or a tenant's limits, a key's own) into a ``RateLimitPolicy`` with its
``RateLimit-Policy`` header, within the bounds every source is held to. The rate limiter
(``auth.limits.limiter``) checks policies; plans (``auth.limits.plans``) validate with the same
parse."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from limits import RateLimitItem, parse_many

from auth.errors import InvalidRequest

# Bounds on a limit string, wherever it comes from (a plan or tenant row is trusted, not blindly).
MAX_LIMITS = 5
MAX_AMOUNT = 10**9


def window_name(seconds: int) -> str:
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
    names = tuple(window_name(item.get_expiry()) for item in items)
    header = ", ".join(
        f'"{name}";q={item.amount};w={item.get_expiry()}'
        for name, item in zip(names, items, strict=True)
    )
    return RateLimitPolicy(items=items, names=names, header=header)
