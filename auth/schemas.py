"""The one serialisation of each record that leaves ``auth``: the HTTP routes answer with these
models and the CLI prints them, so that every entry point shows the same shape."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel

from auth.models import ApiKey, Plan, Tenant


class TenantView(BaseModel):
    """A tenant: its plan, its overrides of the plan's limits, status and timestamps."""

    id: uuid.UUID
    name: str
    plan: str
    plan_id: uuid.UUID
    # Overrides of the plan's (null: the plan's applies).
    rate_limit: str | None
    monthly_quota: int | None
    # Percentages of the monthly quota that send usage.threshold (null: the plan's).
    usage_alert_thresholds: list[int] | None = None
    status: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, tenant: Tenant, plan: Plan) -> TenantView:
        """The view of a tenant row and its plan."""
        return cls(
            id=tenant.id,
            name=tenant.name,
            plan=plan.name,
            plan_id=plan.id,
            rate_limit=tenant.rate_limit,
            monthly_quota=tenant.monthly_quota,
            usage_alert_thresholds=tenant.usage_alert_thresholds,
            status=tenant.status,
            created_at=tenant.created_at,
            updated_at=tenant.updated_at,
        )


class KeyView(BaseModel):
    """An API key's metadata: never the key, never its digest."""

    id: uuid.UUID
    tenant_id: uuid.UUID | None
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    rotated_from_id: uuid.UUID | None
    # This key's own limits, on top of its tenant's (null: none of its own).
    rate_limits: str | None = None
    max_in_flight: int | None = None

    @classmethod
    def of(cls, key: ApiKey) -> KeyView:
        """The view of a key row (the digest is not one of its fields)."""
        return cls(
            id=key.id,
            tenant_id=key.tenant_id,
            name=key.name,
            prefix=key.display_prefix,
            scopes=sorted(key.scope_set),
            created_at=key.created_at,
            expires_at=key.expires_at,
            revoked_at=key.revoked_at,
            last_used_at=key.last_used_at,
            rotated_from_id=key.rotated_from_id,
            rate_limits=key.rate_limits,
            max_in_flight=key.max_in_flight,
        )


class KeyList(BaseModel):
    """A tenant's keys (metadata only: never a key or its digest)."""

    keys: list[KeyView]


class IssuedKey(KeyView):
    """A newly issued (or rotated-in) key; ``key`` is shown in this response only."""

    key: str

    @classmethod
    def issued(cls, key: ApiKey, secret: str) -> IssuedKey:
        """The view of a key row with its secret, for the one response that carries it."""
        return cls(**KeyView.of(key).model_dump(), key=secret)
