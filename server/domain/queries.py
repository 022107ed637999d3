"""Queries: an analyst previews the cost and accuracy of a query, then runs it as a release.

The order of a release is the guarantee: authorise and plan from public inputs, debit the
budget atomically, and only then read rows; whatever happens once rows are read is paid for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any, Protocol

from entremise.server.domain.access import require
from entremise.server.domain.admission import Admission, IdenticalRequests
from entremise.server.domain.errors import (
    AlreadyExistsError,
    BudgetExhaustedError,
    ClientGoneError,
    ComputationStopped,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ReleaseFailedError,
    UnavailableError,
)
from entremise.server.domain.ids import check_request_id, new_id, now
from entremise.server.domain.keys import context_fingerprint
from entremise.server.domain.models import (
    AgreementStatus,
    BudgetState,
    ExactAggregates,
    PlanSummary,
    Principal,
    QueryContext,
    QueryPlan,
    QuerySpec,
    Release,
    Role,
)
from entremise.server.domain.planner import plan_query
from entremise.server.domain.ports import AggregationEngine, DatasetFiles, Store
from entremise.server.domain.releasing import draw, summarize
from entremise.server.domain.trail import AuditTrail

log = logging.getLogger(__name__)

#: How often a request waiting for its earlier request id looks whether its client is there.
_POLL_S = 0.05
#: Identical requests that may wait for one computing (more are refused: busy, retry).
_MAX_IDENTICAL_WAITING = 4


class Queries:
    """Preview (free, reads no row) and run (debit, compute, perturb, record) queries."""

    def __init__(
        self,
        store: Store,
        files: DatasetFiles,
        engine: AggregationEngine,
        trail: AuditTrail,
        admission: Admission,
    ) -> None:
        self.store = store
        self.files = files
        self.engine = engine
        self.trail = trail
        self.admission = admission
        self.identical = IdenticalRequests(_MAX_IDENTICAL_WAITING)

    def preview(self, caller: Principal, spec: QuerySpec) -> PlanSummary:
        """Cost and expected accuracy; spends nothing and reads no row."""
        plan, budget, _ = self._authorised(caller, spec)
        return summarize(plan, budget.remaining)

    def run(
        self,
        caller: Principal,
        spec: QuerySpec,
        cancelled: Callable[[], bool] = lambda: False,
        request_id: str = "",
    ) -> tuple[Release, BudgetState, bool]:
        """Debit, compute, perturb, and store the release.

        The agreement and the analyst are debited, with the release recorded as running, in one
        transaction BEFORE any row is read: if a debit is refused nothing is read and nothing
        leaves, and whatever happens once data is read is paid for. Should the computation
        fail anyway (it is written to be total: clamped values, saturated sums, union-find
        linking), the release is marked failed, keeps its debit, and the analyst gets one fixed
        message: a failure that occurred only on some data would otherwise reveal it for free.
        An identical query on the same data state is answered from the ledger at no cost (the
        third value says so): re-publishing a released value is post-processing; an identical
        query still computing is waited for, then answered so (a client retrying after its
        deadline gets the release it was charged for, at no second cost).

        A `request_id` (the client's, unique per analyst) makes a retry safe whatever changed
        meanwhile: the release it reserved is waited for while it computes and returned
        (a failed one answers as it did), never debited twice.

        Releases run in the hub's bounded, fair `admission.releases` gate, entered before the
        debit: a full queue, a draining hub or a client gone while queued (`cancelled()`) is
        refused with nothing spent. A release the hub stops mid-computation (shutdown) is
        cancelled and credited back: nothing was drawn, nothing left.
        """
        check_request_id(request_id)
        while True:
            try:
                plan, budget, withdrawn = self._authorised(caller, spec)
            except PermissionDeniedError as exc:
                if caller.role is Role.ANALYST:  # the agreement's own analyst, out of scope
                    self.trail.record(
                        "release_refused",
                        caller,
                        spec.agreement_id,
                        {"reason": "outside_agreement_scope", "detail": exc.message},
                    )
                raise
            # The versions planned on are held from now on (a new upload removes the one it
            # replaces only once no release reads it); one replaced before the hold: re-plan.
            with self.files.reading(planned_versions(plan)):
                if still_current(self.store, plan):
                    return self._run_planned(
                        caller, spec, plan, budget, withdrawn, cancelled, request_id
                    )

    def _run_planned(
        self,
        caller: Principal,
        spec: QuerySpec,
        plan: QueryPlan,
        budget: BudgetState,
        withdrawn: set[str],
        cancelled: Callable[[], bool],
        request_id: str,
    ) -> tuple[Release, BudgetState, bool]:
        """`run`, once the plan's versions are held."""
        earlier = self._requested(caller, spec, request_id, cancelled)
        if earlier is not None:
            return earlier, self.store.get_budget(earlier.agreement_id), True
        key = replay_key(spec, plan, len(withdrawn), now()[:10])
        agreement_id = plan.agreement.agreement_id
        while True:  # an identical release in flight is waited for, then replayed
            previous = self.store.find_replay(agreement_id, key)
            if previous is not None:
                self.trail.record(
                    "release_replayed", caller, agreement_id, {"release_id": previous.release_id}
                )
                return previous, self.store.get_budget(agreement_id), True
            if self.identical.claim((agreement_id, key), cancelled):
                break
        try:
            with self.admission.releases.slot((caller.principal_id, agreement_id), cancelled):
                try:
                    reserved, after = self._reserve(caller, spec, plan, budget, request_id)
                except AlreadyExistsError:  # the same request id, reserved a moment ago
                    earlier = self._requested(caller, spec, request_id, cancelled)
                    if earlier is None:
                        raise
                    return earlier, self.store.get_budget(earlier.agreement_id), True
                release = compute_release(self, caller, plan, withdrawn, reserved, key)
        finally:
            self.identical.done((agreement_id, key))
        if release.status == "failed":
            raise ReleaseFailedError(str(plan.epsilon))
        log.info(
            "release committed id=%s agreement=%s %s=%s",
            release.release_id,
            release.agreement_id,
            plan.measure.value,
            release.epsilon_spent,
        )
        return release, after, False

    def _requested(
        self, caller: Principal, spec: QuerySpec, request_id: str, cancelled: Callable[[], bool]
    ) -> Release | None:
        """The release this request id already reserved, once it finished; None if none.

        The id must name the same query (else InvalidArgumentError); a failed release answers
        as it did (ReleaseFailedError, still charged once).
        """
        if not request_id:
            return None
        earlier = self.store.find_request(caller.principal_id, request_id)
        while earlier is not None and earlier.status == "running":
            if cancelled():
                raise ClientGoneError("releases")
            time.sleep(_POLL_S)
            earlier = self.store.find_request(caller.principal_id, request_id)
        if earlier is None:  # none, or cancelled by a shutdown (credited back): run afresh
            return None
        if earlier.query_fingerprint != query_fingerprint(spec):
            raise InvalidArgumentError(
                f"request_id {request_id!r} was used for another query: use a new one"
            )
        if earlier.status == "failed":
            raise ReleaseFailedError(str(earlier.epsilon_spent))
        self.trail.record(
            "release_replayed", caller, earlier.agreement_id, {"release_id": earlier.release_id}
        )
        return earlier

    def _reserve(
        self,
        caller: Principal,
        spec: QuerySpec,
        plan: QueryPlan,
        budget: BudgetState,
        request_id: str = "",
    ) -> tuple[Release, BudgetState]:
        """Debit the agreement and the analyst and record the release as running, atomically."""
        if plan.epsilon > budget.remaining:
            self._refused(caller, plan, "budget_exhausted")
            raise BudgetExhaustedError(requested=str(plan.epsilon), remaining=str(budget.remaining))
        reserved = Release(
            release_id=new_id("rel"),
            agreement_id=plan.agreement.agreement_id,
            analyst_id=caller.principal_id,
            summary=summarize(plan, budget.remaining),
            results=(),
            epsilon_spent=plan.epsilon,
            created_at=now(),
            data_versions=tuple(plan.data_versions),
            query_fingerprint=query_fingerprint(spec),
            delta_units=plan.delta_units,
            status="running",
            request_id=request_id,
        )
        try:
            after = self.store.reserve_release(reserved)  # conditional debits + insert
        except BudgetExhaustedError:
            self._refused(caller, plan, "budget_exhausted")
            raise
        # The remaining budget seen before this transaction may be stale; state what it is now.
        reserved = replace(
            reserved,
            summary=replace(
                reserved.summary,
                remaining_before=after.remaining + plan.epsilon,
                remaining_after=after.remaining,
            ),
        )
        self.trail.record(
            "release",
            caller,
            reserved.agreement_id,
            {
                "release_id": reserved.release_id,
                "epsilon": str(reserved.epsilon_spent),
                "measure": plan.measure.value,
                "delta_units": plan.delta_units,
            },
        )
        return reserved, after

    def _refused(self, caller: Principal, plan: QueryPlan, reason: str) -> None:
        """Record a release refused before any data was read (for compliance: what was tried)."""
        self.trail.record(
            "release_refused",
            caller,
            plan.agreement.agreement_id,
            {
                "reason": reason,
                "epsilon": str(plan.epsilon),
                "measure": plan.measure.value,
                "delta_units": plan.delta_units,
            },
        )

    def _authorised(
        self, caller: Principal, spec: QuerySpec
    ) -> tuple[QueryPlan, BudgetState, set[str]]:
        """The caller is one of the agreement's analysts: its plan, budget and withdrawals.

        All three come from one store read (`query_context`), so they describe one state.
        """
        require(caller, Role.ANALYST)
        context = self.store.query_context(spec.agreement_id)
        if caller.principal_id not in context.agreement.analyst_ids:
            raise NotFoundError(f"agreement {spec.agreement_id!r} not found")
        return plan_on(context, spec), context.budget, withdrawn_people(context)


class _Room(Protocol):
    store: Store
    files: DatasetFiles
    engine: AggregationEngine
    trail: AuditTrail


def compute_release(
    room: _Room, caller: Principal, plan: QueryPlan, withdrawn: set[str], held: Release, key: str
) -> Release:
    """Read, aggregate, perturb and store a reserved (debited) release; it is returned final.

    A failure is `failed` and stays charged (it may depend on the data). An engine stopped by
    the hub's shutdown (`ComputationStopped`) produced nothing, so the release is cancelled
    and credited back, and the caller is told to retry (UnavailableError).
    """
    try:
        exact = exact_aggregates(room.files, room.engine, plan, withdrawn)
        summary, results = draw(plan, exact, held.summary)
    except ComputationStopped:
        if room.store.cancel_release(held):
            room.trail.record(
                "release_cancelled",
                caller,
                held.agreement_id,
                {"release_id": held.release_id, "epsilon": str(held.epsilon_spent)},
            )
            raise UnavailableError(
                "the hub is shutting down: the release was stopped before it computed anything "
                "and its cost was credited back; retry once the hub is back"
            ) from None
        raise
    except Exception:
        log.exception("release %s failed after its debit", held.release_id)
        failed = replace(held, status="failed")
        room.store.finish_release(failed)
        room.trail.record(
            "release_failed", caller, held.agreement_id, {"release_id": held.release_id}
        )
        return failed
    release = replace(held, summary=summary, results=results, replay_key=key, status="released")
    room.store.finish_release(release)
    return release


def plan_on(context: QueryContext, spec: QuerySpec) -> QueryPlan:
    """Resolve a query against an active agreement and its current datasets (public inputs)."""
    agreement = context.agreement
    status = agreement.status_at(now())
    if status is not AgreementStatus.ACTIVE:
        waiting = sorted(set(agreement.partner_ids) - set(agreement.approved_by))
        hint = f" (awaiting approval by {waiting})" if status is AgreementStatus.PROPOSED else ""
        raise FailedPreconditionError(
            f"agreement {agreement.agreement_id!r} is {status.value}{hint}"
        )
    _, fingerprint = context_fingerprint(agreement, context.public_keys)
    datasets = []
    for slot, dataset in zip(agreement.slots, context.datasets, strict=True):
        if dataset is None:
            raise FailedPreconditionError(
                f"dataset {slot.name!r} of partner {slot.partner_id!r} is not uploaded "
                "(or was deleted)"
            )
        if dataset.key_fingerprint != fingerprint:
            raise FailedPreconditionError(
                f"dataset {slot.name!r} was pseudonymised under a previous key context "
                "(a partner rotated its key): it must be uploaded again"
            )
        datasets.append(dataset)
    return plan_query(spec, agreement, tuple(datasets))


def withdrawn_people(context: QueryContext) -> set[str]:
    """Every pseudonym withdrawn from the agreement, by any partner."""
    return {p for pseudonyms in context.withdrawn.values() for p in pseudonyms}


def planned_versions(plan: QueryPlan) -> list[tuple[str, int]]:
    """The (dataset id, version)s a plan reads."""
    return [(d.dataset_id, d.version) for d in plan.datasets]


def still_current(store: Store, plan: QueryPlan) -> bool:
    """Whether every version the plan reads is still its dataset's current one."""
    try:
        return all(store.get_dataset(d.dataset_id).version == d.version for d in plan.datasets)
    except NotFoundError:  # deleted since: planning again says so
        return False


def exact_aggregates(
    files: DatasetFiles, engine: AggregationEngine, plan: QueryPlan, withdrawn: set[str]
) -> ExactAggregates:
    """Read the plan's datasets and compute its contribution-bounded exact aggregates."""
    versions = planned_versions(plan)
    with files.reading(versions):  # a version replaced meanwhile is removed after
        sources = [files.source(d, v) for d, v in versions]
        return engine.compute(plan, sources, withdrawn, now())


def query_fingerprint(spec: QuerySpec) -> str:
    """Canonical hash of a query, for the ledger and for replays."""
    document = asdict(spec)
    document["filters"] = [_canonical_filter(f) for f in document["filters"]]
    canonical = json.dumps(document, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _canonical_filter(f: dict[str, Any]) -> dict[str, Any]:
    """A filter as hashed: a leaf without its empty tree fields (older fingerprints stay valid)."""
    if not (f["any_of"] or f["all_of"]):
        return {k: v for k, v in f.items() if k not in ("any_of", "all_of")}
    return {
        **f,
        "any_of": [_canonical_filter(t) for t in f["any_of"]],
        "all_of": [_canonical_filter(t) for t in f["all_of"]],
    }


def replay_key(spec: QuerySpec, plan: QueryPlan, withdrawals: int, day: str) -> str:
    """Canonical query + data state: dataset versions and key context, withdrawals, UTC day.

    Consent expiry is date-granular here: a replay is only served within the same UTC day.
    """
    state = {
        "query": query_fingerprint(spec),
        "datasets": [(d.dataset_id, d.version, d.key_fingerprint) for d in plan.datasets],
        "withdrawals": withdrawals,
        "day": day,
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
