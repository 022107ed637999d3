"""Release status: the budget is debited before data is read; a release is then finished.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add releases.status (running, released or failed); existing releases were released."""
    with op.batch_alter_table("releases") as batch:
        batch.add_column(
            sa.Column("status", sa.String(length=12), nullable=False, server_default="released")
        )


def downgrade() -> None:
    """Drop it."""
    with op.batch_alter_table("releases") as batch:
        batch.drop_column("status")
