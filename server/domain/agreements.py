"""Agreements: who joins which datasets for what purpose, under which budget and bounds.

An agreement is proposed (by an admin or one of its partners), active once every partner has
approved it, and any partner may suspend it (every partner approves again to resume) or
revoke it for good.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from entremise.privacy.budget import MixedMeasuresError, PrivacyLoss
from entremise.server.domain.access import check_text, participant, require, visible
from entremise.server.domain.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from entremise.server.domain.ids import new_id, now
from entremise.server.domain.models import (
    DELTA_UNITS,
    AggregateKind,
    Agreement,
    AgreementStatus,
    BudgetKind,
    BudgetState,
    DatasetSlot,
    Principal,
    Role,
    check_name,
)
from entremise.server.domain.planner import MAX_ROWS_PER_PERSON
from entremise.server.domain.ports import Store
from entremise.server.domain.sensitivity import DEFAULT_SHARED_IDENTIFIERS, MAX_SHARED_IDENTIFIERS
from entremise.server.domain.trail import AuditTrail

log = logging.getLogger(__name__)

#: How often an approval is retried when another partner's approval lands at the same time.
APPROVAL_ATTEMPTS = 5


@dataclass(frozen=True)
class AgreementTerms:
    """What a proposer asks for: parties, purpose, budget and contribution bounds."""

    name: str
    purpose: str
    slots: Sequence[DatasetSlot]
    analyst_ids: Sequence[str]
    total_epsilon: PrivacyLoss  # in the agreement's measure: epsilon, or rho for zCDP
    max_rows_per_person: int
    max_groups_per_person: int  # 0: auto, every cell of a query's public grouping
    budget_kind: BudgetKind = BudgetKind.PURE
    total_delta_units: int = 0
    analyst_budget: PrivacyLoss | None = None
    expires_at: str = ""
    allowed_columns: Sequence[str] = ()
    allowed_aggregations: Sequence[str] = ()
    min_group_size: int = 0
    max_shared_identifiers: int = DEFAULT_SHARED_IDENTIFIERS

    def check(self) -> None:
        """The terms that need no lookup: names, budget, contribution bounds."""
        if self.min_group_size < 0:
            raise InvalidArgumentError("min_group_size must not be negative")
        unknown = set(self.allowed_aggregations) - {k.value for k in AggregateKind}
        if unknown:
            raise InvalidArgumentError(f"unknown aggregations {sorted(unknown)}")
        check_text(self.name, "agreement name")
        check_name(self.purpose, "purpose")
        if len(self.slots) < 2:
            raise InvalidArgumentError("an agreement joins at least two datasets")
        if len(set(s.name for s in self.slots)) != len(self.slots):
            raise InvalidArgumentError("dataset names within an agreement must be distinct")
        _check_budget(self.total_epsilon, self.total_delta_units, self.analyst_budget)
        for amount in (self.total_epsilon, self.analyst_budget):
            if amount is not None and amount.measure is not self.budget_kind:
                raise MixedMeasuresError(
                    f"a {self.budget_kind.value} budget is counted in {self.budget_kind.symbol}"
                )
        if not 1 <= self.max_rows_per_person <= MAX_ROWS_PER_PERSON:
            raise InvalidArgumentError(f"max_rows_per_person must be in [1, {MAX_ROWS_PER_PERSON}]")
        if self.max_groups_per_person < 0:
            raise InvalidArgumentError("max_groups_per_person must not be negative")
        if not 1 <= self.max_shared_identifiers <= MAX_SHARED_IDENTIFIERS:
            raise InvalidArgumentError(
                f"max_shared_identifiers must be in [1, {MAX_SHARED_IDENTIFIERS}]"
            )


class Agreements:
    """Propose, approve, suspend, revoke and read agreements."""

    def __init__(self, store: Store, trail: AuditTrail) -> None:
        self.store = store
        self.trail = trail

    def create(self, caller: Principal, terms: AgreementTerms) -> Agreement:
        """Propose an agreement (admin, or a partner named in its slots).

        It is active once every partner has approved it; a proposing partner approves it.
        """
        require(caller, Role.ADMIN, Role.PARTNER)
        if caller.role is Role.PARTNER and caller.principal_id not in {
            s.partner_id for s in terms.slots
        }:
            raise PermissionDeniedError("a partner may only propose agreements it is part of")
        expires_at = _utc(terms.expires_at)
        terms.check()
        self._check_parties(terms.slots, terms.analyst_ids)
        agreement = Agreement(
            agreement_id=new_id("ag"),
            name=terms.name,
            purpose=terms.purpose,
            slots=tuple(terms.slots),
            analyst_ids=tuple(dict.fromkeys(terms.analyst_ids)),
            total_epsilon=terms.total_epsilon,
            max_rows_per_person=terms.max_rows_per_person,
            max_groups_per_person=terms.max_groups_per_person,
            created_at=now(),
            budget_kind=terms.budget_kind,
            total_delta_units=terms.total_delta_units,
            analyst_budget=terms.analyst_budget,
            status=AgreementStatus.PROPOSED,
            approved_by=(caller.principal_id,) if caller.role is Role.PARTNER else (),
            proposer_id=caller.principal_id,
            expires_at=expires_at,
            allowed_columns=tuple(terms.allowed_columns),
            allowed_aggregations=tuple(terms.allowed_aggregations),
            min_group_size=terms.min_group_size,
            max_shared_identifiers=terms.max_shared_identifiers,
        )
        self.store.create_agreement(agreement)
        self.trail.record(
            "agreement_created",
            caller,
            agreement.agreement_id,
            {
                "purpose": terms.purpose,
                "total_epsilon": str(terms.total_epsilon),
                "datasets": len(terms.slots),
                "max_shared_identifiers": terms.max_shared_identifiers,
            },
        )
        log.info(
            "agreement created id=%s purpose=%s epsilon=%s",
            agreement.agreement_id,
            terms.purpose,
            terms.total_epsilon,
        )
        return agreement

    def _check_parties(self, slots: Sequence[DatasetSlot], analyst_ids: Sequence[str]) -> None:
        """Every slot names a partner, and at least one analyst is named, all known."""
        for slot in slots:
            check_name(slot.name, "dataset name")
            if not self._has_role(slot.partner_id, Role.PARTNER):
                raise InvalidArgumentError(f"{slot.partner_id!r} is not a partner")
        if not analyst_ids:
            raise InvalidArgumentError("name at least one analyst")
        for analyst_id in analyst_ids:
            if not self._has_role(analyst_id, Role.ANALYST):
                raise InvalidArgumentError(f"{analyst_id!r} is not an analyst")

    def _has_role(self, principal_id: str, role: Role) -> bool:
        try:
            return self.store.get_principal(principal_id).role is role
        except NotFoundError:
            return False

    def approve(self, caller: Principal, agreement_id: str, *, via: str = "explicit") -> Agreement:
        """A partner approves; when every partner has, a proposed or suspended one turns active."""
        for _ in range(APPROVAL_ATTEMPTS):
            agreement = participant(self.store, caller, agreement_id)
            status = _open_status(agreement)
            approved = tuple(sorted({*agreement.approved_by, caller.principal_id}))
            if (
                approved == tuple(sorted(agreement.approved_by))
                and status is AgreementStatus.ACTIVE
            ):
                return agreement
            done = set(approved) >= set(agreement.partner_ids)
            target = AgreementStatus.ACTIVE if done else agreement.status
            if self.store.update_agreement_state(
                agreement_id,
                agreement.status,
                target,
                approved,
                expected_approved_by=agreement.approved_by,
            ):
                if caller.principal_id not in agreement.approved_by:
                    self.trail.record(
                        "agreement_approved", caller, agreement_id, {"via": via, "active": done}
                    )
                return self.store.get_agreement(agreement_id)
        raise FailedPreconditionError("the agreement changed concurrently; retry")

    def suspend(self, caller: Principal, agreement_id: str) -> Agreement:
        """Any partner pauses an agreement; every partner must approve again to resume it."""
        return self._move(caller, agreement_id, AgreementStatus.SUSPENDED)

    def revoke(self, caller: Principal, agreement_id: str) -> Agreement:
        """Any partner ends an agreement for good: no query runs on it any more."""
        return self._move(caller, agreement_id, AgreementStatus.REVOKED)

    def _move(self, caller: Principal, agreement_id: str, target: AgreementStatus) -> Agreement:
        agreement = participant(self.store, caller, agreement_id)
        status = _open_status(agreement)
        if not self.store.update_agreement_state(
            agreement_id, agreement.status, target, (), expected_approved_by=agreement.approved_by
        ):
            raise FailedPreconditionError("the agreement changed concurrently; retry")
        self.trail.record(f"agreement_{target.value}", caller, agreement_id, {"from": status.value})
        return self.store.get_agreement(agreement_id)

    def get(self, caller: Principal, agreement_id: str) -> tuple[Agreement, BudgetState]:
        """An agreement and its budget, if the caller is party to it."""
        agreement = self.store.get_agreement(agreement_id)
        if not visible(caller, agreement):
            raise NotFoundError(f"agreement {agreement_id!r} not found")
        return agreement, self.store.get_budget(agreement_id)

    def budget(self, agreement_id: str) -> BudgetState:
        """An agreement's budget (no authorisation: for callers that already checked it)."""
        return self.store.get_budget(agreement_id)

    def list_for(self, caller: Principal) -> list[tuple[Agreement, BudgetState]]:
        """Agreements the caller is party to, with their budgets."""
        return [
            (agreement, self.budget(agreement.agreement_id))
            for agreement in self.store.list_agreements()
            if visible(caller, agreement)
        ]

    def slot_datasets(self, agreement: Agreement) -> dict[DatasetSlot, str]:
        """Dataset ids uploaded into the agreement's slots so far."""
        return {
            DatasetSlot(d.partner_id, d.name): d.dataset_id
            for d in self.store.list_datasets(agreement_id=agreement.agreement_id)
        }


def _open_status(agreement: Agreement) -> AgreementStatus:
    """The agreement's status now, refusing a revoked or expired one (nothing moves it)."""
    status = agreement.status_at(now())
    if status in (AgreementStatus.REVOKED, AgreementStatus.EXPIRED):
        raise FailedPreconditionError(f"agreement {agreement.agreement_id!r} is {status.value}")
    return status


def _utc(expires_at: str) -> str:
    """An expiry as a UTC ISO 8601 timestamp (second precision), or "" for none."""
    if not expires_at:
        return ""
    try:
        when = datetime.fromisoformat(expires_at)
    except ValueError:
        raise InvalidArgumentError("expires_at must be an ISO 8601 timestamp") from None
    return when.astimezone(UTC).replace(microsecond=0).isoformat()


def _check_budget(total: PrivacyLoss, delta_units: int, analyst_budget: PrivacyLoss | None) -> None:
    if total.micros <= 0:
        raise InvalidArgumentError("total epsilon must be positive")
    if not 0 <= delta_units < DELTA_UNITS:
        raise InvalidArgumentError("total delta must be in [0, 1)")
    if analyst_budget is not None and not 0 < analyst_budget.micros <= total.micros:
        raise InvalidArgumentError("the per-analyst budget must be positive and within the total")
