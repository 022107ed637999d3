"""SQL implementation of the Store port (SQLite by default, PostgreSQL in production)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from sqlalchemy.engine import Connection, Engine

from entremise.server.domain.audit import GENESIS, ChainedEntry
from entremise.server.domain.codec import (
    release_payload,
    results_from_list,
    schema_from_dict,
    schema_to_dict,
    summary_from_dict,
)
from entremise.server.domain.errors import AlreadyExistsError, BudgetExhaustedError, NotFoundError
from entremise.server.domain.models import (
    DELTA_UNITS,
    Agreement,
    AgreementStatus,
    AnalystSpend,
    AuditEvent,
    BudgetKind,
    BudgetState,
    Dataset,
    DatasetSlot,
    DuplicateReport,
    Principal,
    PublicKeyRecord,
    Release,
    Role,
    WrappedKey,
)
from entremise.server.domain.ports import Store

metadata = sa.MetaData()
MIGRATIONS = Path(__file__).parent / "migrations"

principals = sa.Table(
    "principals",
    metadata,
    sa.Column("principal_id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("role", sa.String(20), nullable=False),
    sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
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
)


# One row: the chain's head. Updating it conditionally serialises appends on every database.
audit_head = sa.Table(
    "audit_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)


def create_engine(url: str) -> Engine:
    """An engine with SQLite made safe for a multi-threaded server (WAL, busy timeout, FKs)."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            # pysqlite must not emit its own BEGIN (SQLAlchemy's pysqlite transaction recipe).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @sa.event.listens_for(engine, "begin")
        def _begin_immediate(conn: Connection) -> None:
            # Writers take the lock at BEGIN so concurrent debits queue instead of failing midway;
            # readers stay deferred and run concurrently under WAL.
            immediate = conn.get_execution_options().get("immediate", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    # An unreachable server fails in seconds, not after the TCP timeout.
    connect_args = {"connect_timeout": 10} if url.startswith("postgresql") else {}
    return sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def _agreement(row: Any) -> Agreement:
    loss = BudgetKind(row.budget_kind).loss_type  # amounts count in the agreement's measure
    return Agreement(
        agreement_id=row.agreement_id,
        name=row.name,
        purpose=row.purpose,
        slots=tuple(DatasetSlot(s["partner_id"], s["name"]) for s in json.loads(row.slots_json)),
        analyst_ids=tuple(json.loads(row.analyst_ids_json)),
        total_epsilon=loss(row.total_micros),
        max_rows_per_person=row.max_rows_per_person,
        max_groups_per_person=row.max_groups_per_person,
        created_at=row.created_at,
        budget_kind=BudgetKind(row.budget_kind),
        total_delta_units=row.total_delta_units,
        analyst_budget=loss(row.analyst_cap_micros) if row.analyst_cap_micros is not None else None,
        status=AgreementStatus(row.status),
        approved_by=tuple(json.loads(row.approved_by_json)),
        proposer_id=row.proposer_id,
        expires_at=row.expires_at,
        allowed_columns=tuple(json.loads(row.scope_json).get("columns", [])),
        allowed_aggregations=tuple(json.loads(row.scope_json).get("aggregations", [])),
        min_group_size=int(json.loads(row.scope_json).get("min_group_size", 0)),
        # Agreements made before the relation was stated get the default relation.
        max_shared_identifiers=int(json.loads(row.scope_json).get("max_shared_identifiers", 1)),
    )


def _dataset(row: Any) -> Dataset:
    return Dataset(
        dataset_id=row.dataset_id,
        name=row.name,
        partner_id=row.partner_id,
        agreement_id=row.agreement_id,
        schema=schema_from_dict(json.loads(row.schema_json)),
        row_count=row.row_count,
        distinct_keys=row.distinct_keys,
        version=row.version,
        content_sha256=row.content_sha256,
        created_at=row.created_at,
        key_fingerprint=row.key_fingerprint,
        max_rows_per_key=row.max_rows_per_key,
        duplicates=tuple(DuplicateReport(**d) for d in json.loads(row.duplicates_json)),
    )


def _storable(*values: str | None) -> bool:
    """Whether lookup keys can exist here at all (PostgreSQL text cannot hold NUL)."""
    return all(v is None or "\x00" not in v for v in values)


def _release(row: Any) -> Release:
    payload = json.loads(row.payload_json)
    summary = summary_from_dict(payload["summary"])  # its measure types the amounts
    return Release(
        release_id=row.release_id,
        agreement_id=row.agreement_id,
        analyst_id=row.analyst_id,
        summary=summary,
        results=results_from_list(payload["results"]),
        epsilon_spent=type(summary.epsilon)(row.epsilon_micros),
        created_at=row.created_at,
        data_versions=tuple(json.loads(row.data_versions_json)),
        query_fingerprint=row.query_fingerprint,
        replay_key=row.replay_key,
        delta_units=row.delta_units,
        status=row.status,
    )


def _budget(row: Any, analysts: tuple[AnalystSpend, ...] = ()) -> BudgetState:
    loss = BudgetKind(row.budget_kind).loss_type
    return BudgetState(
        row.agreement_id,
        loss(row.total_micros),
        loss(row.spent_micros),
        row.release_count,
        BudgetKind(row.budget_kind),
        row.total_delta_units,
        row.spent_delta_units,
        analysts,
    )


class SqlStore(Store):
    """Store on any SQLAlchemy URL: ``sqlite:///hub.db`` or ``postgresql+psycopg://...``."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        self.engine = create_engine(url)
        self.writer = self.engine.execution_options(immediate=True)
        if create:
            self.upgrade()

    def upgrade(self) -> str:
        """Apply Alembic migrations up to head (idempotent); returns the revision."""
        config = AlembicConfig()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self.writer.begin() as conn:
            config.attributes["connection"] = conn
            alembic_command.upgrade(config, "head")
            revision = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
        return str(revision)

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()

    def create_principal(self, principal: Principal, token_sha256: str) -> None:  # noqa: D102
        with self.writer.begin() as conn:
            conn.execute(
                principals.insert().values(
                    principal_id=principal.principal_id,
                    name=principal.name,
                    role=principal.role.value,
                    token_sha256=token_sha256,
                )
            )

    def principal_by_token(self, token_sha256: str) -> Principal | None:  # noqa: D102
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(principals).where(principals.c.token_sha256 == token_sha256)
            ).first()
        return Principal(row.principal_id, row.name, Role(row.role)) if row else None

    def get_principal(self, principal_id: str) -> Principal | None:  # noqa: D102
        if not _storable(principal_id):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(principals).where(principals.c.principal_id == principal_id)
            ).first()
        return Principal(row.principal_id, row.name, Role(row.role)) if row else None

    def count_principals(self, role: Role | None = None) -> int:  # noqa: D102
        query = sa.select(sa.func.count()).select_from(principals)
        if role is not None:
            query = query.where(principals.c.role == role.value)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def find_upload(self, partner_id: str, request_id: str) -> tuple[str, int] | None:  # noqa: D102
        if not _storable(partner_id, request_id):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(upload_requests).where(
                    upload_requests.c.partner_id == partner_id,
                    upload_requests.c.request_id == request_id,
                )
            ).first()
        return (row.dataset_id, row.version) if row else None

    def stored_versions(self) -> set[tuple[str, int]]:  # noqa: D102
        with self.engine.connect() as conn:
            return {
                (r.dataset_id, r.version)
                for r in conn.execute(sa.select(datasets.c.dataset_id, datasets.c.version))
            }

    def publish_dataset(self, dataset: Dataset, request_id: str = "") -> None:  # noqa: D102
        values = {
            "partner_id": dataset.partner_id,
            "agreement_id": dataset.agreement_id,
            "name": dataset.name,
            "schema_json": json.dumps(schema_to_dict(dataset.schema)),
            "row_count": dataset.row_count,
            "distinct_keys": dataset.distinct_keys,
            "version": dataset.version,
            "content_sha256": dataset.content_sha256,
            "created_at": dataset.created_at,
            "key_fingerprint": dataset.key_fingerprint,
            "max_rows_per_key": dataset.max_rows_per_key,
            "duplicates_json": json.dumps([asdict(d) for d in dataset.duplicates]),
        }
        with self.writer.begin() as conn:
            if request_id:
                try:
                    with conn.begin_nested():
                        conn.execute(
                            upload_requests.insert().values(
                                partner_id=dataset.partner_id,
                                request_id=request_id,
                                dataset_id=dataset.dataset_id,
                                version=dataset.version,
                            )
                        )
                except sa.exc.IntegrityError:
                    raise AlreadyExistsError(
                        f"upload request {request_id!r} was already published"
                    ) from None
            if dataset.version == 1:
                try:
                    with conn.begin_nested():
                        conn.execute(
                            datasets.insert().values(dataset_id=dataset.dataset_id, **values)
                        )
                except sa.exc.IntegrityError:
                    raise AlreadyExistsError(
                        f"dataset {dataset.name!r} was uploaded concurrently; retry"
                    ) from None
                return
            updated = conn.execute(
                datasets.update()
                .where(
                    datasets.c.dataset_id == dataset.dataset_id,
                    datasets.c.version == dataset.version - 1,
                )
                .values(**values)
            )
            if updated.rowcount != 1:
                raise AlreadyExistsError(f"dataset {dataset.name!r} changed meanwhile; retry")

    def get_dataset(self, dataset_id: str) -> Dataset | None:  # noqa: D102
        if not _storable(dataset_id):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(datasets).where(datasets.c.dataset_id == dataset_id)
            ).first()
        return _dataset(row) if row else None

    def find_dataset(  # noqa: D102
        self, agreement_id: str, partner_id: str, name: str
    ) -> Dataset | None:
        if not _storable(agreement_id, partner_id, name):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(datasets).where(
                    datasets.c.agreement_id == agreement_id,
                    datasets.c.partner_id == partner_id,
                    datasets.c.name == name,
                )
            ).first()
        return _dataset(row) if row else None

    def list_datasets(  # noqa: D102
        self, partner_id: str | None = None, agreement_id: str | None = None
    ) -> list[Dataset]:
        if not _storable(partner_id, agreement_id):
            return []
        query = sa.select(datasets).order_by(datasets.c.created_at, datasets.c.dataset_id)
        if partner_id is not None:
            query = query.where(datasets.c.partner_id == partner_id)
        if agreement_id is not None:
            query = query.where(datasets.c.agreement_id == agreement_id)
        with self.engine.connect() as conn:
            return [_dataset(r) for r in conn.execute(query)]

    def delete_dataset(self, dataset_id: str) -> None:  # noqa: D102
        with self.writer.begin() as conn:
            deleted = conn.execute(datasets.delete().where(datasets.c.dataset_id == dataset_id))
        if deleted.rowcount != 1:
            raise NotFoundError(f"dataset {dataset_id!r} not found")

    def create_agreement(self, agreement: Agreement) -> None:  # noqa: D102
        with self.writer.begin() as conn:
            conn.execute(
                agreements.insert().values(
                    agreement_id=agreement.agreement_id,
                    name=agreement.name,
                    purpose=agreement.purpose,
                    slots_json=json.dumps([asdict(slot) for slot in agreement.slots]),
                    analyst_ids_json=json.dumps(list(agreement.analyst_ids)),
                    total_micros=agreement.total_epsilon.micros,
                    spent_micros=0,
                    release_count=0,
                    max_rows_per_person=agreement.max_rows_per_person,
                    max_groups_per_person=agreement.max_groups_per_person,
                    created_at=agreement.created_at,
                    budget_kind=agreement.budget_kind.value,
                    total_delta_units=agreement.total_delta_units,
                    spent_delta_units=0,
                    analyst_cap_micros=agreement.analyst_budget.micros
                    if agreement.analyst_budget is not None
                    else None,
                    status=agreement.status.value,
                    approved_by_json=json.dumps(list(agreement.approved_by)),
                    proposer_id=agreement.proposer_id,
                    expires_at=agreement.expires_at,
                    scope_json=json.dumps(
                        {
                            "columns": list(agreement.allowed_columns),
                            "aggregations": list(agreement.allowed_aggregations),
                            "min_group_size": agreement.min_group_size,
                            "max_shared_identifiers": agreement.max_shared_identifiers,
                        }
                    ),
                )
            )

    def update_agreement_state(  # noqa: D102
        self,
        agreement_id: str,
        expected: AgreementStatus,
        status: AgreementStatus,
        approved_by: tuple[str, ...],
        *,
        expected_approved_by: tuple[str, ...],
    ) -> bool:
        with self.writer.begin() as conn:
            updated = conn.execute(
                agreements.update()
                .where(
                    agreements.c.agreement_id == agreement_id,
                    agreements.c.status == expected.value,
                    agreements.c.approved_by_json == json.dumps(list(expected_approved_by)),
                )
                .values(status=status.value, approved_by_json=json.dumps(list(approved_by)))
            )
        return updated.rowcount == 1

    def get_agreement(self, agreement_id: str) -> Agreement | None:  # noqa: D102
        if not _storable(agreement_id):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(agreements).where(agreements.c.agreement_id == agreement_id)
            ).first()
        return _agreement(row) if row else None

    def list_agreements(self) -> list[Agreement]:  # noqa: D102
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(agreements).order_by(agreements.c.created_at, agreements.c.agreement_id)
            )
            return [_agreement(r) for r in rows]

    def get_budget(self, agreement_id: str) -> BudgetState | None:  # noqa: D102
        with self.engine.connect() as conn:
            return self._budget_in(conn, agreement_id)

    def _budget_in(self, conn: Connection, agreement_id: str) -> BudgetState | None:
        if not _storable(agreement_id):
            return None
        row = conn.execute(
            sa.select(agreements).where(agreements.c.agreement_id == agreement_id)
        ).first()
        if row is None:
            return None
        loss = BudgetKind(row.budget_kind).loss_type
        cap = loss(
            row.analyst_cap_micros if row.analyst_cap_micros is not None else row.total_micros
        )
        spends = tuple(
            AnalystSpend(r.analyst_id, loss(r.spent_micros), cap)
            for r in conn.execute(
                sa.select(analyst_spend)
                .where(analyst_spend.c.agreement_id == agreement_id)
                .order_by(analyst_spend.c.analyst_id)
            )
        )
        return _budget(row, spends)

    def reserve_release(self, release: Release) -> BudgetState:  # noqa: D102
        cost = release.epsilon_spent.micros
        delta = release.delta_units
        with self.writer.begin() as conn:
            # Conditional debits: each WHERE clause is re-checked under the row lock, so two
            # concurrent releases can never both pass when only one fits. The agreement and the
            # analyst are debited in this one transaction, with the release row itself.
            debited = conn.execute(
                agreements.update()
                .where(
                    agreements.c.agreement_id == release.agreement_id,
                    agreements.c.spent_micros + cost <= agreements.c.total_micros,
                    agreements.c.spent_delta_units + delta <= agreements.c.total_delta_units,
                )
                .values(
                    spent_micros=agreements.c.spent_micros + cost,
                    spent_delta_units=agreements.c.spent_delta_units + delta,
                    release_count=agreements.c.release_count + 1,
                )
            )
            if debited.rowcount != 1:
                state = self._budget_in(conn, release.agreement_id)
                if state is None:
                    raise NotFoundError(f"agreement {release.agreement_id!r} not found")
                if state.spent_delta_units + delta > state.total_delta_units:
                    left = state.total_delta_units - state.spent_delta_units
                    raise BudgetExhaustedError(
                        requested=f"delta {delta / DELTA_UNITS:g}",
                        remaining=f"delta {left / DELTA_UNITS:g}",
                    )
                raise BudgetExhaustedError(
                    requested=str(release.epsilon_spent), remaining=str(state.remaining)
                )
            row = conn.execute(
                sa.select(agreements).where(agreements.c.agreement_id == release.agreement_id)
            ).one()
            cap = row.analyst_cap_micros if row.analyst_cap_micros is not None else row.total_micros
            exists = conn.execute(
                sa.select(analyst_spend.c.spent_micros).where(
                    analyst_spend.c.agreement_id == release.agreement_id,
                    analyst_spend.c.analyst_id == release.analyst_id,
                )
            ).first()
            if exists is None:
                try:
                    with conn.begin_nested():
                        conn.execute(
                            analyst_spend.insert().values(
                                agreement_id=release.agreement_id,
                                analyst_id=release.analyst_id,
                                spent_micros=0,
                            )
                        )
                except sa.exc.IntegrityError:
                    pass  # a concurrent release of the same analyst created it first
            analyst_debit = conn.execute(
                analyst_spend.update()
                .where(
                    analyst_spend.c.agreement_id == release.agreement_id,
                    analyst_spend.c.analyst_id == release.analyst_id,
                    analyst_spend.c.spent_micros + cost <= cap,
                )
                .values(spent_micros=analyst_spend.c.spent_micros + cost)
            )
            if analyst_debit.rowcount != 1:
                spent = conn.execute(
                    sa.select(analyst_spend.c.spent_micros).where(
                        analyst_spend.c.agreement_id == release.agreement_id,
                        analyst_spend.c.analyst_id == release.analyst_id,
                    )
                ).scalar_one()
                # Raising rolls the whole transaction back: the agreement debit too.
                raise BudgetExhaustedError(
                    requested=str(release.epsilon_spent),
                    remaining=f"{type(release.epsilon_spent)(cap - spent)} for this analyst",
                )
            conn.execute(
                releases.insert().values(
                    release_id=release.release_id,
                    agreement_id=release.agreement_id,
                    analyst_id=release.analyst_id,
                    epsilon_micros=cost,
                    created_at=release.created_at,
                    data_versions_json=json.dumps(list(release.data_versions)),
                    query_fingerprint=release.query_fingerprint,
                    payload_json=json.dumps(release_payload(release)),
                    replay_key=release.replay_key,
                    delta_units=delta,
                    status=release.status,
                )
            )
            state = self._budget_in(conn, release.agreement_id)
            assert state is not None
            return state

    def finish_release(self, release: Release) -> None:  # noqa: D102
        with self.writer.begin() as conn:
            conn.execute(
                releases.update()
                .where(releases.c.release_id == release.release_id)
                .values(
                    payload_json=json.dumps(release_payload(release)),
                    replay_key=release.replay_key,
                    status=release.status,
                )
            )

    def fail_unfinished_releases(self) -> int:  # noqa: D102
        with self.writer.begin() as conn:
            done = conn.execute(
                releases.update().where(releases.c.status == "running").values(status="failed")
            )
            return int(done.rowcount or 0)

    def find_replay(self, agreement_id: str, replay_key: str) -> Release | None:  # noqa: D102
        if not _storable(agreement_id, replay_key):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(releases)
                .where(
                    releases.c.agreement_id == agreement_id,
                    releases.c.replay_key == replay_key,
                    releases.c.status == "released",
                )
                .order_by(releases.c.seq)
                .limit(1)
            ).first()
        return _release(row) if row else None

    def list_releases(self, agreement_id: str | None = None) -> list[Release]:  # noqa: D102
        if not _storable(agreement_id):
            return []
        query = sa.select(releases).order_by(releases.c.seq)
        if agreement_id is not None:
            query = query.where(releases.c.agreement_id == agreement_id)
        with self.engine.connect() as conn:
            return [_release(row) for row in conn.execute(query)]

    # -- keys ---------------------------------------------------------------------------------

    def publish_public_key(  # noqa: D102
        self, principal_id: str, public_key: bytes, created_at: str
    ) -> PublicKeyRecord:
        with self.writer.begin() as conn:
            latest = conn.execute(
                sa.select(sa.func.max(public_keys.c.version)).where(
                    public_keys.c.principal_id == principal_id
                )
            ).scalar_one()
            version = (latest or 0) + 1
            conn.execute(
                public_keys.insert().values(
                    principal_id=principal_id,
                    version=version,
                    public_key=public_key,
                    created_at=created_at,
                )
            )
        return PublicKeyRecord(principal_id, version, public_key, created_at)

    def current_public_key(self, principal_id: str) -> PublicKeyRecord | None:  # noqa: D102
        if not _storable(principal_id):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(public_keys)
                .where(public_keys.c.principal_id == principal_id)
                .order_by(public_keys.c.version.desc())
                .limit(1)
            ).first()
        if row is None:
            return None
        return PublicKeyRecord(row.principal_id, row.version, bytes(row.public_key), row.created_at)

    def store_wrapped_keys(  # noqa: D102
        self, agreement_id: str, fingerprint: str, keys: list[WrappedKey]
    ) -> int:
        with self.writer.begin() as conn:
            existing = conn.execute(
                sa.select(sa.func.count())
                .select_from(wrapped_keys)
                .where(
                    wrapped_keys.c.agreement_id == agreement_id,
                    wrapped_keys.c.key_fingerprint == fingerprint,
                )
            ).scalar_one()
            if existing:
                raise AlreadyExistsError(
                    "the matching key of this key context was already distributed"
                )
            for key in keys:
                conn.execute(
                    wrapped_keys.insert().values(
                        agreement_id=agreement_id,
                        key_fingerprint=fingerprint,
                        recipient_id=key.recipient_id,
                        nonce=key.nonce,
                        ciphertext=key.ciphertext,
                    )
                )
        return len(keys)

    def wrapped_key(  # noqa: D102
        self, agreement_id: str, fingerprint: str, recipient_id: str
    ) -> WrappedKey | None:
        if not _storable(agreement_id, fingerprint, recipient_id):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(wrapped_keys).where(
                    wrapped_keys.c.agreement_id == agreement_id,
                    wrapped_keys.c.key_fingerprint == fingerprint,
                    wrapped_keys.c.recipient_id == recipient_id,
                )
            ).first()
        return (
            WrappedKey(row.recipient_id, bytes(row.nonce), bytes(row.ciphertext)) if row else None
        )

    # -- consent ------------------------------------------------------------------------------

    def record_withdrawals(  # noqa: D102
        self, agreement_id: str, partner_id: str, pseudonyms: list[str], created_at: str
    ) -> int:
        unique = sorted(set(pseudonyms))
        with self.writer.begin() as conn:
            known = {
                r.pseudonym
                for r in conn.execute(
                    sa.select(withdrawals.c.pseudonym).where(
                        withdrawals.c.agreement_id == agreement_id,
                        withdrawals.c.partner_id == partner_id,
                        withdrawals.c.pseudonym.in_(unique),
                    )
                )
            }
            new = [p for p in unique if p not in known]
            if new:
                conn.execute(
                    withdrawals.insert(),
                    [
                        {
                            "agreement_id": agreement_id,
                            "partner_id": partner_id,
                            "pseudonym": p,
                            "created_at": created_at,
                        }
                        for p in new
                    ],
                )
        return len(new)

    def withdrawn(self, agreement_id: str) -> dict[str, list[str]]:  # noqa: D102
        if not _storable(agreement_id):
            return {}
        out: dict[str, list[str]] = {}
        with self.engine.connect() as conn:
            for row in conn.execute(
                sa.select(withdrawals.c.partner_id, withdrawals.c.pseudonym).where(
                    withdrawals.c.agreement_id == agreement_id
                )
            ):
                out.setdefault(row.partner_id, []).append(row.pseudonym)
        return out

    # -- audit --------------------------------------------------------------------------------

    def append_audit(  # noqa: D102
        self, event: AuditEvent, seal: Callable[[int, str], tuple[str, str]]
    ) -> ChainedEntry:
        for _ in range(50):
            with self.writer.begin() as conn:
                head = conn.execute(sa.select(audit_head).where(audit_head.c.id == 1)).first()
                if head is None:
                    try:
                        with conn.begin_nested():
                            conn.execute(audit_head.insert().values(id=1, seq=0, hash=GENESIS))
                    except sa.exc.IntegrityError:
                        pass
                    continue
                seq, prev = head.seq + 1, head.hash
                digest, signature = seal(seq, prev)
                moved = conn.execute(
                    audit_head.update()
                    .where(audit_head.c.id == 1, audit_head.c.seq == head.seq)
                    .values(seq=seq, hash=digest)
                )
                if moved.rowcount != 1:
                    continue  # another append won; retry on the new head
                conn.execute(
                    audit_events.insert().values(
                        seq=seq,
                        kind=event.kind,
                        actor_id=event.actor_id,
                        subject_id=event.subject_id,
                        detail_json=json.dumps(event.detail, sort_keys=True),
                        created_at=event.created_at,
                        prev_hash=prev,
                        hash=digest,
                        signature=signature,
                    )
                )
                return ChainedEntry(
                    seq,
                    event.kind,
                    event.actor_id,
                    event.subject_id,
                    event.detail,
                    event.created_at,
                    prev,
                    digest,
                    signature,
                )
        raise RuntimeError("could not append to the audit log under contention")

    def list_audit(self) -> list[ChainedEntry]:  # noqa: D102
        with self.engine.connect() as conn:
            return [
                ChainedEntry(
                    r.seq,
                    r.kind,
                    r.actor_id,
                    r.subject_id,
                    json.loads(r.detail_json),
                    r.created_at,
                    r.prev_hash,
                    r.hash,
                    r.signature,
                )
                for r in conn.execute(sa.select(audit_events).order_by(audit_events.c.seq))
            ]
