"""Interfaces the domain core needs: metadata store, dataset files, aggregation engine."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from entremise.privacy.budget import Epsilon
from entremise.server.domain.audit import ChainedEntry
from entremise.server.domain.models import (
    Agreement,
    AgreementStatus,
    AuditEvent,
    BudgetState,
    ConsentCount,
    Dataset,
    DatasetSchema,
    DuplicateReport,
    ExactAggregates,
    Principal,
    PublicKeyRecord,
    QueryContext,
    QueryPlan,
    Quote,
    Release,
    Role,
    WrappedKey,
)


class Store(ABC):
    """Transactional metadata store (principals, datasets, agreements, budgets, releases).

    Reads come in three kinds, and their names say which:

    - ``get_*`` reads an object the caller names and expects to exist: it returns it, or raises
      NotFoundError (``"agreement 'ag_x' not found"``) so that no caller asserts on None;
    - lookups (``principal_by_token``, ``find_upload``, ``find_dataset``, ``find_replay``,
      ``current_public_key``, ``wrapped_key``) ask whether something exists: None if not;
    - listings (``list_*``, ``withdrawn``, ``stored_versions``) are empty when nothing matches.

    Every write is one transaction: it happens whole, or raises and changes nothing. A write
    that repeats an identity (id, token, request id, key context) raises AlreadyExistsError; a
    write naming an agreement or principal that does not exist raises NotFoundError. Returned
    objects are snapshots: changing them never changes the store.

    Orders: agreements and datasets by (created_at, id); releases and audit entries in commit
    order; a budget's analysts by analyst id; withdrawn pseudonyms sorted, per partner.

    Implementations: SqlStore (SQLite, PostgreSQL) and MemoryStore, held to one contract by
    tests/test_store_contract.py.
    """

    # -- principals -------------------------------------------------------------------------

    @abstractmethod
    def create_principal(self, principal: Principal, token_sha256: str) -> None:
        """Insert a principal with the SHA-256 of its token (AlreadyExists if id or token is)."""

    @abstractmethod
    def principal_by_token(self, token_sha256: str) -> Principal | None:
        """Lookup: the active principal owning a token hash, if any (None once revoked)."""

    @abstractmethod
    def active_principal(self, principal_id: str) -> Principal | None:
        """Lookup: the principal with this id, unless unknown or its credentials are revoked."""

    @abstractmethod
    def token_known(self, token_sha256: str) -> bool:
        """Whether a token hash was ever issued: current, revoked or retired by a rotation."""

    @abstractmethod
    def revoke_credentials(self, principal_id: str, revoked_at: str) -> bool:
        """Revoke a principal's token and certificate identity, at once (NotFound if unknown).

        Returns False, changing nothing, if the principal is the last active admin (checked in
        the same transaction, so two admins revoking each other cannot both succeed). Revoking
        a revoked principal changes nothing and returns True.
        """

    @abstractmethod
    def replace_token(self, principal_id: str, token_sha256: str, retired_at: str) -> bool:
        """Give a principal a new token hash; the old hash is retired, never valid again.

        A revocation is lifted. Returns whether the principal had been revoked. NotFound if
        the principal is unknown; AlreadyExists if the new hash was ever issued.
        """

    @abstractmethod
    def get_principal(self, principal_id: str) -> Principal:
        """A principal by id (else NotFoundError)."""

    @abstractmethod
    def count_principals(self, role: Role | None = None) -> int:
        """How many principals exist (optionally of one role)."""

    # -- datasets ---------------------------------------------------------------------------

    @abstractmethod
    def publish_dataset(self, dataset: Dataset, request_id: str = "") -> None:
        """Make a dataset version visible, recording the client's request id, in one transaction.

        Version 1 is inserted; version n replaces version n-1. AlreadyExistsError if the
        request id was used by this partner already, if version 1 meets an existing dataset
        (same id, or same agreement, partner and name), or if version n-1 is not the current
        one; NotFoundError if the agreement or the partner does not exist.
        """

    @abstractmethod
    def find_upload(self, partner_id: str, request_id: str) -> tuple[str, int] | None:
        """Lookup: the (dataset id, version) an earlier upload with this request id published."""

    @abstractmethod
    def stored_versions(self) -> set[tuple[str, int]]:
        """Every (dataset id, version) the metadata refers to."""

    @abstractmethod
    def get_dataset(self, dataset_id: str) -> Dataset:
        """The current version of a dataset (else NotFoundError)."""

    @abstractmethod
    def find_dataset(self, agreement_id: str, partner_id: str, name: str) -> Dataset | None:
        """Lookup: a partner's dataset of one agreement, by name."""

    @abstractmethod
    def list_datasets(
        self, partner_id: str | None = None, agreement_id: str | None = None
    ) -> list[Dataset]:
        """Datasets, optionally of one partner and/or one agreement."""

    @abstractmethod
    def delete_dataset(self, dataset_id: str) -> None:
        """Remove a dataset's metadata (else NotFoundError)."""

    # -- agreements and budgets -------------------------------------------------------------

    @abstractmethod
    def create_agreement(self, agreement: Agreement) -> None:
        """Insert an agreement and its budget (nothing spent; AlreadyExists if the id is)."""

    @abstractmethod
    def update_agreement_state(
        self,
        agreement_id: str,
        expected: AgreementStatus,
        status: AgreementStatus,
        approved_by: tuple[str, ...],
        *,
        expected_approved_by: tuple[str, ...],
    ) -> bool:
        """Move an agreement from `expected` to `status` and set its approvals.

        Compare-and-set on both the status and the approvals read: False if either changed
        meanwhile (two partners approving at once must not overwrite each other's approval),
        or if there is no such agreement.
        """

    @abstractmethod
    def get_agreement(self, agreement_id: str) -> Agreement:
        """An agreement by id (else NotFoundError)."""

    @abstractmethod
    def list_agreements(self) -> list[Agreement]:
        """All agreements."""

    @abstractmethod
    def get_budget(self, agreement_id: str) -> BudgetState:
        """An agreement's budget, with each analyst's spend, at one instant (else NotFound)."""

    @abstractmethod
    def query_context(self, agreement_id: str) -> QueryContext:
        """What a query needs, read in one transaction (else NotFoundError).

        The agreement, its budget, the current public key of each partner (in
        `agreement.partner_ids` order, None if it has none), the current dataset of each slot
        (in `agreement.slots` order, None if not uploaded) and the withdrawn pseudonyms.
        """

    # -- releases ---------------------------------------------------------------------------

    @abstractmethod
    def reserve_release(self, release: Release) -> BudgetState:
        """Atomically debit the agreement and the analyst, and store the (running) release.

        Called before any data is read: whatever happens next is paid for. Raises
        BudgetExhaustedError (and stores nothing) if either debit would overspend: the
        agreement's epsilon (or rho) and delta, or the analyst's own cap. Returns the budget
        just after the debit.
        """

    @abstractmethod
    def finish_release(self, release: Release) -> None:
        """Store a reserved release's results, replay key and final status (released or failed).

        Only those change: its cost stays as reserved. An unknown release id changes nothing.
        """

    @abstractmethod
    def find_request(self, analyst_id: str, request_id: str) -> Release | None:
        """The release an analyst's request id reserved (running, released or failed), if any.

        `reserve_release` refuses (AlreadyExistsError, nothing debited) a second release with
        the same analyst and non-empty request id.
        """

    @abstractmethod
    def cancel_release(self, release: Release) -> bool:
        """Undo a running release that was stopped before any result existed (hub shutdown).

        In one transaction: the release is removed and its debits (agreement and analyst) are
        credited back. Only a release still `running` is cancelled; returns whether it was.
        """

    @abstractmethod
    def fail_unfinished_releases(self) -> int:
        """After a crash: releases left running are failed (their debit stays). Returns how many."""

    @abstractmethod
    def list_releases(self, agreement_id: str | None = None) -> list[Release]:
        """Releases in commit order."""

    @abstractmethod
    def find_replay(self, agreement_id: str, replay_key: str) -> Release | None:
        """Lookup: the first release of the same canonical query on the same data state.

        Only released ones count: a running or failed release answers nothing.
        """

    # -- quoted workloads -------------------------------------------------------------------

    @abstractmethod
    def create_quote(self, quote: Quote) -> None:
        """Store a quote, unused (AlreadyExists if its id is; NotFound if its agreement isn't)."""

    @abstractmethod
    def find_quote(self, quote_id: str) -> Quote | None:
        """Lookup: a quote by id, with `used_at` set once it was run."""

    @abstractmethod
    def reserve_workload(self, quote_id: str, releases: list[Release], used_at: str) -> BudgetState:
        """Run a quote: mark it used and reserve every release of its workload, atomically.

        One transaction: the quote must exist and be unused (else NotFoundError, or
        FailedPreconditionError "quote ... was already run"); the agreement is debited the
        releases' total epsilon (or rho) and delta and the analyst the total epsilon, each
        checked on the total (BudgetExhaustedError naming the total); every release is stored
        as running. On any refusal nothing changes: no debit, no release, the quote unused.
        The releases are all of the quote's agreement and analyst; there may be none (a
        workload answered wholly from the ledger). Returns the budget just after.
        """

    # -- keys -------------------------------------------------------------------------------

    @abstractmethod
    def publish_public_key(
        self,
        principal_id: str,
        public_key: bytes,
        created_at: str,
        *,
        identity_public_key: bytes = b"",
        signature: bytes = b"",
    ) -> PublicKeyRecord:
        """Store a partner's new public key (with its identity signature) as its next version."""

    @abstractmethod
    def current_public_key(self, principal_id: str) -> PublicKeyRecord | None:
        """Lookup: a partner's latest public key."""

    @abstractmethod
    def store_wrapped_keys(
        self, agreement_id: str, fingerprint: str, keys: list[WrappedKey]
    ) -> int:
        """Store the leader's wrapped matching keys once per key context (else AlreadyExists)."""

    @abstractmethod
    def wrapped_key(
        self, agreement_id: str, fingerprint: str, recipient_id: str
    ) -> WrappedKey | None:
        """Lookup: the wrapped matching key addressed to one partner, if distributed."""

    # -- consent ----------------------------------------------------------------------------

    @abstractmethod
    def record_withdrawals(
        self, agreement_id: str, partner_id: str, pseudonyms: list[str], created_at: str
    ) -> int:
        """Record consent withdrawals (idempotent); returns how many were new."""

    @abstractmethod
    def withdrawn(self, agreement_id: str) -> dict[str, list[str]]:
        """Withdrawn pseudonyms of an agreement, per partner (sorted)."""

    # -- audit ------------------------------------------------------------------------------

    @abstractmethod
    def append_audit(
        self, event: AuditEvent, seal: Callable[[int, str], tuple[str, str]]
    ) -> ChainedEntry:
        """Append one event at the chain's head; `seal(seq, prev_hash)` gives (hash, signature).

        Entries are numbered 1, 2, ... and each holds its predecessor's hash (GENESIS first),
        also when appends race.
        """

    @abstractmethod
    def list_audit(self) -> list[ChainedEntry]:
        """The audit log, oldest first."""

    @abstractmethod
    def find_audit(self, seq: int) -> ChainedEntry | None:
        """The audit entry at `seq`, or None; seq <= 0 means the latest entry (None if empty)."""


@dataclass(frozen=True)
class IngestResult:
    """What the file layer learnt while validating and storing an upload."""

    row_count: int
    distinct_keys: int
    max_rows_per_key: int
    content_sha256: str
    size_bytes: int
    duplicates: tuple[DuplicateReport, ...] = ()


class DatasetFiles(ABC):
    """Where uploaded data lives (columnar files on disk)."""

    @abstractmethod
    def ingest(
        self,
        dataset_id: str,
        version: int,
        schema: DatasetSchema,
        chunks: Iterable[bytes],
        expected_sha256: str,
    ) -> IngestResult:
        """Stage, verify and validate an upload, then write it durably (not yet published)."""

    @abstractmethod
    def erase(
        self,
        dataset_id: str,
        version: int,
        new_version: int,
        schema: DatasetSchema,
        pseudonyms: set[str],
    ) -> IngestResult | None:
        """Write `new_version` without the rows of these pseudonyms; None if none matched."""

    @abstractmethod
    def sweep(self, keep: set[tuple[str, int]]) -> int:
        """Delete stored versions (and their keys) the metadata does not refer to."""

    @abstractmethod
    def present(
        self, dataset_id: str, version: int, schema: DatasetSchema, pseudonyms: set[str]
    ) -> set[str]:
        """Which of these pseudonyms occur in any key column of the stored version."""

    @abstractmethod
    def consent_counts(
        self, dataset_id: str, version: int, schema: DatasetSchema, now: str
    ) -> list[ConsentCount]:
        """Rows, consenting rows and expired consents per declared purpose."""

    @abstractmethod
    def path(self, dataset_id: str, version: int) -> str:
        """Location of a stored dataset version (encrypted bytes)."""

    @abstractmethod
    def read(self, dataset_id: str, version: int, columns: list[str] | None = None) -> Any:
        """The decrypted table of a stored version (a pyarrow Table)."""

    @abstractmethod
    def source(self, dataset_id: str, version: int) -> Any:
        """A stored version as an engine reads it (streamed, never necessarily whole)."""

    @abstractmethod
    def delete(self, dataset_id: str, version: int | None = None) -> None:
        """Remove stored data (one version, or every version).

        A version being read (`reading`) is removed as soon as its last reader is done: a
        release planned on it, and already paid for, completes on the data it was planned on.
        """

    @abstractmethod
    def reading(self, versions: list[tuple[str, int]]) -> AbstractContextManager[None]:
        """Hold these (dataset id, version)s while a computation reads them (see `delete`)."""


class AggregationEngine(ABC):
    """Computes exact, contribution-bounded aggregates of a consented join (pre-noise)."""

    @abstractmethod
    def compute(
        self, plan: QueryPlan, sources: list[Any], withdrawn: Collection[str], now: str
    ) -> ExactAggregates:
        """Exact aggregates per group cell, in `plan.group_keys` order.

        People with any pseudonym in `withdrawn` are left out entirely; consent whose expiry
        is before `now` (ISO 8601) counts as no consent.
        """

    def interrupt(self) -> None:  # noqa: B027 - optional: an engine may not be able to
        """Stop every computation in progress (hub shutdown): each raises ComputationStopped."""

    def close(self) -> None:  # noqa: B027 - optional: an engine may hold nothing
        """Release what the engine holds (its database, its Spark session) once the hub stops."""


__all__ = [
    "AggregationEngine",
    "DatasetFiles",
    "Epsilon",
    "IngestResult",
    "Store",
]
