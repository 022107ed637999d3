"""What compliance officers and admins review: budgets, consent coverage, ledger, audit log."""

from __future__ import annotations

from entremise.server.domain.access import require
from entremise.server.domain.audit import ChainedEntry
from entremise.server.domain.ids import now
from entremise.server.domain.models import (
    BudgetState,
    ConsentCount,
    Dataset,
    Principal,
    Release,
    Role,
)
from entremise.server.domain.ports import DatasetFiles, Store

REVIEWERS = (Role.COMPLIANCE, Role.ADMIN)


class Compliance:
    """Read-only views across every agreement, for reviewers only."""

    def __init__(self, store: Store, files: DatasetFiles) -> None:
        self.store = store
        self.files = files

    def budgets(self, caller: Principal, agreement_id: str = "") -> list[BudgetState]:
        """Budget of one or all agreements."""
        require(caller, *REVIEWERS)
        ids = (
            [agreement_id]
            if agreement_id
            else [a.agreement_id for a in self.store.list_agreements()]
        )
        return [self.store.get_budget(i) for i in ids]

    def consent_coverage(
        self, caller: Principal, agreement_id: str = ""
    ) -> list[tuple[Dataset, ConsentCount, int]]:
        """Per dataset and purpose: consent counts, and people withdrawn by its partner."""
        require(caller, *REVIEWERS)
        self._check_agreement(agreement_id)
        out = []
        withdrawn: dict[str, dict[str, list[str]]] = {}
        for dataset in self.store.list_datasets(agreement_id=agreement_id or None):
            if dataset.agreement_id not in withdrawn:
                withdrawn[dataset.agreement_id] = self.store.withdrawn(dataset.agreement_id)
            gone = len(withdrawn[dataset.agreement_id].get(dataset.partner_id, []))
            for count in self.files.consent_counts(
                dataset.dataset_id, dataset.version, dataset.schema, now()
            ):
                out.append((dataset, count, gone))
        return out

    def ledger(self, caller: Principal, agreement_id: str = "") -> list[Release]:
        """Every release with its parameters and cost."""
        require(caller, *REVIEWERS)
        self._check_agreement(agreement_id)
        return self.store.list_releases(agreement_id or None)

    def audit_log(self, caller: Principal) -> list[ChainedEntry]:
        """The audit log, oldest first."""
        require(caller, *REVIEWERS)
        return self.store.list_audit()

    def _check_agreement(self, agreement_id: str) -> None:
        if agreement_id:
            self.store.get_agreement(agreement_id)  # NotFoundError if there is none
