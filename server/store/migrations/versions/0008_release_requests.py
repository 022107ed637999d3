"""Release request ids: a client retrying a release by its request id gets it, uncharged.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add releases.request_id, unique per analyst where set."""
    with op.batch_alter_table("releases") as batch:
        batch.add_column(
            sa.Column("request_id", sa.String(length=64), nullable=False, server_default="")
        )
    op.create_index(
        "ux_releases_analyst_request",
        "releases",
        ["analyst_id", "request_id"],
        unique=True,
        sqlite_where=sa.text("request_id != ''"),
        postgresql_where=sa.text("request_id != ''"),
    )


def downgrade() -> None:
    """Drop them."""
    op.drop_index("ux_releases_analyst_request", table_name="releases")
    with op.batch_alter_table("releases") as batch:
        batch.drop_column("request_id")
