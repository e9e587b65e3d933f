"""Bounded types for the values clients send, so that every value is bounded where it is
parsed (and OpenAPI states the bounds): nothing a client sends can overflow later arithmetic
or a database column."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, BeforeValidator, Field, WithJsonSchema

from auth.identity.keys import LATEST_EXPIRY
from auth.tenants import MAX_MONTHLY_QUOTA
from auth.usage import EARLIEST_DAY, LATEST_DAY

# Printable text: a NUL or a control character has no business in a name, and Postgres
# refuses NUL in text columns.
PRINTABLE_PATTERN = r"^[^\x00-\x1f\x7f]+$"

Name = Annotated[str, Field(min_length=1, max_length=200, pattern=PRINTABLE_PATTERN)]
# One form only: what the limiter accepts, with an amount that fits every counter.
RateLimitText = Annotated[
    str,
    Field(
        pattern=r"^[1-9][0-9]{0,8}/(second|minute|hour|day)$",
        max_length=20,
        examples=["100/minute"],
        description="requests per second, minute, hour or day, e.g. `100/minute`",
    ),
]


def json_integer(value: object) -> object:
    """A JSON integer as JSON Schema defines it: a number without a fractional part (``5`` or
    ``5.0``), never ``true``/``false`` or a string (which pydantic's lax mode would take)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer")
        return int(value)
    return value


JsonInteger = BeforeValidator(json_integer)
# The constraints first, so that the schema states them as minimum and maximum.
MonthlyQuota = Annotated[
    int, Field(ge=0, le=MAX_MONTHLY_QUOTA, description="units per UTC month"), JsonInteger
]
PageLimit = Annotated[int, Field(ge=1, le=500)]
PageOffset = Annotated[int, Field(ge=0, le=1_000_000)]
# A month of the product's calendar (years 2000-2999), as the usage window's days are.
BillingMonth = Annotated[
    str,
    Field(
        pattern=r"^2[0-9]{3}-(0[1-9]|1[0-2])$",
        description=f"YYYY-MM (UTC), from {EARLIEST_DAY:%Y-%m} to {LATEST_DAY:%Y-%m}",
    ),
]
DAY_RANGE = f"a UTC day (YYYY-MM-DD) from {EARLIEST_DAY} to {LATEST_DAY}"
DAY_BOUNDS = {"ge": EARLIEST_DAY, "le": LATEST_DAY}


def _within_key_lifetime(value: datetime) -> datetime:
    # Converted here, once: a far time zone could otherwise push a datetime past year 9999
    # when some later code converts it.
    too_late = f"must be before {LATEST_EXPIRY:%Y-%m-%d}"
    if value.year >= LATEST_EXPIRY.year:
        raise ValueError(too_late)
    utc = value.astimezone(UTC)  # within a day of its local time: no overflow below year 3000
    if utc >= LATEST_EXPIRY:
        raise ValueError(too_late)
    return utc


KeyExpiry = Annotated[
    AwareDatetime,
    AfterValidator(_within_key_lifetime),
    Field(description=f"an aware datetime in the future, before {LATEST_EXPIRY:%Y-%m-%d}"),
]


EARLIEST_MOMENT = datetime(2000, 1, 1, tzinfo=UTC)


def _within_product_time(value: datetime) -> datetime:
    # The same conversion as KeyExpiry's: once, here, where no far zone can overflow it.
    if not EARLIEST_MOMENT.year <= value.year < LATEST_EXPIRY.year:
        raise ValueError(f"must be from {EARLIEST_MOMENT:%Y-%m-%d} to before {LATEST_EXPIRY:%Y}")
    return value.astimezone(UTC)


Moment = Annotated[
    AwareDatetime,
    AfterValidator(_within_product_time),
    # The schema states the year's bound as a pattern (JSON Schema has no minimum for dates),
    # so that a generated or hand-written client knows what is accepted.
    WithJsonSchema(
        {
            "type": "string",
            "format": "date-time",
            "pattern": r"^2[0-9]{3}-",
            "description": "an aware datetime (RFC 3339, with a zone) in the years "
            f"{EARLIEST_MOMENT:%Y} to {LATEST_EXPIRY.year - 1}",
        }
    ),
]
