"""Query planning: resolve columns, public group keys, contribution bounds and the budget split.

Privacy unit: one person = one pseudonym, across every joined dataset. Adding or removing a
person changes at most `max_rows_per_person` joined rows, spread over at most
`max_groups_per_person` group cells; the sensitivities below follow from those bounds.
"""

from __future__ import annotations

import itertools
import math

from entremise.privacy.budget import Epsilon
from entremise.server.domain.errors import FailedPreconditionError, InvalidArgumentError
from entremise.server.domain.models import (
    AggregateKind,
    AggregatePlan,
    AggregateSpec,
    Agreement,
    CategoricalColumn,
    ColumnRef,
    Dataset,
    FilterOp,
    Measurement,
    NumericColumn,
    QueryPlan,
    QuerySpec,
    ResolvedFilter,
    check_name,
)

MAX_AGGREGATES = 16
MAX_GROUP_COLUMNS = 3
MAX_CELLS = 100_000
MAX_ROWS_PER_PERSON = 1_000
DEFAULT_MAX_ROWS_PER_PERSON = 10
DEFAULT_MAX_GROUPS_PER_PERSON = 1

PRIVACY_UNIT = "one person = one pseudonym across all joined datasets (add/remove)"


def _resolve(name: str, datasets: tuple[Dataset, ...]) -> ColumnRef:
    """Find `dataset.column` or an unambiguous bare `column` among the agreement's datasets."""
    if not name:
        raise InvalidArgumentError("a column name is required")
    if "." in name:
        dataset_name, column_name = name.split(".", 1)
        for index, dataset in enumerate(datasets):
            if dataset.name == dataset_name:
                column = dataset.schema.column(column_name)
                if column is None:
                    raise InvalidArgumentError(
                        f"unknown column {name!r}: dataset {dataset_name!r} declares "
                        f"{[c.name for c in dataset.schema.columns]}"
                    )
                return ColumnRef(index, dataset.name, column)
        raise InvalidArgumentError(
            f"unknown dataset {dataset_name!r} in column {name!r}; "
            f"the agreement joins {[d.name for d in datasets]}"
        )
    matches = [
        ColumnRef(i, d.name, c)
        for i, d in enumerate(datasets)
        for c in d.schema.columns
        if c.name == name
    ]
    if not matches:
        raise InvalidArgumentError(f"unknown column {name!r}")
    if len(matches) > 1:
        raise InvalidArgumentError(
            f"column {name!r} is ambiguous; use one of {[m.qualified for m in matches]}"
        )
    return matches[0]


def _resolve_filter(
    spec_column: str, op: FilterOp, values: tuple[str, ...], datasets: tuple[Dataset, ...]
) -> ResolvedFilter:
    ref = _resolve(spec_column, datasets)
    if op in (FilterOp.IN, FilterOp.NOT_IN):
        if not isinstance(ref.column, CategoricalColumn):
            raise InvalidArgumentError(
                f"filter {op} needs a categorical column, {ref.qualified} is numeric"
            )
        if not values:
            raise InvalidArgumentError(f"filter on {ref.qualified} needs at least one category")
        unknown = [v for v in values if v not in ref.column.categories]
        if unknown:
            raise InvalidArgumentError(
                f"filter on {ref.qualified}: {unknown} not among its declared categories"
            )
        return ResolvedFilter(ref, op, categories=tuple(dict.fromkeys(values)))
    if not isinstance(ref.column, NumericColumn):
        raise InvalidArgumentError(
            f"filter {op} needs a numeric column, {ref.qualified} is categorical"
        )
    if len(values) != 1:
        raise InvalidArgumentError(f"filter {op} on {ref.qualified} takes exactly one number")
    try:
        threshold = float(values[0])
    except ValueError:
        raise InvalidArgumentError(
            f"filter {op} on {ref.qualified}: {values[0]!r} is not a number"
        ) from None
    if not math.isfinite(threshold):
        raise InvalidArgumentError(f"filter {op} on {ref.qualified}: threshold must be finite")
    return ResolvedFilter(ref, op, threshold=threshold)


def _group_keys(
    group_by: tuple[ColumnRef, ...], filters: tuple[ResolvedFilter, ...]
) -> list[tuple[str, ...]]:
    """Cartesian product of the public categories, narrowed by categorical filters."""
    domains: list[list[str]] = []
    for ref in group_by:
        assert isinstance(ref.column, CategoricalColumn)
        allowed = list(ref.column.categories)
        for f in filters:
            if f.ref == ref and f.op is FilterOp.IN:
                allowed = [c for c in allowed if c in f.categories]
            elif f.ref == ref and f.op is FilterOp.NOT_IN:
                allowed = [c for c in allowed if c not in f.categories]
        if not allowed:
            raise InvalidArgumentError(f"filters leave no category of {ref.qualified} to group by")
        domains.append(allowed)
    count = math.prod(len(d) for d in domains)
    if count > MAX_CELLS:
        raise InvalidArgumentError(
            f"group-by would release {count} cells; the limit is {MAX_CELLS}"
        )
    return [tuple(k) for k in itertools.product(*domains)]


def _split_epsilon(spec: QuerySpec) -> list[Epsilon]:
    """Explicit shares stay as given; the rest of the query's epsilon is split evenly."""
    explicit = [a.epsilon for a in spec.aggregates]
    fixed = sum((e.micros for e in explicit if e is not None), 0)
    free = [i for i, e in enumerate(explicit) if e is None]
    if any(e is not None and e.micros == 0 for e in explicit):
        raise InvalidArgumentError("an aggregate's epsilon share must be positive")
    total = spec.epsilon.micros
    if not free:
        if total and total != fixed:
            raise InvalidArgumentError(
                f"aggregate epsilons add up to {Epsilon(fixed)}, "
                f"not the query epsilon {spec.epsilon}"
            )
        return [e for e in explicit if e is not None]
    if total <= fixed:
        raise InvalidArgumentError(
            f"query epsilon {spec.epsilon} leaves nothing for aggregates without an explicit share"
        )
    shares = Epsilon(total - fixed).split(len(free))
    if any(s.micros == 0 for s in shares):
        raise InvalidArgumentError("query epsilon is too small to split over its aggregates")
    out: list[Epsilon] = []
    for e in explicit:
        out.append(e if e is not None else shares.pop(0))
    return out


def plan_query(spec: QuerySpec, agreement: Agreement, datasets: tuple[Dataset, ...]) -> QueryPlan:
    """Validate a query against its agreement and the datasets' public schemas."""
    if len(datasets) != len(agreement.slots) or len(datasets) < 1:
        raise FailedPreconditionError("a dataset of this agreement is no longer available")
    if not spec.aggregates:
        raise InvalidArgumentError("a query needs at least one aggregate")
    if len(spec.aggregates) > MAX_AGGREGATES:
        raise InvalidArgumentError(f"a query may hold at most {MAX_AGGREGATES} aggregates")
    if spec.epsilon.micros == 0 and all(a.epsilon is None for a in spec.aggregates):
        raise InvalidArgumentError("query epsilon must be positive")
    if len(spec.group_by) > MAX_GROUP_COLUMNS:
        raise InvalidArgumentError(f"group by at most {MAX_GROUP_COLUMNS} columns")

    filters = tuple(_resolve_filter(f.column, f.op, f.values, datasets) for f in spec.filters)
    group_by: list[ColumnRef] = []
    for name in spec.group_by:
        ref = _resolve(name, datasets)
        if not isinstance(ref.column, CategoricalColumn):
            raise InvalidArgumentError(f"cannot group by numeric column {ref.qualified}")
        if ref in group_by:
            raise InvalidArgumentError(f"column {ref.qualified} appears twice in group_by")
        group_by.append(ref)
    keys = _group_keys(tuple(group_by), filters)

    rows = spec.max_rows_per_person or agreement.max_rows_per_person
    if not 1 <= rows <= MAX_ROWS_PER_PERSON:
        raise InvalidArgumentError(f"max_rows_per_person must be in [1, {MAX_ROWS_PER_PERSON}]")
    groups = spec.max_groups_per_person or agreement.max_groups_per_person
    if groups < 1:
        raise InvalidArgumentError("max_groups_per_person must be positive")
    if not any(a.kind is AggregateKind.COUNT for a in spec.aggregates):
        # Row counts and sums are bounded by the rows cap alone (L1 <= k x max|value|), so no
        # extra group cap is needed: k rows reach at most k cells.
        groups = len(keys)
    groups = min(groups, rows, len(keys))  # one group per row at most; never more than exist

    shares = _split_epsilon(spec)
    names: set[str] = set()
    plans: list[AggregatePlan] = []
    for agg, share in zip(spec.aggregates, shares, strict=True):
        plans.append(_plan_aggregate(agg, share, datasets, rows, groups, names))

    total = Epsilon(sum(p.epsilon.micros for p in plans))
    return QueryPlan(
        agreement=agreement,
        datasets=datasets,
        group_by=tuple(group_by),
        group_keys=tuple(keys),
        filters=filters,
        aggregates=tuple(plans),
        max_rows_per_person=rows,
        max_groups_per_person=groups,
        epsilon=total,
    )


def _plan_aggregate(
    agg: AggregateSpec,
    share: Epsilon,
    datasets: tuple[Dataset, ...],
    rows: int,
    groups: int,
    names: set[str],
) -> AggregatePlan:
    name = agg.name or (
        f"{agg.kind}_{agg.column}".replace(".", "_") if agg.column else str(agg.kind)
    )
    check_name(name, "aggregate name")
    if name in names:
        raise InvalidArgumentError(f"aggregate name {name!r} is used twice")
    names.add(name)
    if agg.kind in (AggregateKind.COUNT, AggregateKind.COUNT_ROWS):
        if agg.column:
            raise InvalidArgumentError(f"aggregate {name!r}: {agg.kind} takes no column")
        # A person adds 1 to each of at most `groups` cells (people), or k rows in total (rows).
        sensitivity = groups if agg.kind is AggregateKind.COUNT else rows
        component = str(agg.kind)
        spec = AggregateSpec(name, agg.kind, "", agg.epsilon)
        return AggregatePlan(spec, None, share, (Measurement(component, sensitivity, share),))
    ref = _resolve(agg.column, datasets)
    if not isinstance(ref.column, NumericColumn):
        raise InvalidArgumentError(
            f"aggregate {name!r}: {agg.kind} needs a numeric column, {ref.qualified} is categorical"
        )
    spec = AggregateSpec(name, agg.kind, ref.qualified, agg.epsilon)
    sum_sensitivity = max(1, rows * ref.column.max_units)
    if agg.kind is AggregateKind.SUM:
        return AggregatePlan(spec, ref, share, (Measurement("sum", sum_sensitivity, share),))
    if share.micros < 2:
        raise InvalidArgumentError(f"aggregate {name!r}: epsilon too small to split for a mean")
    sum_share, count_share = share.split(2)
    return AggregatePlan(
        spec,
        ref,
        share,
        (
            Measurement("sum", sum_sensitivity, sum_share),
            Measurement("value_rows", rows, count_share),
        ),
    )
