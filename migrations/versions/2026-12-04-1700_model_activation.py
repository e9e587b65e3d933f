"""The active version of each model, as an operator activated it, read by every worker.

Revision ID: 9a2e5c7f1b34
Revises: 7d41e9a0c3b2
Create Date: 2026-12-04 17:00:00+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "9a2e5c7f1b34"
down_revision: str | None = "7d41e9a0c3b2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_activation",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=16), nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("activated_by", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_model_activation")),
    )


def downgrade() -> None:
    op.drop_table("model_activation")
