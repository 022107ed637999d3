"""Principal scope: a compliance officer may be scoped to one partner's view (a bank's DPO).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add principals.scope_partner_id (NULL = hub-wide, as every existing principal is)."""
    with op.batch_alter_table("principals") as batch:
        batch.add_column(sa.Column("scope_partner_id", sa.String(length=40), nullable=True))


def downgrade() -> None:
    """Drop it."""
    with op.batch_alter_table("principals") as batch:
        batch.drop_column("scope_partner_id")
