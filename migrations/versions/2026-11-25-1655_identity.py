"""Identity: access-token records, admin passwords, key rotation and last use, the audit chain.

Existing audit events are chained in id order (their ids become chain positions), and the
table becomes append-only: triggers refuse UPDATE and DELETE on both backends.

Revision ID: 9affb5fe6a1f
Revises: 001611c2a964
Create Date: 2026-11-25 16:55:39.373783+00:00
"""

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC

import sqlalchemy as sa
from alembic import op

from auth.models import UTCDateTime

revision: str = "9affb5fe6a1f"
down_revision: str | None = "001611c2a964"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENESIS_HASH = "0" * 64

_SQLITE_TRIGGERS = (
    """CREATE TRIGGER audit_event_no_update BEFORE UPDATE ON audit_event
       BEGIN SELECT RAISE(ABORT, 'audit_event is append-only'); END""",
    """CREATE TRIGGER audit_event_no_delete BEFORE DELETE ON audit_event
       BEGIN SELECT RAISE(ABORT, 'audit_event is append-only'); END""",
)
_POSTGRES_TRIGGERS = (
    """CREATE FUNCTION audit_event_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN RAISE EXCEPTION 'audit_event is append-only' USING ERRCODE = '42501'; END $$""",
    """CREATE TRIGGER audit_event_append_only BEFORE UPDATE OR DELETE ON audit_event
       FOR EACH ROW EXECUTE FUNCTION audit_event_append_only()""",
    """CREATE TRIGGER audit_event_no_truncate BEFORE TRUNCATE ON audit_event
       FOR EACH STATEMENT EXECUTE FUNCTION audit_event_append_only()""",
)

_events = sa.table(
    "audit_event",
    sa.column("id", sa.BigInteger()),
    sa.column("created_at", UTCDateTime()),
    sa.column("actor", sa.String()),
    sa.column("actor_key_id", sa.Uuid()),
    sa.column("action", sa.String()),
    sa.column("target_type", sa.String()),
    sa.column("target_id", sa.String()),
    sa.column("tenant_id", sa.Uuid()),
    sa.column("remote_addr", sa.String()),
    sa.column("user_agent", sa.String()),
    sa.column("request_id", sa.String()),
    sa.column("detail", sa.JSON()),
    sa.column("prev_hash", sa.String()),
    sa.column("hash", sa.String()),
)


def _hash(row: sa.Row, prev_hash: str) -> str:
    # The canonical form of auth.audit at this revision, frozen here so that the migration
    # chains old events the same way whatever later code does.
    document = {
        "id": row.id,
        "created_at": row.created_at.astimezone(UTC).isoformat(timespec="microseconds"),
        "actor": row.actor,
        "actor_key_id": str(row.actor_key_id) if row.actor_key_id else None,
        "action": row.action,
        "target_type": row.target_type,
        "target_id": row.target_id,
        "tenant_id": str(row.tenant_id) if row.tenant_id else None,
        "remote_addr": row.remote_addr,
        "user_agent": row.user_agent,
        "request_id": row.request_id,
        "detail": row.detail,
        "prev_hash": prev_hash,
    }
    canonical = json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _chain_existing_events() -> int:
    """Renumber existing events 1..n in id order, chain them, and return n."""
    bind = op.get_bind()
    ids = [row.id for row in bind.execute(sa.select(_events.c.id).order_by(_events.c.id))]
    # Old ids may have gaps (a rolled-back insert consumed a sequence value): positions may not.
    # Shifted out of the way first so that no renumbering collides with an existing id.
    offset = (max(ids) if ids else 0) + 1
    for position, old_id in enumerate(ids, start=1):
        bind.execute(_events.update().where(_events.c.id == old_id).values(id=offset + position))
    bind.execute(_events.update().values(id=_events.c.id - offset))
    previous = GENESIS_HASH
    for row in bind.execute(sa.select(_events).order_by(_events.c.id)).all():
        digest = _hash(row, previous)
        bind.execute(
            _events.update().where(_events.c.id == row.id).values(prev_hash=previous, hash=digest)
        )
        previous = digest
    head = sa.table(
        "audit_chain_head",
        sa.column("id", sa.SmallInteger()),
        sa.column("last_event_id", sa.BigInteger()),
        sa.column("last_hash", sa.String()),
    )
    bind.execute(head.insert().values(id=1, last_event_id=len(ids), last_hash=previous))
    return len(ids)


def upgrade() -> None:
    op.create_table(
        "audit_chain_head",
        sa.Column("id", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("last_event_id", sa.BigInteger(), nullable=False),
        sa.Column("last_hash", sa.String(length=64), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_audit_chain_head_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_chain_head")),
    )
    op.create_table(
        "access_token",
        sa.Column("jti", sa.Uuid(), nullable=False),
        sa.Column("subject", sa.String(length=80), nullable=False),
        sa.Column("grant_type", sa.String(length=32), nullable=False),
        sa.Column("api_key_id", sa.Uuid(), nullable=True),
        sa.Column("admin_principal_id", sa.Uuid(), nullable=True),
        sa.Column("tenant_id", sa.Uuid(), nullable=True),
        sa.Column("scopes", sa.String(length=200), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("client_addr", sa.String(length=64), nullable=True),
        sa.CheckConstraint(
            "(api_key_id IS NULL) <> (admin_principal_id IS NULL)",
            name=op.f("ck_access_token_exactly_one_source"),
        ),
        sa.ForeignKeyConstraint(
            ["admin_principal_id"],
            ["admin_principal.id"],
            name=op.f("fk_access_token_admin_principal_id_admin_principal"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["api_key_id"],
            ["api_key.id"],
            name=op.f("fk_access_token_api_key_id_api_key"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenant.id"],
            name=op.f("fk_access_token_tenant_id_tenant"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("jti", name=op.f("pk_access_token")),
    )
    with op.batch_alter_table("access_token", schema=None) as batch_op:
        for column in ("admin_principal_id", "api_key_id", "expires_at", "tenant_id"):
            batch_op.create_index(batch_op.f(f"ix_access_token_{column}"), [column], unique=False)

    with op.batch_alter_table("admin_principal", schema=None) as batch_op:
        batch_op.add_column(sa.Column("password_hash", sa.String(length=255), nullable=True))
        batch_op.add_column(
            sa.Column("password_changed_at", sa.DateTime(timezone=True), nullable=True)
        )

    with op.batch_alter_table("api_key", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("rotated_from_id", sa.Uuid(), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_api_key_rotated_from_id_api_key"),
            "api_key",
            ["rotated_from_id"],
            ["id"],
            ondelete="SET NULL",
        )

    with op.batch_alter_table("audit_event", schema=None) as batch_op:
        batch_op.add_column(sa.Column("user_agent", sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column("request_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("hash", sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f("ix_audit_event_action"), ["action"], unique=False)
    _chain_existing_events()
    with op.batch_alter_table("audit_event", schema=None) as batch_op:
        batch_op.alter_column("prev_hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column("hash", existing_type=sa.String(length=64), nullable=False)
    # Last: SQLite's batch mode rebuilds the table, which would drop a trigger made earlier.
    triggers = _SQLITE_TRIGGERS if op.get_bind().dialect.name == "sqlite" else _POSTGRES_TRIGGERS
    for statement in triggers:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_event_no_update")
        op.execute("DROP TRIGGER IF EXISTS audit_event_no_delete")
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_event_no_truncate ON audit_event")
        op.execute("DROP TRIGGER IF EXISTS audit_event_append_only ON audit_event")
        op.execute("DROP FUNCTION IF EXISTS audit_event_append_only()")
    with op.batch_alter_table("audit_event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_event_action"))
        batch_op.drop_column("hash")
        batch_op.drop_column("prev_hash")
        batch_op.drop_column("request_id")
        batch_op.drop_column("user_agent")

    with op.batch_alter_table("api_key", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_api_key_rotated_from_id_api_key"), type_="foreignkey"
        )
        batch_op.drop_column("rotated_from_id")
        batch_op.drop_column("last_used_at")

    with op.batch_alter_table("admin_principal", schema=None) as batch_op:
        batch_op.drop_column("password_changed_at")
        batch_op.drop_column("password_hash")

    with op.batch_alter_table("access_token", schema=None) as batch_op:
        for column in ("tenant_id", "expires_at", "api_key_id", "admin_principal_id"):
            batch_op.drop_index(batch_op.f(f"ix_access_token_{column}"))
    op.drop_table("access_token")
    op.drop_table("audit_chain_head")
