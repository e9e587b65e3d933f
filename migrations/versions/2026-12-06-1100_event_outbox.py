"""Outgoing events: endpoints, the transactional outbox, deliveries and their log; usage alert
thresholds on plans and tenants.

Revision ID: 3a7866decd42
Revises: e63f9a4c1d32
Create Date: 2026-12-06 11:00:26.723850+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "3a7866decd42"
down_revision: str | None = "e63f9a4c1d32"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "event",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=True),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("dedupe_key", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fanned_out_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenant.id"], name=op.f("fk_event_tenant_id_tenant"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event")),
        sa.UniqueConstraint("dedupe_key", name=op.f("uq_event_dedupe_key")),
    )
    with op.batch_alter_table("event", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_event_fanned_out_at"), ["fanned_out_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_event_tenant_id"), ["tenant_id"], unique=False)

    op.create_table(
        "event_endpoint",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=True),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("description", sa.String(length=500), nullable=False),
        sa.Column("event_types", sa.JSON(), nullable=False),
        sa.Column("secret_ciphertext", sa.Text(), nullable=False),
        sa.Column("previous_secret_ciphertext", sa.Text(), nullable=True),
        sa.Column("previous_secret_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("disabled_reason", sa.String(length=500), nullable=True),
        sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('active', 'disabled')", name=op.f("ck_event_endpoint_status")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenant.id"],
            name=op.f("fk_event_endpoint_tenant_id_tenant"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_endpoint")),
    )
    with op.batch_alter_table("event_endpoint", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_event_endpoint_tenant_id"), ["tenant_id"], unique=False
        )

    op.create_table(
        "event_delivery",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("endpoint_id", sa.Uuid(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'delivered', 'failed')", name=op.f("ck_event_delivery_status")
        ),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["event_endpoint.id"],
            name=op.f("fk_event_delivery_endpoint_id_event_endpoint"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["event.id"],
            name=op.f("fk_event_delivery_event_id_event"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_delivery")),
        sa.UniqueConstraint("event_id", "endpoint_id", name=op.f("uq_event_delivery_event_id")),
    )
    with op.batch_alter_table("event_delivery", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_event_delivery_endpoint_id"), ["endpoint_id"], unique=False
        )
        batch_op.create_index(
            "ix_event_delivery_status_next_attempt_at", ["status", "next_attempt_at"], unique=False
        )

    op.create_table(
        "event_delivery_attempt",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("delivery_id", sa.Uuid(), nullable=False),
        sa.Column("endpoint_id", sa.Uuid(), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("status_code", sa.SmallInteger(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("response_excerpt", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["event_delivery.id"],
            name=op.f("fk_event_delivery_attempt_delivery_id_event_delivery"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["event_endpoint.id"],
            name=op.f("fk_event_delivery_attempt_endpoint_id_event_endpoint"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_delivery_attempt")),
    )
    with op.batch_alter_table("event_delivery_attempt", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_event_delivery_attempt_delivery_id"), ["delivery_id"], unique=False
        )
        batch_op.create_index(
            "ix_event_delivery_attempt_endpoint_id_attempted_at",
            ["endpoint_id", "attempted_at"],
            unique=False,
        )

    with op.batch_alter_table("plan", schema=None) as batch_op:
        batch_op.add_column(sa.Column("usage_alert_thresholds", sa.JSON(), nullable=True))

    with op.batch_alter_table("tenant", schema=None) as batch_op:
        batch_op.add_column(sa.Column("usage_alert_thresholds", sa.JSON(), nullable=True))


def downgrade() -> None:

    with op.batch_alter_table("tenant", schema=None) as batch_op:
        batch_op.drop_column("usage_alert_thresholds")

    with op.batch_alter_table("plan", schema=None) as batch_op:
        batch_op.drop_column("usage_alert_thresholds")

    with op.batch_alter_table("event_delivery_attempt", schema=None) as batch_op:
        batch_op.drop_index("ix_event_delivery_attempt_endpoint_id_attempted_at")
        batch_op.drop_index(batch_op.f("ix_event_delivery_attempt_delivery_id"))

    op.drop_table("event_delivery_attempt")
    with op.batch_alter_table("event_delivery", schema=None) as batch_op:
        batch_op.drop_index("ix_event_delivery_status_next_attempt_at")
        batch_op.drop_index(batch_op.f("ix_event_delivery_endpoint_id"))

    op.drop_table("event_delivery")
    with op.batch_alter_table("event_endpoint", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_event_endpoint_tenant_id"))

    op.drop_table("event_endpoint")
    with op.batch_alter_table("event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_event_tenant_id"))
        batch_op.drop_index(batch_op.f("ix_event_fanned_out_at"))

    op.drop_table("event")
