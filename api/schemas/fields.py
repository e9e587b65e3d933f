"""Bounded types for the values clients send, so that every value is bounded where it is
parsed (and OpenAPI states the bounds): nothing a client sends can overflow later arithmetic
or a database column."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, AwareDatetime, BeforeValidator, Field, WithJsonSchema

from auth.identity.keys import LATEST_EXPIRY
from auth.limits.plans import (
    MAX_IN_FLIGHT,
    MAX_MONTHLY_QUOTA,
    MAX_PLAN_MODELS,
    MAX_PRICE_PER_1000_UNITS,
    RATE_LIMITS_PATTERN,
)
from auth.usage.ledger import EARLIEST_DAY, LATEST_DAY

# Printable text: a NUL or a control character has no business in a name, and Postgres
# refuses NUL in text columns.
PRINTABLE_PATTERN = r"^[^\x00-\x1f\x7f]+$"

# The scopes a tenant's key may carry (an admin key's "admin" is never a tenant's to ask for).
TenantScope = Literal["predict", "usage:read", "keys:manage", "webhooks:manage"]
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=PRINTABLE_PATTERN)]
# What the limiter accepts, with amounts that fit every counter: up to five limits, each
# checked on every request (auth.limits.plans bounds the windows too).
RateLimitText = Annotated[
    str,
    Field(
        pattern=RATE_LIMITS_PATTERN,
        max_length=200,
        examples=["100/minute", "10/second;1000/hour"],
        description="requests per second, minute, hour or day, optionally per several of "
        "them (`10/2 seconds`); up to five limits separated by `;`, all enforced",
    ),
]
ModelNameText = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")]
# A plan's name, as created (POST /admin/plans) and as a tenant names its plan.
PlanName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")]
PlanModels = Annotated[
    list[ModelNameText],
    Field(
        max_length=MAX_PLAN_MODELS,
        description="the models the plan's tenants may call; null: every model",
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
MaxInFlight = Annotated[
    int,
    Field(ge=1, le=MAX_IN_FLIGHT, description="requests of one key in flight at once"),
    JsonInteger,
]
PricePer1000Units = Annotated[
    int,
    Field(
        ge=0,
        le=MAX_PRICE_PER_1000_UNITS,
        description="price of 1,000 units in the currency's minor unit (cents for USD)",
    ),
    JsonInteger,
]
PageLimit = Annotated[int, Field(ge=1, le=500)]
# Percentages of the monthly quota that raise usage.threshold events (auth.events).
AlertThresholds = Annotated[
    list[Annotated[int, Field(ge=1, le=100)]],
    Field(
        max_length=10,
        description="percentages of the monthly quota that raise a usage.threshold event "
        "(each once a month); empty: none",
    ),
]
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
