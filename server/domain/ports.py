"""Interfaces the domain core needs: metadata store, dataset files, aggregation engine."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

from entremise.privacy.budget import Epsilon
from entremise.server.domain.models import (
    Agreement,
    BudgetState,
    Dataset,
    DatasetSchema,
    ExactAggregates,
    Principal,
    QueryPlan,
    Release,
    Role,
)


class Store(ABC):
    """Transactional metadata store (principals, datasets, agreements, budgets, releases)."""

    @abstractmethod
    def create_principal(self, principal: Principal, token_sha256: str) -> None:
        """Insert a principal with the SHA-256 of its token."""

    @abstractmethod
    def principal_by_token(self, token_sha256: str) -> Principal | None:
        """The principal owning a token hash, if any."""

    @abstractmethod
    def get_principal(self, principal_id: str) -> Principal | None:
        """A principal by id."""

    @abstractmethod
    def count_principals(self, role: Role | None = None) -> int:
        """How many principals exist (optionally of one role)."""

    @abstractmethod
    def publish_dataset(self, dataset: Dataset) -> None:
        """Make a dataset version visible (insert or replace the partner's dataset of that name)."""

    @abstractmethod
    def get_dataset(self, dataset_id: str) -> Dataset | None:
        """The current version of a dataset."""

    @abstractmethod
    def find_dataset(self, partner_id: str, name: str) -> Dataset | None:
        """A partner's dataset by name."""

    @abstractmethod
    def list_datasets(self, partner_id: str | None = None) -> list[Dataset]:
        """Datasets, optionally of one partner."""

    @abstractmethod
    def delete_dataset(self, dataset_id: str) -> None:
        """Remove a dataset's metadata."""

    @abstractmethod
    def create_agreement(self, agreement: Agreement) -> None:
        """Insert an agreement and its budget (nothing spent)."""

    @abstractmethod
    def get_agreement(self, agreement_id: str) -> Agreement | None:
        """An agreement by id."""

    @abstractmethod
    def list_agreements(self) -> list[Agreement]:
        """All agreements."""

    @abstractmethod
    def get_budget(self, agreement_id: str) -> BudgetState | None:
        """An agreement's budget."""

    @abstractmethod
    def commit_release(self, release: Release) -> BudgetState:
        """Atomically debit `release.epsilon_spent` and store the release.

        Raises BudgetExhaustedError (and stores nothing) if the debit would overspend.
        """

    @abstractmethod
    def list_releases(self, agreement_id: str | None = None) -> list[Release]:
        """Releases in commit order."""


@dataclass(frozen=True)
class IngestResult:
    """What the file layer learnt while validating and storing an upload."""

    row_count: int
    distinct_keys: int
    max_rows_per_key: int
    content_sha256: str
    size_bytes: int


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
    def path(self, dataset_id: str, version: int) -> str:
        """Location of a stored dataset version."""

    @abstractmethod
    def delete(self, dataset_id: str, version: int | None = None) -> None:
        """Remove stored data (one version, or every version)."""


class AggregationEngine(ABC):
    """Computes exact, contribution-bounded aggregates of a consented join (pre-noise)."""

    @abstractmethod
    def compute(self, plan: QueryPlan, paths: list[str]) -> ExactAggregates:
        """Exact aggregates per group cell, in `plan.group_keys` order."""


__all__ = [
    "AggregationEngine",
    "DatasetFiles",
    "Epsilon",
    "IngestResult",
    "Store",
]
