"""Quoted workloads: several queries priced together, run later with one all-or-nothing debit.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the quotes table."""
    op.create_table(
        "quotes",
        sa.Column("quote_id", sa.String(length=40), primary_key=True),
        sa.Column(
            "agreement_id",
            sa.String(length=40),
            sa.ForeignKey("agreements.agreement_id"),
            nullable=False,
        ),
        sa.Column("analyst_id", sa.String(length=40), nullable=False),
        sa.Column("measure", sa.String(length=8), nullable=False),
        sa.Column("total_micros", sa.BigInteger(), nullable=False),
        sa.Column("delta_units", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.String(length=32), nullable=False),
        sa.Column("expires_at", sa.String(length=32), nullable=False),
        sa.Column("document_json", sa.Text(), nullable=False),
        sa.Column("used_at", sa.String(length=32), nullable=False, server_default=""),
    )
    op.create_index("ix_quotes_agreement_id", "quotes", ["agreement_id"])


def downgrade() -> None:
    """Drop it."""
    op.drop_index("ix_quotes_agreement_id", table_name="quotes")
    op.drop_table("quotes")
