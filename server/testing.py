"""Exact, pre-noise views of a running hub, for tests and benchmarks only.

Never wired to the API: what these return is exactly what the mechanisms protect. They live
outside the hub's use cases so that no production path can reach them by mistake.
"""

from __future__ import annotations

from entremise.server.domain.errors import NotFoundError
from entremise.server.domain.hub import Hub
from entremise.server.domain.models import ExactAggregates, QueryPlan, QuerySpec
from entremise.server.domain.queries import exact_aggregates as _exact
from entremise.server.domain.queries import plan_on, withdrawn_people


def plan(hub: Hub, spec: QuerySpec) -> QueryPlan:
    """Resolve a query against its agreement and current datasets, with no authorisation."""
    agreement = hub.store.get_agreement(spec.agreement_id)
    if agreement is None:
        raise NotFoundError(f"agreement {spec.agreement_id!r} not found")
    return plan_on(hub.store, agreement, spec)


def exact_aggregates(
    hub: Hub, plan: QueryPlan, withdrawn: set[str] | None = None
) -> ExactAggregates:
    """The plan's contribution-bounded aggregates before noise (withdrawals applied)."""
    gone = withdrawn_people(hub.store, plan) if withdrawn is None else withdrawn
    return _exact(hub.files, hub.engine, plan, gone)
