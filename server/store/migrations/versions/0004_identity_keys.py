"""Partner identity keys: each public key carries its owner's identity key and signature.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the identity key and signature to public keys, and the leader's signature to
    wrapped keys (nullable: keys published before this are served unsigned, and partners'
    clients refuse them until republished)."""
    with op.batch_alter_table("public_keys") as batch:
        batch.add_column(sa.Column("identity_public_key", sa.LargeBinary(32), nullable=True))
        batch.add_column(sa.Column("signature", sa.LargeBinary(64), nullable=True))
    with op.batch_alter_table("wrapped_keys") as batch:
        batch.add_column(sa.Column("signature", sa.LargeBinary(64), nullable=True))


def downgrade() -> None:
    """Drop them."""
    with op.batch_alter_table("wrapped_keys") as batch:
        batch.drop_column("signature")
    with op.batch_alter_table("public_keys") as batch:
        batch.drop_column("signature")
        batch.drop_column("identity_public_key")
