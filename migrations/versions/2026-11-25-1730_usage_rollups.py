"""Usage rollups: requests and units per tenant, key, model version and UTC day.

Filled here from the existing usage records; from now on the usage writer maintains it in the
same transaction as the records.

Revision ID: 5c0d2b7e41a3
Revises: 9affb5fe6a1f
Create Date: 2026-11-25 17:30:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5c0d2b7e41a3"
down_revision: str | None = "9affb5fe6a1f"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


_BACKFILL_SQLITE = """
INSERT INTO usage_daily (tenant_id, day, api_key_id, model, model_version, requests, units)
SELECT tenant_id, date(created_at), api_key_id, model, model_version, count(*), sum(units)
FROM usage_record GROUP BY tenant_id, date(created_at), api_key_id, model, model_version
"""
_BACKFILL_POSTGRES = """
INSERT INTO usage_daily (tenant_id, day, api_key_id, model, model_version, requests, units)
SELECT tenant_id, CAST(created_at AT TIME ZONE 'UTC' AS date), api_key_id, model, model_version,
       count(*), sum(units)
FROM usage_record
GROUP BY tenant_id, CAST(created_at AT TIME ZONE 'UTC' AS date), api_key_id, model, model_version
"""


def upgrade() -> None:
    op.create_table(
        "usage_daily",
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("api_key_id", sa.Uuid(), nullable=False),
        sa.Column("model", sa.String(length=100), nullable=False),
        sa.Column("model_version", sa.String(length=50), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("units", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["api_key_id"],
            ["api_key.id"],
            name=op.f("fk_usage_daily_api_key_id_api_key"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenant.id"],
            name=op.f("fk_usage_daily_tenant_id_tenant"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint(
            "tenant_id", "day", "api_key_id", "model", "model_version", name=op.f("pk_usage_daily")
        ),
    )
    with op.batch_alter_table("usage_daily", schema=None) as batch_op:
        batch_op.create_index("ix_usage_daily_day", ["day"], unique=False)
    # The UTC day of each record (Postgres: explicitly, whatever the session's time zone).
    op.execute(_BACKFILL_SQLITE if op.get_bind().dialect.name == "sqlite" else _BACKFILL_POSTGRES)


def downgrade() -> None:
    with op.batch_alter_table("usage_daily", schema=None) as batch_op:
        batch_op.drop_index("ix_usage_daily_day")
    op.drop_table("usage_daily")
