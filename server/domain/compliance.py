"""What compliance officers, admins and partners review: budgets, consent, ledger, audit log.

Admins and hub-wide compliance officers see every agreement. A partner sees its own view: the
agreements it is party to (their budgets and releases), the audit entries that concern it, and
consent coverage of its own datasets; a compliance officer scoped to a partner (its DPO) sees
exactly that partner's view. Nothing in a view tells a partner about another partner's data
beyond the releases themselves (docs/privacy.md, "Each contributor's view").
"""

from __future__ import annotations

from entremise.server.domain.access import require, view_owner
from entremise.server.domain.audit import ChainedEntry
from entremise.server.domain.errors import NotFoundError
from entremise.server.domain.ids import now
from entremise.server.domain.models import (
    Agreement,
    BudgetState,
    ConsentCount,
    Dataset,
    Principal,
    Release,
    Role,
)
from entremise.server.domain.ports import DatasetFiles, Store

REVIEWERS = (Role.COMPLIANCE, Role.ADMIN)
READERS = (Role.COMPLIANCE, Role.ADMIN, Role.PARTNER)

# Entries on one of its agreements that a partner sees even when another principal made them:
# the agreement's terms and lifecycle, key distribution and releases. Anything else another
# partner does on the agreement (withdrawals, erasures: their counts describe that partner's
# data) stays out of the view, and so does any kind not listed here.
SHARED_AGREEMENT_KINDS = frozenset(
    {
        "agreement_created",
        "agreement_approved",
        "agreement_suspended",
        "agreement_revoked",
        "matching_key_distributed",
        "release",
        "release_failed",
        "release_refused",
        "release_replayed",
        # Quoted workloads: priced, run (its releases are `release` entries), or refused.
        "quote",
        "quote_run",
        "quote_refused",
    }
)


class Compliance:
    """Read-only views: the whole hub for reviewers, its own view for each partner."""

    def __init__(self, store: Store, files: DatasetFiles, audit_public_key: bytes = b"") -> None:
        self.store = store
        self.files = files
        self.audit_public_key = audit_public_key

    def budgets(self, caller: Principal, agreement_id: str = "") -> list[BudgetState]:
        """Budget (with per-analyst spend) of one or all agreements in the caller's view."""
        owner = self._owner(caller)
        return [
            self.store.get_budget(a.agreement_id) for a in self._agreements(owner, agreement_id)
        ]

    def consent_coverage(
        self, caller: Principal, agreement_id: str = ""
    ) -> list[tuple[Dataset, ConsentCount, int]]:
        """Per dataset and purpose: consent counts, and people withdrawn by its partner.

        A partner's view covers its own datasets only.
        """
        owner = self._owner(caller)
        self._agreements(owner, agreement_id)  # NotFoundError outside the view
        out = []
        withdrawn: dict[str, dict[str, list[str]]] = {}
        for dataset in self.store.list_datasets(owner, agreement_id or None):
            if dataset.agreement_id not in withdrawn:
                withdrawn[dataset.agreement_id] = self.store.withdrawn(dataset.agreement_id)
            gone = len(withdrawn[dataset.agreement_id].get(dataset.partner_id, []))
            for count in self.files.consent_counts(
                dataset.dataset_id, dataset.version, dataset.schema, now()
            ):
                out.append((dataset, count, gone))
        return out

    def ledger(self, caller: Principal, agreement_id: str = "") -> list[Release]:
        """Every release in the caller's view with its parameters and cost."""
        owner = self._owner(caller)
        ids = {a.agreement_id for a in self._agreements(owner, agreement_id)}
        releases = self.store.list_releases(agreement_id or None)
        return releases if owner is None else [r for r in releases if r.agreement_id in ids]

    def audit_log(self, caller: Principal) -> list[ChainedEntry]:
        """The audit log in the caller's view, oldest first (entries as signed, never edited)."""
        owner = self._owner(caller)
        entries = self.store.list_audit()
        if owner is None:
            return entries
        agreements = {a.agreement_id: a for a in self._agreements(owner, "")}
        counterparts = {owner}
        for a in agreements.values():
            counterparts.update(a.partner_ids, a.analyst_ids)
        own_datasets = {d.dataset_id for d in self.store.list_datasets(owner)} | {
            e.subject_id for e in entries if e.kind == "dataset_published" and e.actor_id == owner
        }
        makers = {owner, caller.principal_id}

        def concerns(e: ChainedEntry) -> bool:
            if e.actor_id in makers or e.subject_id == owner or e.subject_id in own_datasets:
                return True
            if e.kind == "principal_created":  # names of its counterparts and its own officers
                return e.subject_id in counterparts or e.detail.get("scope_partner_id") == owner
            return e.subject_id in agreements and e.kind in SHARED_AGREEMENT_KINDS

        return [e for e in entries if concerns(e)]

    def _owner(self, caller: Principal) -> str | None:
        require(caller, *READERS)
        return view_owner(caller)

    def _agreements(self, owner: str | None, agreement_id: str) -> list[Agreement]:
        """The agreements in the view (one if `agreement_id`; NotFoundError outside the view)."""
        if agreement_id:
            agreement = self.store.get_agreement(agreement_id)
            if owner is not None and owner not in agreement.partner_ids:
                raise NotFoundError(f"agreement {agreement_id!r} not found")
            return [agreement]
        return [a for a in self.store.list_agreements() if owner is None or owner in a.partner_ids]
