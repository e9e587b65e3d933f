"""Every table of modelgate, on one declarative ``Base``."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite has no 64-bit autoincrement type distinct from INTEGER PRIMARY KEY.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not accepted; use timezone-aware UTC")
        value = value.astimezone(UTC)
        # SQLite stores text; keep it zone-free and UTC so string order is time order.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(
        self,
        value: datetime | None,
        dialect: Dialect,  # noqa: ARG002 (SQLAlchemy's signature)
    ) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """The declarative base; its metadata carries the constraint naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


class Plan(Base):
    """What an operator sells: rate limits, a monthly quota, a concurrency bound, the models it
    opens and the price per 1,000 units. Tenants reference one; a change reaches every tenant on
    it within the key cache's TTL.

    The price and currency never change once the plan exists (``auth.limits.plans``): usage rows
    name the plan they were served under, so a month's bill is the same whenever it is exported.
    """

    __tablename__ = "plan"
    __table_args__ = (
        CheckConstraint("status IN ('active', 'retired')", name="status"),
        CheckConstraint("price_per_1000_units >= 0", name="price_not_negative"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # limits' notation, several separated by ";" ("10/second;1000/hour"); None: the server's
    # default rate limit.
    rate_limits: Mapped[str | None] = mapped_column(String(200))
    # Units per calendar month (UTC); None means unlimited.
    monthly_quota: Mapped[int | None] = mapped_column(BigInteger)
    # Requests of one key in flight at once, across workers; None: no bound.
    max_in_flight: Mapped[int | None] = mapped_column(Integer)
    # The model names its tenants may call; None: every model.
    models: Mapped[list[str] | None] = mapped_column(JSON)
    # Percentages of the monthly quota that raise a usage.threshold event (auth.events);
    # None: auth.events.outbox.DEFAULT_THRESHOLDS.
    usage_alert_thresholds: Mapped[list[int] | None] = mapped_column(JSON)
    # In the currency's minor unit (cents for USD).
    price_per_1000_units: Mapped[int] = mapped_column(BigInteger, default=0)
    currency: Mapped[str] = mapped_column(String(3), default="USD")
    # A retired plan keeps its tenants but takes no new ones.
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Tenant(Base):
    """A customer of the operator: owns API keys, is on a plan and may override its rate limit
    and monthly quota."""

    __tablename__ = "tenant"
    __table_args__ = (CheckConstraint("status IN ('active', 'suspended')", name="status"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    plan_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("plan.id", ondelete="RESTRICT"), index=True
    )
    # Overrides of the plan's limits (None: the plan's).
    rate_limit: Mapped[str | None] = mapped_column(String(200))
    monthly_quota: Mapped[int | None] = mapped_column(BigInteger)
    # Override of the plan's usage alert thresholds (None: the plan's).
    usage_alert_thresholds: Mapped[list[int] | None] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class AdminPrincipal(Base):
    """An operator identity: admin API keys belong to one, and an admin user is one that has a
    password (its ``name`` is then the user's e-mail address)."""

    __tablename__ = "admin_principal"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # An argon2 hash (pwdlib's PHC string); None for a principal that only holds API keys.
    password_hash: Mapped[str | None] = mapped_column(String(255))
    password_changed_at: Mapped[datetime | None] = mapped_column()


class ApiKey(Base):
    """An API key's metadata. The key itself is never stored: only HMAC-SHA256(pepper, key)."""

    __tablename__ = "api_key"
    __table_args__ = (
        CheckConstraint(
            "(tenant_id IS NULL) <> (admin_principal_id IS NULL)", name="exactly_one_owner"
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("tenant.id", ondelete="CASCADE"), index=True
    )
    admin_principal_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("admin_principal.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    # The first characters of the key, enough for a person to recognise it in a list.
    display_prefix: Mapped[str] = mapped_column(String(16))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    # Space-separated, as in OAuth 2.0.
    scopes: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column()
    # A moment in the future while a rotation's grace period runs.
    revoked_at: Mapped[datetime | None] = mapped_column()
    # Written in batches (not once per request), so it may lag by the flush interval.
    last_used_at: Mapped[datetime | None] = mapped_column()
    # Limits of this key alone, checked on top of its tenant's (so only ever tighter).
    rate_limits: Mapped[str | None] = mapped_column(String(200))
    max_in_flight: Mapped[int | None] = mapped_column(Integer)
    # The key this one replaced by rotation.
    rotated_from_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("api_key.id", ondelete="SET NULL")
    )

    @property
    def scope_set(self) -> frozenset[str]:
        """The key's scopes as a set."""
        return frozenset(self.scopes.split())


class UsageRecord(Base):
    """One billable prediction request. ``(request_id, created_at)`` is unique, so a retried
    write (which repeats both) bills once.

    On Postgres the table is partitioned by month of ``created_at`` (``auth.usage.partitions``),
    which is why the unique constraint, and the primary key there, include it.
    """

    __tablename__ = "usage_record"
    __table_args__ = (
        Index("ix_usage_record_tenant_id_created_at", "tenant_id", "created_at"),
        UniqueConstraint("request_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    request_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenant.id", ondelete="RESTRICT"))
    api_key_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("api_key.id", ondelete="RESTRICT"), index=True
    )
    model: Mapped[str] = mapped_column(String(100))
    model_version: Mapped[str] = mapped_column(String(50))
    # The plan the request was served under: it prices the units.
    plan_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("plan.id", ondelete="RESTRICT"))
    units: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int] = mapped_column(SmallInteger)
    latency_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class UsageDaily(Base):
    """Requests and units per tenant, key, model version, plan and UTC day: the rollup every usage
    read (reports, the billing export) uses instead of the raw records.

    The usage writer adds to it in the same transaction as the records it summarises, so it
    always equals their sums; ``modelgate usage rebuild-rollups`` recomputes it from them.
    """

    __tablename__ = "usage_daily"
    # The export reads a month of every tenant: by day first.
    __table_args__ = (Index("ix_usage_daily_day", "day"),)

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenant.id", ondelete="RESTRICT"), primary_key=True
    )
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    api_key_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("api_key.id", ondelete="RESTRICT"), primary_key=True
    )
    model: Mapped[str] = mapped_column(String(100), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(50), primary_key=True)
    plan_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("plan.id", ondelete="RESTRICT"), primary_key=True
    )
    requests: Mapped[int] = mapped_column(BigInteger)
    units: Mapped[int] = mapped_column(BigInteger)


class MonthlyUsage(Base):
    """Units used per tenant and UTC month: the counter the quota is enforced against atomically.

    It is updated in the same transaction as each usage record, so it always equals the sum of
    that month's records.
    """

    __tablename__ = "monthly_usage"

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenant.id", ondelete="CASCADE"), primary_key=True
    )
    month: Mapped[str] = mapped_column(String(7), primary_key=True)  # "YYYY-MM"
    units: Mapped[int] = mapped_column(BigInteger, default=0)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)


class AccessToken(Base):
    """A minted JWT's record (never the token itself): who holds it, from which key or admin
    user, with which scopes, until when. Revoking the record revokes the token."""

    __tablename__ = "access_token"
    __table_args__ = (
        CheckConstraint(
            "(api_key_id IS NULL) <> (admin_principal_id IS NULL)", name="exactly_one_source"
        ),
    )

    jti: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    subject: Mapped[str] = mapped_column(String(80))  # the token's "sub" claim
    grant_type: Mapped[str] = mapped_column(String(32))  # "client_credentials" or "password"
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("api_key.id", ondelete="CASCADE"), index=True
    )
    admin_principal_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("admin_principal.id", ondelete="CASCADE"), index=True
    )
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("tenant.id", ondelete="CASCADE"), index=True
    )
    scopes: Mapped[str] = mapped_column(String(200))
    issued_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)
    revoked_at: Mapped[datetime | None] = mapped_column()
    client_addr: Mapped[str | None] = mapped_column(String(64))


class AuditEvent(Base):
    """Who did what to which tenant or key, when, from where.

    ``id`` is the event's position in the hash chain (assigned by ``auth.audit``, without
    gaps), ``prev_hash`` the previous event's ``hash``, and ``hash`` the SHA-256 of this
    event's canonical form. The table is append-only (database triggers refuse UPDATE and
    DELETE).
    """

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200))  # "admin:<name>", "tenant:<id>" or "cli"
    actor_key_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    action: Mapped[str] = mapped_column(String(64), index=True)  # e.g. "tenant.create"
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str] = mapped_column(String(64))
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, index=True)
    remote_addr: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(256))
    request_id: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditChainHead(Base):
    """The one row that says where the audit chain ends. Appending updates it first, which
    serialises concurrent writers (a row lock on Postgres, the write lock on SQLite), so two
    transactions can never both extend the same event; it also lets ``audit verify`` notice
    that events were cut off the end."""

    __tablename__ = "audit_chain_head"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    last_event_id: Mapped[int] = mapped_column(BigInteger)
    last_hash: Mapped[str] = mapped_column(String(64))


class ModelActivation(Base):
    """The version of a model that requests pinning no version are served by, as an operator
    activated it (``auth.model_activation``). Every worker reads it about once a second; a
    model without a row is served by the registry's own choice."""

    __tablename__ = "model_activation"

    # The registry's name and version patterns (ml.manifest); checked by the service.
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(16))
    activated_at: Mapped[datetime] = mapped_column(default=utcnow)
    activated_by: Mapped[str] = mapped_column(String(200))  # the audit trail's actor name


class WebhookDelivery(Base):
    """A signed webhook delivery that was accepted (``auth.webhooks.deliveries``): its id is
    accepted once, across every replica (the key). Rows older than twice the clock
    skew allowed are pruned in bulk: by then the delivery's signed timestamp is stale anyway."""

    __tablename__ = "webhook_delivery"

    # The pair is the key: a second insert of it is the replay.
    source: Mapped[str] = mapped_column(String(16), primary_key=True)  # "mlflow" or "generic"
    delivery_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class IdempotentResponse(Base):
    """The stored answer to a request sent with an ``Idempotency-Key`` (``auth.idempotency``).

    Written only by the usage writer, in the transaction that bills the request: a row exists
    exactly when its request was billed, so a retry is answered from it and never billed again.
    ``scope`` is the SHA-256 of the key's scope (tenant, API key, method, route, key string), so
    one tenant's key can never name another's row. Expired rows are pruned in bulk."""

    __tablename__ = "idempotent_response"

    scope: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    api_key_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    # SHA-256 of the request's body as received: the same key with another body is refused.
    fingerprint: Mapped[bytes] = mapped_column(LargeBinary(32))
    status_code: Mapped[int] = mapped_column(SmallInteger)
    # The response headers that matter (content type, V2's binary JSON length), as JSON text.
    headers: Mapped[str] = mapped_column(Text)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class ModelVersion(Base):
    """One published model version in the catalogue (``auth.model_catalog``): its manifest as
    the registry wrote it (the artifacts' SHA-256s every replica verifies a fetched copy
    against), where it came from, and who published it. A row is never changed: publishing the
    same name and version again with another manifest is refused."""

    __tablename__ = "model_version"

    # The registry's name and version patterns (ml.manifest); checked by the service.
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(16), primary_key=True)
    manifest: Mapped[str] = mapped_column(Text)
    source_uri: Mapped[str | None] = mapped_column(Text)
    source_version: Mapped[str | None] = mapped_column(String(200))
    registered_at: Mapped[datetime] = mapped_column(default=utcnow)
    registered_by: Mapped[str] = mapped_column(String(200))  # the audit trail's actor name


# Outgoing events (auth.events): what modelgate tells tenants and operators, and how it was
# delivered. Not to be confused with WebhookDelivery above, the *incoming* model webhooks.


class EventEndpoint(Base):
    """A URL that receives signed events (Standard Webhooks): a tenant's own (``tenant_id``
    set) or the operator's, service-wide (``tenant_id`` null).

    The signing secret is stored encrypted (``auth.events.secrets``): it signs, so it cannot be
    a one-way digest. During a rotation's grace period the previous secret signs as well."""

    __tablename__ = "event_endpoint"
    __table_args__ = (CheckConstraint("status IN ('active', 'disabled')", name="status"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("tenant.id", ondelete="CASCADE"), index=True
    )
    url: Mapped[str] = mapped_column(String(2048))
    description: Mapped[str] = mapped_column(String(500), default="")
    # The event types it receives.
    event_types: Mapped[list[str]] = mapped_column(JSON)
    secret_ciphertext: Mapped[str] = mapped_column(Text)
    previous_secret_ciphertext: Mapped[str | None] = mapped_column(Text)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column()
    status: Mapped[str] = mapped_column(String(16), default="active")
    disabled_reason: Mapped[str | None] = mapped_column(String(500))
    # The first failed delivery since the last success: a day of it disables the endpoint.
    failing_since: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Event(Base):
    """The transactional outbox: one event, inserted in the transaction of the change that
    caused it. ``id`` is the stable id sent as ``webhook-id`` at every attempt; ``payload`` is the
    exact body ``{"type", "timestamp", "data"}`` that is signed. ``dedupe_key`` makes an event
    that must happen once (a threshold of a month, a key's expiry notice) unique."""

    __tablename__ = "event"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    type: Mapped[str] = mapped_column(String(64))
    # The tenant it is about (None: service-wide).
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("tenant.id", ondelete="CASCADE"), index=True
    )
    payload: Mapped[str] = mapped_column(Text)
    dedupe_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set once a dispatcher created its deliveries (one per subscribed endpoint).
    fanned_out_at: Mapped[datetime | None] = mapped_column(index=True)


class EventDelivery(Base):
    """One event to one endpoint: pending until delivered, retried with backoff, failed when
    its schedule is exhausted or its endpoint is disabled."""

    __tablename__ = "event_delivery"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="status"),
        UniqueConstraint("event_id", "endpoint_id"),
        Index("ix_event_delivery_status_next_attempt_at", "status", "next_attempt_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    event_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("event.id", ondelete="CASCADE"))
    endpoint_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("event_endpoint.id", ondelete="CASCADE"), index=True
    )
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column()


class EventDeliveryAttempt(Base):
    """The delivery log: one row per attempt, readable by the endpoint's owner."""

    __tablename__ = "event_delivery_attempt"
    __table_args__ = (
        Index("ix_event_delivery_attempt_endpoint_id_attempted_at", "endpoint_id", "attempted_at"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    delivery_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("event_delivery.id", ondelete="CASCADE"), index=True
    )
    endpoint_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("event_endpoint.id", ondelete="CASCADE")
    )
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    attempted_at: Mapped[datetime] = mapped_column(default=utcnow)
    # "delivered", "http_error", "network_error" or "refused" (the address guard).
    outcome: Mapped[str] = mapped_column(String(16))
    status_code: Mapped[int | None] = mapped_column(SmallInteger)
    latency_ms: Mapped[float] = mapped_column(Float)
    # The first bytes of the answer (or the error's class), for the owner to read.
    response_excerpt: Mapped[str] = mapped_column(Text, default="")
