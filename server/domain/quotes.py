"""Quoted workloads: price several queries together, then run them with one debit, or none.

A quote plans every query of a workload (the same planner and rules as a preview), records the
workload with the data state its plans were made on, and spends nothing. Running it re-plans
against the current state and refuses if anything the price depended on changed (a dataset
version, a key context, a consent withdrawal, a plan); otherwise the store debits the whole
workload in one transaction, checked on the total, before any row is read, and each query is
then computed and released exactly as a single run is.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from entremise.privacy.budget import PrivacyLoss
from entremise.server.domain.access import require
from entremise.server.domain.admission import Admission
from entremise.server.domain.codec import spec_from_dict, spec_to_dict, summary_to_dict
from entremise.server.domain.errors import (
    BudgetExhaustedError,
    EntremiseError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from entremise.server.domain.ids import new_id, now
from entremise.server.domain.models import (
    Agreement,
    BudgetState,
    PlanSummary,
    Principal,
    QueryContext,
    QueryPlan,
    QuerySpec,
    Quote,
    Release,
    Role,
)
from entremise.server.domain.ports import AggregationEngine, DatasetFiles, Store
from entremise.server.domain.queries import (
    compute_release,
    plan_on,
    planned_versions,
    query_fingerprint,
    replay_key,
    still_current,
    withdrawn_people,
)
from entremise.server.domain.releasing import summarize
from entremise.server.domain.trail import AuditTrail

log = logging.getLogger(__name__)

MAX_WORKLOAD = 50  # queries per quote
QUOTE_LIFETIME = timedelta(hours=1)


@dataclass(frozen=True)
class QuotedWorkload:
    """What a quote tells the analyst: each query's plan and cost, the total, the expiry."""

    quote_id: str
    agreement_id: str
    plans: tuple[PlanSummary, ...]
    replayed: tuple[bool, ...]  # answered from the ledger at no cost (as of the quote)
    costs: tuple[PrivacyLoss, ...]
    total: PrivacyLoss
    delta_units: int
    remaining_before: PrivacyLoss  # what this analyst may still spend of the agreement
    remaining_after: PrivacyLoss
    created_at: str
    expires_at: str


@dataclass(frozen=True)
class WorkloadRun:
    """The releases of a run quote, in the workload's order, and the budget after."""

    releases: tuple[Release, ...]
    replayed: tuple[bool, ...]
    budget: BudgetState


class Quotes:
    """Quote a workload (free, reads no row); run a quote once (one debit, then release)."""

    def __init__(
        self,
        store: Store,
        files: DatasetFiles,
        engine: AggregationEngine,
        trail: AuditTrail,
        admission: Admission,
        lifetime: timedelta = QUOTE_LIFETIME,
    ) -> None:
        self.store = store
        self.files = files
        self.engine = engine
        self.trail = trail
        self.admission = admission
        self.lifetime = lifetime

    # -- quote ------------------------------------------------------------------------------

    def quote(self, caller: Principal, specs: list[QuerySpec]) -> QuotedWorkload:
        """Plan and price every query of a workload, record it, spend nothing."""
        require(caller, Role.ANALYST)
        if not specs:
            raise InvalidArgumentError("a workload needs at least one query")
        if len(specs) > MAX_WORKLOAD:
            raise InvalidArgumentError(f"a workload has at most {MAX_WORKLOAD} queries")
        agreement_ids = sorted({spec.agreement_id for spec in specs})
        if len(agreement_ids) != 1:
            raise InvalidArgumentError(
                f"all queries of a workload must belong to one agreement (got {agreement_ids})"
            )
        context = self._context(caller, agreement_ids[0])
        plans = _plans(context, specs)
        withdrawn = withdrawn_people(context)
        day = now()[:10]
        replayed = tuple(
            self.store.find_replay(
                context.agreement.agreement_id, replay_key(s, p, len(withdrawn), day)
            )
            is not None
            for s, p in zip(specs, plans, strict=True)
        )
        zero = type(context.budget.total).zero()
        costs = tuple(zero if r else p.epsilon for p, r in zip(plans, replayed, strict=True))
        total = sum(costs, start=zero)
        delta = sum(p.delta_units for p, r in zip(plans, replayed, strict=True) if not r)
        available = _available(context.budget, context.agreement, caller.principal_id)
        if total > available:
            self._refused(caller, context.agreement.agreement_id, "budget_exhausted", total, delta)
            raise _short(total, available, len(specs))
        summaries = _summaries(plans, replayed, available)
        created = now()
        expires = (datetime.fromisoformat(created) + self.lifetime).isoformat()
        document = {
            "queries": [spec_to_dict(s) for s in specs],
            "costs": [c.micros for c in costs],
            "replayed": list(replayed),
            "plans": [plan_digest(p) for p in plans],
            "state": data_state(plans[0], len(withdrawn)),
        }
        quote = Quote(
            quote_id=new_id("qt"),
            agreement_id=context.agreement.agreement_id,
            analyst_id=caller.principal_id,
            total=total,
            delta_units=delta,
            created_at=created,
            expires_at=expires,
            document=json.dumps(document, sort_keys=True),
        )
        self.store.create_quote(quote)
        self.trail.record(
            "quote",
            caller,
            quote.agreement_id,
            {
                "quote_id": quote.quote_id,
                "queries": len(specs),
                "epsilon": str(total),
                "measure": plans[0].measure.value,
                "delta_units": delta,
                "expires_at": expires,
            },
        )
        return QuotedWorkload(
            quote.quote_id,
            quote.agreement_id,
            summaries,
            replayed,
            costs,
            total,
            delta,
            available,
            available - total,
            created,
            expires,
        )

    # -- run --------------------------------------------------------------------------------

    def run(
        self, caller: Principal, quote_id: str, cancelled: Callable[[], bool] = lambda: False
    ) -> WorkloadRun:
        """Run a quote once: re-plan, refuse on any change, debit the whole, release each.

        Another analyst's quote answers exactly as an unknown one. The data state (dataset
        versions and key contexts, consent withdrawals) and every plan must be those of the
        quote; a query that was free as a replay must still be one. The store then reserves
        every release in one transaction, checked on the total (agreement and analyst), and
        marks the quote used; only after that are rows read. A failure computing one query
        marks that release failed (charged, as a single run), and the others still release.
        The workload takes one slot of the release gate, entered before the debit (see
        `Queries.run`); stopped by a shutdown, its releases not yet computed are credited back.
        """
        require(caller, Role.ANALYST)
        quote = self.store.find_quote(quote_id)
        if quote is None or quote.analyst_id != caller.principal_id:
            raise NotFoundError(f"quote {quote_id!r} not found")
        if quote.used_at:
            raise FailedPreconditionError(f"quote {quote_id!r} was already run")
        if now() > quote.expires_at:
            raise FailedPreconditionError(
                f"quote {quote_id!r} expired at {quote.expires_at}; ask for a new quote"
            )
        document = json.loads(quote.document)
        specs = [spec_from_dict(d) for d in document["queries"]]
        context = self._context(caller, quote.agreement_id)
        plans = _plans(context, specs)
        # The versions planned on are held while the workload runs (see `Queries.run`).
        with self.files.reading(planned_versions(plans[0])):
            return self._run_held(caller, quote, document, specs, context, plans, cancelled)

    def _run_held(
        self,
        caller: Principal,
        quote: Quote,
        document: dict[str, Any],
        specs: list[QuerySpec],
        context: QueryContext,
        plans: list[QueryPlan],
        cancelled: Callable[[], bool],
    ) -> WorkloadRun:
        """`run`, once the plans' versions are held."""
        quote_id = quote.quote_id
        withdrawn = withdrawn_people(context)
        changed = state_change(document["state"], data_state(plans[0], len(withdrawn)))
        if not changed and not still_current(self.store, plans[0]):
            changed = ["a dataset was replaced as the workload started"]
        if not changed:
            changed = [
                f"the plan of query {i} changed"
                for i, (old, plan) in enumerate(zip(document["plans"], plans, strict=True), 1)
                if old != plan_digest(plan)
            ]
        day = now()[:10]
        keys = [replay_key(s, p, len(withdrawn), day) for s, p in zip(specs, plans, strict=True)]
        previous = [self.store.find_replay(quote.agreement_id, k) for k in keys]
        if not changed:
            changed = [
                f"query {i} is no longer answered from the ledger (a new UTC day)"
                for i, (was, now_) in enumerate(zip(document["replayed"], previous, strict=True), 1)
                if was and now_ is None
            ]
        if changed:
            self._refused(caller, quote.agreement_id, "data_changed", quote.total, 0, quote_id)
            raise FailedPreconditionError(
                f"quote {quote_id!r} no longer holds: {'; '.join(changed)}; nothing was spent, "
                "ask for a new quote"
            )
        with self.admission.releases.slot((caller.principal_id, quote.agreement_id), cancelled):
            reserved, after, paid = self._reserve(caller, quote, specs, plans, previous, context)
            releases: list[Release] = []
            for i, (plan, key, earlier, held) in enumerate(
                zip(plans, keys, previous, reserved, strict=True)
            ):
                if earlier is not None:
                    releases.append(earlier)
                    continue
                assert held is not None
                try:
                    releases.append(compute_release(self, caller, plan, withdrawn, held, key))
                except UnavailableError:  # stopped by a shutdown: the rest never ran either
                    for later in reserved[i + 1 :]:
                        if later is not None:
                            self.store.cancel_release(later)
                    raise
        self.trail.record(
            "quote_run",
            caller,
            quote.agreement_id,
            {
                "quote_id": quote_id,
                "release_ids": [r.release_id for r in releases],
                "epsilon": str(paid),
                "replayed": sum(p is not None for p in previous),
            },
        )
        return WorkloadRun(tuple(releases), tuple(p is not None for p in previous), after)

    def _reserve(
        self,
        caller: Principal,
        quote: Quote,
        specs: list[QuerySpec],
        plans: list[QueryPlan],
        previous: list[Release | None],
        context: QueryContext,
    ) -> tuple[list[Release | None], BudgetState, PrivacyLoss]:
        """One all-or-nothing debit of every release the workload still has to pay for."""
        budget, agreement = context.budget, context.agreement
        created = now()
        remaining = _available(budget, agreement, caller.principal_id)
        reserved: list[Release | None] = []
        for spec, plan, earlier in zip(specs, plans, previous, strict=True):
            if earlier is not None:
                reserved.append(None)
                continue
            reserved.append(
                Release(
                    release_id=new_id("rel"),
                    agreement_id=quote.agreement_id,
                    analyst_id=caller.principal_id,
                    summary=summarize(plan, remaining),
                    results=(),
                    epsilon_spent=plan.epsilon,
                    created_at=created,
                    data_versions=tuple(plan.data_versions),
                    query_fingerprint=query_fingerprint(spec),
                    delta_units=plan.delta_units,
                    status="running",
                )
            )
            remaining = remaining - plan.epsilon if remaining >= plan.epsilon else remaining
        paid = [r for r in reserved if r is not None]
        zero = type(quote.total).zero()
        total = sum((r.epsilon_spent for r in paid), start=zero)
        delta = sum(r.delta_units for r in paid)
        try:
            after = self.store.reserve_workload(quote.quote_id, paid, created)
        except BudgetExhaustedError:
            self._refused(
                caller, quote.agreement_id, "budget_exhausted", total, delta, quote.quote_id
            )
            left = _available(
                self.store.get_budget(quote.agreement_id), agreement, caller.principal_id
            )
            if total <= left:  # the delta is what is short: the store's message says so
                raise
            raise _short(total, left, len(specs)) from None
        # State the budget as it was just before this transaction, then each query's share.
        left = after.remaining + total
        for i, held in enumerate(reserved):
            if held is None:
                continue
            cost = held.epsilon_spent
            reserved[i] = replace(
                held,
                summary=replace(held.summary, remaining_before=left, remaining_after=left - cost),
            )
            left = left - cost
            self.trail.record(
                "release",
                caller,
                quote.agreement_id,
                {
                    "release_id": held.release_id,
                    "epsilon": str(cost),
                    "measure": plans[i].measure.value,
                    "delta_units": held.delta_units,
                    "quote_id": quote.quote_id,
                },
            )
        return reserved, after, total

    # -- shared -----------------------------------------------------------------------------

    def _context(self, caller: Principal, agreement_id: str) -> QueryContext:
        """The agreement's query context, if the caller is one of its analysts."""
        context = self.store.query_context(agreement_id)
        if caller.principal_id not in context.agreement.analyst_ids:
            raise NotFoundError(f"agreement {agreement_id!r} not found")
        return context

    def _refused(
        self,
        caller: Principal,
        agreement_id: str,
        reason: str,
        total: PrivacyLoss,
        delta_units: int,
        quote_id: str = "",
    ) -> None:
        """Record a quote or a run refused before any data was read."""
        detail: dict[str, Any] = {
            "reason": reason,
            "epsilon": str(total),
            "measure": total.measure.value,
            "delta_units": delta_units,
        }
        if quote_id:
            detail["quote_id"] = quote_id
        self.trail.record("quote_refused", caller, agreement_id, detail)


def _plans(context: QueryContext, specs: list[QuerySpec]) -> list[QueryPlan]:
    """Every query planned on one context; a refusal names the query it is about."""
    plans = []
    for i, spec in enumerate(specs, 1):
        try:
            plans.append(plan_on(context, spec))
        except EntremiseError as exc:
            if len(specs) == 1 or isinstance(exc, BudgetExhaustedError):
                raise
            raise type(exc)(f"query {i}: {exc.message}") from None
    return plans


def _available(budget: BudgetState, agreement: Agreement, analyst_id: str) -> PrivacyLoss:
    """What this analyst may still spend: the agreement's remainder, within the analyst's cap.

    An analyst who has spent nothing yet is not among the budget's analysts: her cap is whole.
    """
    loss = type(budget.total)
    spent = next((a.spent.micros for a in budget.analysts if a.analyst_id == analyst_id), 0)
    own = loss(max(agreement.analyst_cap.micros - spent, 0))
    return min(budget.remaining, own)


def _short(total: PrivacyLoss, available: PrivacyLoss, queries: int) -> BudgetExhaustedError:
    """The workload does not fit: its total, what is left, and by how much it is short."""
    return BudgetExhaustedError(
        requested=f"{total} for the workload of {queries} queries",
        remaining=f"{available} (short by {total - available})",
    )


def _summaries(
    plans: list[QueryPlan], replayed: tuple[bool, ...], available: PrivacyLoss
) -> tuple[PlanSummary, ...]:
    """Each plan's summary, the remaining budget running down the workload in order."""
    summaries = []
    left = available
    for plan, free in zip(plans, replayed, strict=True):
        summary = summarize(plan, left)
        if free:
            summary = replace(summary, remaining_after=left)
        else:
            left = summary.remaining_after
        summaries.append(summary)
    return tuple(summaries)


def plan_digest(plan: QueryPlan) -> str:
    """What a plan commits to (cost, cells, mechanisms, bounds), without the budget left."""
    summary = summary_to_dict(summarize(plan, plan.epsilon))
    summary.pop("remaining_before")
    summary.pop("remaining_after")
    canonical = {"summary": summary, "groups": [list(k) for k in plan.group_keys]}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def data_state(plan: QueryPlan, withdrawals: int) -> dict[str, Any]:
    """The data state a replay key uses: each slot's dataset version and key context."""
    return {
        "datasets": {d.name: [d.dataset_id, d.version, d.key_fingerprint] for d in plan.datasets},
        "withdrawals": withdrawals,
    }


def state_change(quoted: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What changed between two data states, in plain words (empty if nothing did)."""
    changes = []
    for name, (dataset_id, version, fingerprint) in sorted(quoted["datasets"].items()):
        now_id, now_version, now_fingerprint = current["datasets"].get(name, ("", 0, ""))
        if now_id != dataset_id:
            changes.append(f"dataset {name!r} was deleted and uploaded again")
        elif now_version != version:
            changes.append(
                f"dataset {name!r} is at version {now_version}, the quote priced version "
                f"{version} (a new upload or an erasure)"
            )
        elif now_fingerprint != fingerprint:
            changes.append(f"dataset {name!r} is under a new key context")
    if current["withdrawals"] != quoted["withdrawals"]:
        # Never how many: a count of people who withdrew is about people, and an analyst
        # sees nothing about people outside a mechanism (that the state changed, replays
        # already show).
        changes.append("consent was withdrawn since the quote")
    return changes
