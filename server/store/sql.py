"""SQL implementation of the Store port (SQLite by default, PostgreSQL in production).

The schema is in `tables`, engines and migrations in `database`, row mapping in `rows`, and the
conditional debits of a release in `ledger`; this module is the Store itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import sqlalchemy as sa

from entremise.server.domain.audit import GENESIS, ChainedEntry
from entremise.server.domain.codec import release_payload
from entremise.server.domain.errors import AlreadyExistsError, NotFoundError
from entremise.server.domain.models import (
    Agreement,
    AgreementStatus,
    AuditEvent,
    BudgetState,
    Dataset,
    Principal,
    PublicKeyRecord,
    Release,
    Role,
    WrappedKey,
)
from entremise.server.domain.ports import Store
from entremise.server.store import ledger
from entremise.server.store.database import MIGRATIONS, create_engine, upgrade
from entremise.server.store.rows import (
    agreement_from_row,
    agreement_values,
    audit_from_row,
    dataset_from_row,
    dataset_values,
    principal_from_row,
    public_key_from_row,
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
    releases,
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
        if create:
            self.upgrade()

    def upgrade(self) -> str:
        """Apply Alembic migrations up to head (idempotent); returns the revision."""
        return upgrade(self.writer)

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()

    # -- principals ---------------------------------------------------------------------------

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
        return principal_from_row(row) if row else None

    def get_principal(self, principal_id: str) -> Principal | None:  # noqa: D102
        if not storable(principal_id):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(principals).where(principals.c.principal_id == principal_id)
            ).first()
        return principal_from_row(row) if row else None

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
            values = dataset_values(dataset)
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
        if not storable(dataset_id):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(datasets).where(datasets.c.dataset_id == dataset_id)
            ).first()
        return dataset_from_row(row) if row else None

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
        with self.writer.begin() as conn:
            deleted = conn.execute(datasets.delete().where(datasets.c.dataset_id == dataset_id))
        if deleted.rowcount != 1:
            raise NotFoundError(f"dataset {dataset_id!r} not found")

    # -- agreements and budgets ---------------------------------------------------------------

    def create_agreement(self, agreement: Agreement) -> None:  # noqa: D102
        with self.writer.begin() as conn:
            conn.execute(agreements.insert().values(**agreement_values(agreement)))

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
        if not storable(agreement_id):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(agreements).where(agreements.c.agreement_id == agreement_id)
            ).first()
        return agreement_from_row(row) if row else None

    def list_agreements(self) -> list[Agreement]:  # noqa: D102
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(agreements).order_by(agreements.c.created_at, agreements.c.agreement_id)
            )
            return [agreement_from_row(r) for r in rows]

    def get_budget(self, agreement_id: str) -> BudgetState | None:  # noqa: D102
        with self.engine.connect() as conn:
            return ledger.budget_in(conn, agreement_id)

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
        if not storable(agreement_id):
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
                audit_from_row(r)
                for r in conn.execute(sa.select(audit_events).order_by(audit_events.c.seq))
            ]


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
