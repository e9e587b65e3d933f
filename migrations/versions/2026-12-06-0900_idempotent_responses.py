"""Stored answers of requests sent with an Idempotency-Key, written with their usage records.

Revision ID: e63f9a4c1d32
Revises: d52e8f3b0c21
Create Date: 2026-12-06 09:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e63f9a4c1d32"
down_revision: str | None = "d52e8f3b0c21"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "idempotent_response",
        sa.Column("scope", sa.LargeBinary(length=32), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("api_key_id", sa.Uuid(), nullable=False),
        sa.Column("fingerprint", sa.LargeBinary(length=32), nullable=False),
        sa.Column("status_code", sa.SmallInteger(), nullable=False),
        sa.Column("headers", sa.Text(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("scope", name=op.f("pk_idempotent_response")),
    )
    with op.batch_alter_table("idempotent_response", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_idempotent_response_expires_at"), ["expires_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("idempotent_response", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_idempotent_response_expires_at"))
    op.drop_table("idempotent_response")
