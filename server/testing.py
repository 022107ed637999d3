"""Exact, pre-noise views of a running hub, for tests and benchmarks only.

Never wired to the API: what these return is exactly what the mechanisms protect. They live
outside the hub's use cases so that no production path can reach them by mistake.
"""

from __future__ import annotations

from entremise.server.domain.hub import Hub
from entremise.server.domain.models import ExactAggregates, QueryPlan, QuerySpec
from entremise.server.domain.queries import exact_aggregates as _exact
from entremise.server.domain.queries import plan_on, withdrawn_people


def plan(hub: Hub, spec: QuerySpec) -> QueryPlan:
    """Resolve a query against its agreement and current datasets, with no authorisation."""
    return plan_on(hub.store.query_context(spec.agreement_id), spec)


def exact_aggregates(
    hub: Hub, plan: QueryPlan, withdrawn: set[str] | None = None
) -> ExactAggregates:
    """The plan's contribution-bounded aggregates before noise (withdrawals applied)."""
    if withdrawn is None:
        withdrawn = withdrawn_people(hub.store.query_context(plan.agreement.agreement_id))
    return _exact(hub.files, hub.engine, plan, withdrawn)
