"""SQL implementation of the Store port (SQLite by default, PostgreSQL in production).

The schema is in `tables`, engines and migrations in `database`, row mapping in `rows`, and the
conditional debits of a release in `ledger`; this module is the Store itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from entremise.server.domain.audit import ChainedEntry
from entremise.server.domain.codec import release_payload
from entremise.server.domain.models import (
    Agreement,
    AgreementStatus,
    AuditEvent,
    BudgetState,
    Dataset,
    Principal,
    PublicKeyRecord,
    QueryContext,
    Quote,
    Release,
    Role,
    WrappedKey,
)
from entremise.server.domain.ports import Store
from entremise.server.store import chain, ledger, reads
from entremise.server.store.database import MIGRATIONS, create_engine, upgrade
from entremise.server.store.refusals import (
    already_exists,
    changed_meanwhile,
    keys_already_distributed,
    not_found,
    quote_already_run,
    request_already_published,
    uploaded_concurrently,
)
from entremise.server.store.rows import (
    agreement_from_row,
    agreement_values,
    audit_from_row,
    dataset_from_row,
    dataset_values,
    principal_from_row,
    public_key_from_row,
    quote_from_row,
    quote_values,
    release_from_row,
    storable,
    wrapped_key_from_row,
)
from entremise.server.store.tables import (
    agreements,
    analyst_spend,
    audit_events,
    audit_head,
    datasets,
    metadata,
    principals,
    public_keys,
    quotes,
    releases,
    retired_tokens,
    upload_requests,
    withdrawals,
    wrapped_keys,
)


class SqlStore(Store):
    """Store on any SQLAlchemy URL: ``sqlite:///hub.db`` or ``postgresql+psycopg://...``."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        self.engine = create_engine(url)
        self.writer = self.engine.execution_options(immediate=True)
        # A read transaction on SQLite keeps the snapshot of its first read (WAL); PostgreSQL
        # needs REPEATABLE READ for that (READ COMMITTED takes a snapshot per statement).
        postgres = self.engine.dialect.name == "postgresql"
        self.reader = (
            self.engine.execution_options(isolation_level="REPEATABLE READ")
            if postgres
            else self.engine
        )
        if create:
            self.upgrade()

    def upgrade(self) -> str:
        """Apply Alembic migrations up to head (idempotent); returns the revision."""
        return upgrade(self.writer)

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()

    def _exists(self, column: sa.Column[str], value: str) -> bool:
        """Whether a row has this value (after a constraint failed: which one was it?)."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(column).where(column == value)).first() is not None

    @contextmanager
    def _snapshot(self) -> Iterator[Connection]:
        """One read transaction that sees one state of the database throughout."""
        with self.reader.connect() as conn, conn.begin():
            yield conn

    # -- principals ---------------------------------------------------------------------------

    def create_principal(self, principal: Principal, token_sha256: str) -> None:  # noqa: D102
        try:
            with self.writer.begin() as conn:
                if self._token_taken(conn, token_sha256):  # current, or retired by a rotation
                    raise already_exists("principal", principal.principal_id)
                conn.execute(
                    principals.insert().values(
                        principal_id=principal.principal_id,
                        name=principal.name,
                        role=principal.role.value,
                        token_sha256=token_sha256,
                        scope_partner_id=principal.scope_partner_id,
                    )
                )
        except sa.exc.IntegrityError:
            if not (
                self._exists(principals.c.principal_id, principal.principal_id)
                or self._exists(principals.c.token_sha256, token_sha256)
            ):
                raise
            raise already_exists("principal", principal.principal_id) from None

    def principal_by_token(self, token_sha256: str) -> Principal | None:  # noqa: D102
        if not storable(token_sha256):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(principals).where(
                    principals.c.token_sha256 == token_sha256, principals.c.revoked_at.is_(None)
                )
            ).first()
        return principal_from_row(row) if row else None

    def active_principal(self, principal_id: str) -> Principal | None:  # noqa: D102
        if not storable(principal_id):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(principals).where(
                    principals.c.principal_id == principal_id, principals.c.revoked_at.is_(None)
                )
            ).first()
        return principal_from_row(row) if row else None

    def token_known(self, token_sha256: str) -> bool:  # noqa: D102
        if not storable(token_sha256):
            return False
        with self.engine.connect() as conn:
            current = conn.execute(
                sa.select(principals.c.principal_id).where(
                    principals.c.token_sha256 == token_sha256
                )
            ).first()
            retired = conn.execute(
                sa.select(retired_tokens.c.principal_id).where(
                    retired_tokens.c.token_sha256 == token_sha256
                )
            ).first()
        return current is not None or retired is not None

    def revoke_credentials(self, principal_id: str, revoked_at: str) -> bool:  # noqa: D102
        with self.writer.begin() as conn:
            row = reads.principal_row(conn, principal_id)
            if row.revoked_at is not None:
                return True
            if row.role == Role.ADMIN.value:
                # Lock every active admin row (PostgreSQL; SQLite holds the write lock since
                # BEGIN IMMEDIATE): two admins revoking each other are serialised here.
                admins = conn.execute(
                    sa.select(principals.c.principal_id)
                    .where(principals.c.role == Role.ADMIN.value, principals.c.revoked_at.is_(None))
                    .with_for_update()
                ).all()
                if len(admins) <= 1:
                    return False
            conn.execute(
                principals.update()
                .where(principals.c.principal_id == principal_id)
                .values(revoked_at=revoked_at)
            )
        return True

    def replace_token(  # noqa: D102
        self, principal_id: str, token_sha256: str, retired_at: str
    ) -> bool:
        try:
            with self.writer.begin() as conn:
                row = reads.principal_row(conn, principal_id)
                if self._token_taken(conn, token_sha256):
                    raise already_exists("token of principal", principal_id)
                conn.execute(
                    retired_tokens.insert().values(
                        token_sha256=row.token_sha256,
                        principal_id=principal_id,
                        retired_at=retired_at,
                    )
                )
                conn.execute(
                    principals.update()
                    .where(principals.c.principal_id == principal_id)
                    .values(token_sha256=token_sha256, revoked_at=None)
                )
        except sa.exc.IntegrityError:
            raise already_exists("token of principal", principal_id) from None
        return row.revoked_at is not None

    @staticmethod
    def _token_taken(conn: Connection, token_sha256: str) -> bool:
        current = conn.execute(
            sa.select(principals.c.principal_id).where(principals.c.token_sha256 == token_sha256)
        ).first()
        retired = conn.execute(
            sa.select(retired_tokens.c.principal_id).where(
                retired_tokens.c.token_sha256 == token_sha256
            )
        ).first()
        return current is not None or retired is not None

    def get_principal(self, principal_id: str) -> Principal:  # noqa: D102
        with self.engine.connect() as conn:
            return principal_from_row(reads.principal_row(conn, principal_id))

    def count_principals(self, role: Role | None = None) -> int:  # noqa: D102
        query = sa.select(sa.func.count()).select_from(principals)
        if role is not None:
            query = query.where(principals.c.role == role.value)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    # -- datasets -----------------------------------------------------------------------------

    def find_upload(self, partner_id: str, request_id: str) -> tuple[str, int] | None:  # noqa: D102
        if not storable(partner_id, request_id):
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
        with self.writer.begin() as conn:
            if request_id:
                self._claim_request(conn, dataset, request_id)
            if dataset.version == 1:
                self._insert_first_version(conn, dataset)
            else:
                self._replace_previous_version(conn, dataset)

    @staticmethod
    def _claim_request(conn: Connection, dataset: Dataset, request_id: str) -> None:
        """Record which version the partner's request id published (once per request id)."""
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
            raise request_already_published(request_id) from None

    @staticmethod
    def _insert_first_version(conn: Connection, dataset: Dataset) -> None:
        try:
            with conn.begin_nested():
                conn.execute(
                    datasets.insert().values(
                        dataset_id=dataset.dataset_id, **dataset_values(dataset)
                    )
                )
        except sa.exc.IntegrityError:
            reads.agreement_row(conn, dataset.agreement_id)  # NotFoundError if none
            reads.principal_row(conn, dataset.partner_id)
            raise uploaded_concurrently(dataset.name) from None

    @staticmethod
    def _replace_previous_version(conn: Connection, dataset: Dataset) -> None:
        updated = conn.execute(
            datasets.update()
            .where(
                datasets.c.dataset_id == dataset.dataset_id,
                datasets.c.version == dataset.version - 1,
            )
            .values(**dataset_values(dataset))
        )
        if updated.rowcount != 1:
            raise changed_meanwhile(dataset.name)

    def get_dataset(self, dataset_id: str) -> Dataset:  # noqa: D102
        row = None
        if storable(dataset_id):
            with self.engine.connect() as conn:
                row = conn.execute(
                    sa.select(datasets).where(datasets.c.dataset_id == dataset_id)
                ).first()
        if row is None:
            raise not_found("dataset", dataset_id)
        return dataset_from_row(row)

    def find_dataset(  # noqa: D102
        self, agreement_id: str, partner_id: str, name: str
    ) -> Dataset | None:
        if not storable(agreement_id, partner_id, name):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(datasets).where(
                    datasets.c.agreement_id == agreement_id,
                    datasets.c.partner_id == partner_id,
                    datasets.c.name == name,
                )
            ).first()
        return dataset_from_row(row) if row else None

    def list_datasets(  # noqa: D102
        self, partner_id: str | None = None, agreement_id: str | None = None
    ) -> list[Dataset]:
        if not storable(partner_id, agreement_id):
            return []
        query = sa.select(datasets).order_by(datasets.c.created_at, datasets.c.dataset_id)
        if partner_id is not None:
            query = query.where(datasets.c.partner_id == partner_id)
        if agreement_id is not None:
            query = query.where(datasets.c.agreement_id == agreement_id)
        with self.engine.connect() as conn:
            return [dataset_from_row(r) for r in conn.execute(query)]

    def delete_dataset(self, dataset_id: str) -> None:  # noqa: D102
        if not storable(dataset_id):
            raise not_found("dataset", dataset_id)
        with self.writer.begin() as conn:
            deleted = conn.execute(datasets.delete().where(datasets.c.dataset_id == dataset_id))
        if deleted.rowcount != 1:
            raise not_found("dataset", dataset_id)

    # -- agreements and budgets ---------------------------------------------------------------

    def create_agreement(self, agreement: Agreement) -> None:  # noqa: D102
        try:
            with self.writer.begin() as conn:
                conn.execute(agreements.insert().values(**agreement_values(agreement)))
        except sa.exc.IntegrityError:
            if not self._exists(agreements.c.agreement_id, agreement.agreement_id):
                raise
            raise already_exists("agreement", agreement.agreement_id) from None

    def update_agreement_state(  # noqa: D102
        self,
        agreement_id: str,
        expected: AgreementStatus,
        status: AgreementStatus,
        approved_by: tuple[str, ...],
        *,
        expected_approved_by: tuple[str, ...],
    ) -> bool:
        if not storable(agreement_id):
            return False
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

    def get_agreement(self, agreement_id: str) -> Agreement:  # noqa: D102
        with self.engine.connect() as conn:
            return agreement_from_row(reads.agreement_row(conn, agreement_id))

    def list_agreements(self) -> list[Agreement]:  # noqa: D102
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(agreements).order_by(agreements.c.created_at, agreements.c.agreement_id)
            )
            return [agreement_from_row(r) for r in rows]

    def get_budget(self, agreement_id: str) -> BudgetState:  # noqa: D102
        with self._snapshot() as conn:
            return reads.budget_in(conn, agreement_id)

    def query_context(self, agreement_id: str) -> QueryContext:  # noqa: D102
        with self._snapshot() as conn:
            return reads.query_context_in(conn, agreement_id)

    # -- releases -----------------------------------------------------------------------------

    def reserve_release(self, release: Release) -> BudgetState:  # noqa: D102
        with self.writer.begin() as conn:
            return ledger.reserve(conn, release)

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

    def find_request(self, analyst_id: str, request_id: str) -> Release | None:  # noqa: D102
        if not request_id:
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(releases).where(
                    releases.c.analyst_id == analyst_id, releases.c.request_id == request_id
                )
            ).first()
            return None if row is None else release_from_row(row)

    def cancel_release(self, release: Release) -> bool:  # noqa: D102
        with self.writer.begin() as conn:
            return ledger.cancel(conn, release)

    def fail_unfinished_releases(self) -> int:  # noqa: D102
        with self.writer.begin() as conn:
            done = conn.execute(
                releases.update().where(releases.c.status == "running").values(status="failed")
            )
            return int(done.rowcount or 0)

    def find_replay(self, agreement_id: str, replay_key: str) -> Release | None:  # noqa: D102
        if not storable(agreement_id, replay_key):
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
        return release_from_row(row) if row else None

    def list_releases(self, agreement_id: str | None = None) -> list[Release]:  # noqa: D102
        if not storable(agreement_id):
            return []
        query = sa.select(releases).order_by(releases.c.seq)
        if agreement_id is not None:
            query = query.where(releases.c.agreement_id == agreement_id)
        with self.engine.connect() as conn:
            return [release_from_row(row) for row in conn.execute(query)]

    # -- quoted workloads ---------------------------------------------------------------------

    def create_quote(self, quote: Quote) -> None:  # noqa: D102
        if not storable(quote.agreement_id):
            raise not_found("agreement", quote.agreement_id)
        try:
            with self.writer.begin() as conn:
                reads.agreement_row(conn, quote.agreement_id)  # NotFound first
                conn.execute(quotes.insert().values(**quote_values(quote)))
        except sa.exc.IntegrityError:
            if not self._exists(quotes.c.quote_id, quote.quote_id):
                raise
            raise already_exists("quote", quote.quote_id) from None

    def find_quote(self, quote_id: str) -> Quote | None:  # noqa: D102
        if not storable(quote_id):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(quotes).where(quotes.c.quote_id == quote_id)).first()
        return quote_from_row(row) if row else None

    def reserve_workload(  # noqa: D102
        self, quote_id: str, releases: list[Release], used_at: str
    ) -> BudgetState:
        if not storable(quote_id):
            raise not_found("quote", quote_id)
        with self.writer.begin() as conn:
            # Claim the quote first: a concurrent run of the same quote waits on this row and
            # then finds it used; a refused debit below rolls the claim back with everything.
            claimed = conn.execute(
                quotes.update()
                .where(quotes.c.quote_id == quote_id, quotes.c.used_at == "")
                .values(used_at=used_at)
            )
            row = conn.execute(sa.select(quotes).where(quotes.c.quote_id == quote_id)).first()
            if row is None:
                raise not_found("quote", quote_id)
            if claimed.rowcount != 1:
                raise quote_already_run(quote_id)
            ledger.reserve_all(conn, releases)
            return reads.budget_in(conn, row.agreement_id)

    # -- keys ---------------------------------------------------------------------------------

    def publish_public_key(  # noqa: D102
        self,
        principal_id: str,
        public_key: bytes,
        created_at: str,
        *,
        identity_public_key: bytes = b"",
        signature: bytes = b"",
    ) -> PublicKeyRecord:
        try:
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
                        identity_public_key=identity_public_key or None,
                        signature=signature or None,
                    )
                )
        except sa.exc.IntegrityError:
            if not self._exists(principals.c.principal_id, principal_id):
                raise not_found("principal", principal_id) from None
            raise
        return PublicKeyRecord(
            principal_id,
            version,
            bytes(public_key),
            created_at,
            bytes(identity_public_key),
            bytes(signature),
        )

    def current_public_key(self, principal_id: str) -> PublicKeyRecord | None:  # noqa: D102
        if not storable(principal_id):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(public_keys)
                .where(public_keys.c.principal_id == principal_id)
                .order_by(public_keys.c.version.desc())
                .limit(1)
            ).first()
        return public_key_from_row(row) if row else None

    def store_wrapped_keys(  # noqa: D102
        self, agreement_id: str, fingerprint: str, keys: list[WrappedKey]
    ) -> int:
        try:
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
                    raise keys_already_distributed()
                for key in keys:
                    conn.execute(
                        wrapped_keys.insert().values(
                            agreement_id=agreement_id,
                            key_fingerprint=fingerprint,
                            recipient_id=key.recipient_id,
                            nonce=key.nonce,
                            ciphertext=key.ciphertext,
                            signature=key.signature or None,
                        )
                    )
        except sa.exc.IntegrityError:  # no such agreement, or a concurrent distribution won
            if not self._exists(agreements.c.agreement_id, agreement_id):
                raise not_found("agreement", agreement_id) from None
            raise keys_already_distributed() from None
        return len(keys)

    def wrapped_key(  # noqa: D102
        self, agreement_id: str, fingerprint: str, recipient_id: str
    ) -> WrappedKey | None:
        if not storable(agreement_id, fingerprint, recipient_id):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(wrapped_keys).where(
                    wrapped_keys.c.agreement_id == agreement_id,
                    wrapped_keys.c.key_fingerprint == fingerprint,
                    wrapped_keys.c.recipient_id == recipient_id,
                )
            ).first()
        return wrapped_key_from_row(row) if row else None

    # -- consent ------------------------------------------------------------------------------

    def record_withdrawals(  # noqa: D102
        self, agreement_id: str, partner_id: str, pseudonyms: list[str], created_at: str
    ) -> int:
        for _ in range(5):
            try:
                return self._record_withdrawals(agreement_id, partner_id, pseudonyms, created_at)
            except sa.exc.IntegrityError:  # no such agreement, or a concurrent withdrawal
                if not self._exists(agreements.c.agreement_id, agreement_id):
                    raise not_found("agreement", agreement_id) from None
                # else retry: the new read skips what the concurrent withdrawal recorded
        raise RuntimeError("could not record withdrawals under contention")

    def _record_withdrawals(
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
        with self.engine.connect() as conn:
            return reads.withdrawn_in(conn, agreement_id)

    # -- audit --------------------------------------------------------------------------------

    def append_audit(  # noqa: D102
        self, event: AuditEvent, seal: Callable[[int, str], tuple[str, str]]
    ) -> ChainedEntry:
        return chain.append(self.writer, event, seal)

    def list_audit(self) -> list[ChainedEntry]:  # noqa: D102
        with self.engine.connect() as conn:
            return [
                audit_from_row(r)
                for r in conn.execute(sa.select(audit_events).order_by(audit_events.c.seq))
            ]

    def find_audit(self, seq: int) -> ChainedEntry | None:  # noqa: D102
        query = (
            sa.select(audit_events).where(audit_events.c.seq == seq)
            if seq > 0
            else sa.select(audit_events).order_by(audit_events.c.seq.desc()).limit(1)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return audit_from_row(row) if row is not None else None


__all__ = [
    "MIGRATIONS",
    "SqlStore",
    "agreements",
    "analyst_spend",
    "audit_events",
    "audit_head",
    "create_engine",
    "datasets",
    "metadata",
    "principals",
    "public_keys",
    "releases",
    "upload_requests",
    "withdrawals",
    "wrapped_keys",
]
