"""The metadata schema: every table the SQL store reads and writes (Alembic migrates to it)."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

principals = sa.Table(
    "principals",
    metadata,
    sa.Column("principal_id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("role", sa.String(20), nullable=False),
    sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
    # Set when an admin revokes the principal's credentials (token and certificate identity).
    sa.Column("revoked_at", sa.String(32), nullable=True),
    # A compliance officer scoped to one partner's view (NULL = hub-wide).
    sa.Column("scope_partner_id", sa.String(40), nullable=True),
)

# Token hashes replaced by a rotation: never valid again, and never re-registered at start.
retired_tokens = sa.Table(
    "retired_tokens",
    metadata,
    sa.Column("token_sha256", sa.String(64), primary_key=True),
    sa.Column(
        "principal_id", sa.String(40), sa.ForeignKey("principals.principal_id"), nullable=False
    ),
    sa.Column("retired_at", sa.String(32), nullable=False),
)

agreements = sa.Table(
    "agreements",
    metadata,
    sa.Column("agreement_id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("purpose", sa.String(63), nullable=False),
    sa.Column("slots_json", sa.Text, nullable=False),
    sa.Column("analyst_ids_json", sa.Text, nullable=False),
    # Epsilon in integer micro-units: exact comparisons in the conditional debit.
    sa.Column("total_micros", sa.BigInteger, nullable=False),
    sa.Column("spent_micros", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("release_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_rows_per_person", sa.Integer, nullable=False),
    sa.Column("max_groups_per_person", sa.Integer, nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("budget_kind", sa.String(8), nullable=False, server_default="pure"),
    # Delta (key discovery) in exact units of 1e-15.
    sa.Column("total_delta_units", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("spent_delta_units", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("analyst_cap_micros", sa.BigInteger, nullable=True),
    sa.Column("status", sa.String(12), nullable=False, server_default="proposed"),
    sa.Column("approved_by_json", sa.Text, nullable=False, server_default="[]"),
    sa.Column("proposer_id", sa.String(40), nullable=False, server_default=""),
    sa.Column("expires_at", sa.String(32), nullable=False, server_default=""),
    sa.Column("scope_json", sa.Text, nullable=False, server_default="{}"),
    sa.CheckConstraint("spent_micros >= 0 AND spent_micros <= total_micros", name="ck_budget"),
    sa.CheckConstraint("spent_delta_units <= total_delta_units", name="ck_delta"),
)

analyst_spend = sa.Table(
    "analyst_spend",
    metadata,
    sa.Column(
        "agreement_id", sa.String(40), sa.ForeignKey("agreements.agreement_id"), primary_key=True
    ),
    sa.Column("analyst_id", sa.String(40), primary_key=True),
    sa.Column("spent_micros", sa.BigInteger, nullable=False, server_default="0"),
)

datasets = sa.Table(
    "datasets",
    metadata,
    sa.Column("dataset_id", sa.String(40), primary_key=True),
    sa.Column(
        "partner_id", sa.String(40), sa.ForeignKey("principals.principal_id"), nullable=False
    ),
    sa.Column(
        "agreement_id", sa.String(40), sa.ForeignKey("agreements.agreement_id"), nullable=False
    ),
    sa.Column("name", sa.String(63), nullable=False),
    sa.Column("schema_json", sa.Text, nullable=False),
    sa.Column("row_count", sa.BigInteger, nullable=False),
    sa.Column("distinct_keys", sa.BigInteger, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("content_sha256", sa.String(64), nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("key_fingerprint", sa.String(64), nullable=False),
    sa.Column("max_rows_per_key", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("duplicates_json", sa.Text, nullable=False, server_default="[]"),
    sa.UniqueConstraint("agreement_id", "partner_id", "name", name="uq_datasets_slot"),
)

upload_requests = sa.Table(
    "upload_requests",
    metadata,
    sa.Column("partner_id", sa.String(40), primary_key=True),
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("dataset_id", sa.String(40), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
)

public_keys = sa.Table(
    "public_keys",
    metadata,
    sa.Column(
        "principal_id", sa.String(40), sa.ForeignKey("principals.principal_id"), primary_key=True
    ),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("public_key", sa.LargeBinary(32), nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("identity_public_key", sa.LargeBinary(32), nullable=True),
    sa.Column("signature", sa.LargeBinary(64), nullable=True),
)

wrapped_keys = sa.Table(
    "wrapped_keys",
    metadata,
    sa.Column(
        "agreement_id", sa.String(40), sa.ForeignKey("agreements.agreement_id"), primary_key=True
    ),
    sa.Column("key_fingerprint", sa.String(64), primary_key=True),
    sa.Column("recipient_id", sa.String(40), primary_key=True),
    sa.Column("nonce", sa.LargeBinary(12), nullable=False),
    sa.Column("ciphertext", sa.LargeBinary(64), nullable=False),
    sa.Column("signature", sa.LargeBinary(64), nullable=True),
)

withdrawals = sa.Table(
    "withdrawals",
    metadata,
    sa.Column(
        "agreement_id", sa.String(40), sa.ForeignKey("agreements.agreement_id"), primary_key=True
    ),
    sa.Column("partner_id", sa.String(40), primary_key=True),
    sa.Column("pseudonym", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.String(32), nullable=False),
)

audit_events = sa.Table(
    "audit_events",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("kind", sa.String(40), nullable=False),
    sa.Column("actor_id", sa.String(40), nullable=False),
    sa.Column("subject_id", sa.String(40), nullable=False),
    sa.Column("detail_json", sa.Text, nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("signature", sa.String(128), nullable=False),
)

releases = sa.Table(
    "releases",
    metadata,
    sa.Column("seq", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("release_id", sa.String(40), nullable=False, unique=True),
    sa.Column(
        "agreement_id",
        sa.String(40),
        sa.ForeignKey("agreements.agreement_id"),
        nullable=False,
        index=True,
    ),
    sa.Column("analyst_id", sa.String(40), nullable=False),
    sa.Column("epsilon_micros", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("data_versions_json", sa.Text, nullable=False),
    sa.Column("query_fingerprint", sa.String(64), nullable=False),
    sa.Column("payload_json", sa.Text, nullable=False),
    sa.Column("replay_key", sa.String(64), nullable=False, server_default="", index=True),
    sa.Column("delta_units", sa.BigInteger, nullable=False, server_default="0"),
    # running (debited, computing), released, or failed (debited, never finished).
    sa.Column("status", sa.String(12), nullable=False, server_default="released"),
    # The analyst's own id for the request: a retry with it gets this release, never a debit.
    sa.Column("request_id", sa.String(64), nullable=False, server_default=""),
)
# One release per analyst and request id (releases without one are not constrained).
sa.Index(
    "ux_releases_analyst_request",
    releases.c.analyst_id,
    releases.c.request_id,
    unique=True,
    sqlite_where=releases.c.request_id != "",
    postgresql_where=releases.c.request_id != "",
)


# Priced workloads (`Quote`): spend nothing until run, once, by their analyst.
quotes = sa.Table(
    "quotes",
    metadata,
    sa.Column("quote_id", sa.String(40), primary_key=True),
    sa.Column(
        "agreement_id",
        sa.String(40),
        sa.ForeignKey("agreements.agreement_id"),
        nullable=False,
        index=True,
    ),
    sa.Column("analyst_id", sa.String(40), nullable=False),
    sa.Column("measure", sa.String(8), nullable=False),
    sa.Column("total_micros", sa.BigInteger, nullable=False),
    sa.Column("delta_units", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("expires_at", sa.String(32), nullable=False),
    sa.Column("document_json", sa.Text, nullable=False),
    # Empty until the workload is run; set in the transaction that debits it.
    sa.Column("used_at", sa.String(32), nullable=False, server_default=""),
)


# One row: the chain's head. Updating it conditionally serialises appends on every database.
audit_head = sa.Table(
    "audit_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)
