"""Usage records partitioned by UTC month on Postgres; SQLite keeps one table.

Postgres requires every unique constraint of a partitioned table to hold its partition key, so
the primary key becomes (id, created_at) and the idempotency constraint (request_id,
created_at), on both dialects for the latter (a retried write repeats its record's created_at,
so it still fails whole). The records are copied into a new partitioned table, with one
partition per month they span and one for the current month; the usage writer creates later
months' partitions as their first records arrive (auth.usage.partitions). Dialect-guarded:
on SQLite only the unique constraint changes.

Revision ID: 7d41e9a0c3b2
Revises: 3b8f1c2d9e60
Create Date: 2026-12-03 19:00:00+00:00
"""

import re
from collections.abc import Sequence
from datetime import UTC, date, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "7d41e9a0c3b2"
down_revision: str | None = "3b8f1c2d9e60"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = (
    "id, request_id, tenant_id, api_key_id, model, model_version, plan_id, units, status_code, "
    "latency_ms, created_at"
)


def _table_sql(name: str, *, partitioned: bool) -> str:
    key = "(id, created_at)" if partitioned else "(id)"
    unique = "(request_id, created_at)" if partitioned else "(request_id)"
    return f"""
CREATE TABLE {name} (
    id BIGINT NOT NULL DEFAULT nextval('usage_record_id_seq'),
    request_id UUID NOT NULL,
    tenant_id UUID NOT NULL,
    api_key_id UUID NOT NULL,
    model VARCHAR(100) NOT NULL,
    model_version VARCHAR(50) NOT NULL,
    plan_id UUID NOT NULL,
    units INTEGER NOT NULL,
    status_code SMALLINT NOT NULL,
    latency_ms DOUBLE PRECISION NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    CONSTRAINT pk_usage_record PRIMARY KEY {key},
    CONSTRAINT uq_usage_record_request_id UNIQUE {unique},
    CONSTRAINT fk_usage_record_tenant_id_tenant FOREIGN KEY (tenant_id)
        REFERENCES tenant (id) ON DELETE RESTRICT,
    CONSTRAINT fk_usage_record_api_key_id_api_key FOREIGN KEY (api_key_id)
        REFERENCES api_key (id) ON DELETE RESTRICT,
    CONSTRAINT fk_usage_record_plan_id_plan FOREIGN KEY (plan_id)
        REFERENCES plan (id) ON DELETE RESTRICT
){" PARTITION BY RANGE (created_at)" if partitioned else ""}
"""


def _set_aside(old: str) -> None:
    """Rename the current table and its index-backed names (which Postgres keeps per schema)."""
    op.execute(f"ALTER TABLE usage_record RENAME TO {old}")
    op.execute(f"ALTER TABLE {old} RENAME CONSTRAINT pk_usage_record TO pk_{old}")
    op.execute(
        f"ALTER TABLE {old} RENAME CONSTRAINT uq_usage_record_request_id TO uq_{old}_request_id"
    )
    op.execute(f"ALTER INDEX ix_usage_record_api_key_id RENAME TO ix_{old}_api_key_id")
    op.execute(
        f"ALTER INDEX ix_usage_record_tenant_id_created_at RENAME TO ix_{old}_tenant_id_created_at"
    )


def _replace(old: str, *, partitioned: bool) -> None:
    """A new usage_record in place of the one set aside as ``old``, with its records."""
    op.execute(_table_sql("usage_record", partitioned=partitioned))
    # The id sequence moves to the new table (dropping the old one would drop it otherwise).
    op.execute("ALTER SEQUENCE usage_record_id_seq OWNED BY usage_record.id")
    op.execute("CREATE INDEX ix_usage_record_api_key_id ON usage_record (api_key_id)")
    op.execute(
        "CREATE INDEX ix_usage_record_tenant_id_created_at ON usage_record (tenant_id, created_at)"
    )
    if partitioned:
        bind = op.get_bind()
        first, last = bind.execute(
            sa.text(f"SELECT min(created_at), max(created_at) FROM {old}")  # noqa: S608
        ).one()
        now = datetime.now(UTC)
        for month in _months(first or now, max(last or now, now)):
            op.execute(_partition_sql(month))
    op.execute(
        f"INSERT INTO usage_record ({_COLUMNS}) SELECT {_COLUMNS} FROM {old}"  # noqa: S608
    )
    op.execute(f"DROP TABLE {old}")


def _months(first: datetime, last: datetime) -> list[date]:
    first, last = first.astimezone(UTC), last.astimezone(UTC)
    months, year, month = [], first.year, first.month
    while (year, month) <= (last.year, last.month):
        months.append(date(year, month, 1))
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return months


def _partition_sql(first: date) -> str:
    # The same DDL as auth.usage.partitions.create_partition_sql, frozen with this revision.
    following = (
        date(first.year + 1, 1, 1) if first.month == 12 else first.replace(month=first.month + 1)
    )
    name = f"usage_record_{first.year:04d}_{first.month:02d}"
    assert re.fullmatch(r"usage_record_[0-9]{4}_[0-9]{2}", name)  # noqa: S101
    return (
        f"CREATE TABLE {name} PARTITION OF usage_record FOR VALUES "
        f"FROM ('{first.isoformat()} 00:00:00+00') TO ('{following.isoformat()} 00:00:00+00')"
    )


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _set_aside("usage_record_unpartitioned")
        _replace("usage_record_unpartitioned", partitioned=True)
        return
    with op.batch_alter_table("usage_record") as batch_op:
        batch_op.drop_constraint("uq_usage_record_request_id", type_="unique")
        batch_op.create_unique_constraint(
            "uq_usage_record_request_id", ["request_id", "created_at"]
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _set_aside("usage_record_partitioned")
        # The partitions go with their table (DROP TABLE of a partitioned table drops them).
        _replace("usage_record_partitioned", partitioned=False)
        return
    with op.batch_alter_table("usage_record") as batch_op:
        batch_op.drop_constraint("uq_usage_record_request_id", type_="unique")
        batch_op.create_unique_constraint("uq_usage_record_request_id", ["request_id"])
