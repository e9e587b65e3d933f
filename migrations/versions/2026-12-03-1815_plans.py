"""Plans: a plan table that tenants reference, keys' own limits, and the plan on every usage row.

Each distinct value of the former ``tenant.plan`` column becomes a plan of that name (with no
limits of its own, free), and ``standard`` always exists: it is the default plan. Usage records
and daily rollups written so far are attributed to their tenant's plan.

Revision ID: 3b8f1c2d9e60
Revises: 5c0d2b7e41a3
Create Date: 2026-12-03 18:15:00+00:00
"""

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "3b8f1c2d9e60"
down_revision: str | None = "5c0d2b7e41a3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_DAILY_KEY = ["tenant_id", "day", "api_key_id", "model", "model_version"]


def upgrade() -> None:
    op.create_table(
        "plan",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("rate_limits", sa.String(length=200), nullable=True),
        sa.Column("monthly_quota", sa.BigInteger(), nullable=True),
        sa.Column("max_in_flight", sa.Integer(), nullable=True),
        sa.Column("models", sa.JSON(), nullable=True),
        sa.Column("price_per_1000_units", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("price_per_1000_units >= 0", name=op.f("ck_plan_price_not_negative")),
        sa.CheckConstraint("status IN ('active', 'retired')", name=op.f("ck_plan_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_plan")),
        sa.UniqueConstraint("name", name=op.f("uq_plan_name")),
    )
    bind = op.get_bind()
    names = {"standard"} | {
        name for (name,) in bind.execute(sa.text("SELECT DISTINCT plan FROM tenant")) if name
    }
    now = datetime.now(UTC)
    if bind.dialect.name == "sqlite":
        now = now.replace(tzinfo=None)  # as auth.models.UTCDateTime stores it there
    plan = sa.table(
        "plan",
        sa.column("id", sa.Uuid()),
        sa.column("name", sa.String()),
        sa.column("price_per_1000_units", sa.BigInteger()),
        sa.column("currency", sa.String()),
        sa.column("status", sa.String()),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("updated_at", sa.DateTime(timezone=True)),
    )
    op.bulk_insert(
        plan,
        [
            {
                "id": uuid.uuid4(),
                "name": name,
                "price_per_1000_units": 0,
                "currency": "USD",
                "status": "active",
                "created_at": now,
                "updated_at": now,
            }
            for name in sorted(names)
        ],
    )

    with op.batch_alter_table("tenant") as batch_op:
        batch_op.add_column(sa.Column("plan_id", sa.Uuid(), nullable=True))
    op.execute(
        "UPDATE tenant SET plan_id = (SELECT plan.id FROM plan WHERE plan.name = "
        "coalesce(tenant.plan, 'standard'))"
    )
    with op.batch_alter_table("tenant") as batch_op:
        batch_op.alter_column("plan_id", existing_type=sa.Uuid(), nullable=False)
        batch_op.alter_column(
            "rate_limit",
            existing_type=sa.String(length=64),
            type_=sa.String(length=200),
            existing_nullable=True,
        )
        batch_op.create_index(batch_op.f("ix_tenant_plan_id"), ["plan_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_tenant_plan_id_plan"), "plan", ["plan_id"], ["id"], ondelete="RESTRICT"
        )
        batch_op.drop_column("plan")

    with op.batch_alter_table("api_key") as batch_op:
        batch_op.add_column(sa.Column("rate_limits", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("max_in_flight", sa.Integer(), nullable=True))

    for table in ("usage_record", "usage_daily"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column("plan_id", sa.Uuid(), nullable=True))
        op.execute(
            f"UPDATE {table} SET plan_id = "  # noqa: S608 (a constant table name)
            f"(SELECT tenant.plan_id FROM tenant WHERE tenant.id = {table}.tenant_id)"
        )
    with op.batch_alter_table("usage_record") as batch_op:
        batch_op.alter_column("plan_id", existing_type=sa.Uuid(), nullable=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_usage_record_plan_id_plan"),
            "plan",
            ["plan_id"],
            ["id"],
            ondelete="RESTRICT",
        )
    with op.batch_alter_table("usage_daily") as batch_op:
        batch_op.alter_column("plan_id", existing_type=sa.Uuid(), nullable=False)
        batch_op.drop_constraint("pk_usage_daily", type_="primary")
        batch_op.create_primary_key("pk_usage_daily", [*_DAILY_KEY, "plan_id"])
        batch_op.create_foreign_key(
            batch_op.f("fk_usage_daily_plan_id_plan"),
            "plan",
            ["plan_id"],
            ["id"],
            ondelete="RESTRICT",
        )


def downgrade() -> None:
    # Rollup rows that differ only by plan merge back into one.
    columns = ", ".join(_DAILY_KEY)
    op.execute(
        f"CREATE TABLE usage_daily_merged AS SELECT {columns}, "  # noqa: S608 (constants)
        f"sum(requests) AS requests, sum(units) AS units FROM usage_daily GROUP BY {columns}"
    )
    op.execute("DELETE FROM usage_daily")
    with op.batch_alter_table("usage_daily") as batch_op:
        batch_op.drop_constraint("fk_usage_daily_plan_id_plan", type_="foreignkey")
        batch_op.drop_constraint("pk_usage_daily", type_="primary")
        batch_op.drop_column("plan_id")
        batch_op.create_primary_key("pk_usage_daily", _DAILY_KEY)
    op.execute(
        f"INSERT INTO usage_daily ({columns}, requests, units) "  # noqa: S608 (constants)
        f"SELECT {columns}, requests, units FROM usage_daily_merged"
    )
    op.drop_table("usage_daily_merged")
    with op.batch_alter_table("usage_record") as batch_op:
        batch_op.drop_constraint("fk_usage_record_plan_id_plan", type_="foreignkey")
        batch_op.drop_column("plan_id")

    with op.batch_alter_table("api_key") as batch_op:
        batch_op.drop_column("max_in_flight")
        batch_op.drop_column("rate_limits")

    with op.batch_alter_table("tenant") as batch_op:
        batch_op.add_column(
            sa.Column("plan", sa.String(length=50), nullable=False, server_default="standard")
        )
    op.execute(
        "UPDATE tenant SET plan = (SELECT plan.name FROM plan WHERE plan.id = tenant.plan_id)"
    )
    with op.batch_alter_table("tenant") as batch_op:
        batch_op.drop_constraint("fk_tenant_plan_id_plan", type_="foreignkey")
        batch_op.drop_index("ix_tenant_plan_id")
        batch_op.drop_column("plan_id")
        batch_op.alter_column(
            "rate_limit",
            existing_type=sa.String(length=200),
            type_=sa.String(length=64),
            existing_nullable=True,
        )
    op.drop_table("plan")
