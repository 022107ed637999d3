"""Token revocation and rotation: principals.revoked_at and the retired token hashes.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add principals.revoked_at (null: active) and the retired_tokens table."""
    with op.batch_alter_table("principals") as batch:
        batch.add_column(sa.Column("revoked_at", sa.String(length=32), nullable=True))
    op.create_table(
        "retired_tokens",
        sa.Column("token_sha256", sa.String(length=64), primary_key=True),
        sa.Column(
            "principal_id",
            sa.String(length=40),
            sa.ForeignKey("principals.principal_id"),
            nullable=False,
        ),
        sa.Column("retired_at", sa.String(length=32), nullable=False),
    )


def downgrade() -> None:
    """Drop them."""
    op.drop_table("retired_tokens")
    with op.batch_alter_table("principals") as batch:
        batch.drop_column("revoked_at")
