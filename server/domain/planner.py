"""Query planning: resolve columns, public group keys, contribution bounds and the budget split.

Privacy unit: one person, i.e. all their records, linked by the identifiers they share; the
neighbouring relation and the sensitivities that follow from it live in `sensitivity`. After
the join each unit keeps at most `max_rows_per_person` rows in at most
`max_groups_per_person` group cells, and one person can change at most S + 1 units.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
from dataclasses import dataclass, replace
from fractions import Fraction

from entremise.privacy.budget import PrivacyLoss, Rho
from entremise.privacy.mechanisms import MechanismError, share_for_accuracy
from entremise.server.domain import derived
from entremise.server.domain.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
)
from entremise.server.domain.models import (
    DELTA_UNITS,
    QUANTILE_CANDIDATES,
    AggregateKind,
    AggregatePlan,
    AggregateSpec,
    Agreement,
    BudgetKind,
    CategoricalColumn,
    ColumnRef,
    Dataset,
    DateColumn,
    Discovery,
    FilterOp,
    FilterSpec,
    Literal,
    Measurement,
    NumericColumn,
    QueryPlan,
    QuerySpec,
    ResolvedFilter,
    TextColumn,
    check_name,
)
from entremise.server.domain.sensitivity import (
    Neighbours,
    UnitContribution,
    count_unit,
    rows_unit,
    sum_unit,
)

MAX_AGGREGATES = 16
MAX_GROUP_COLUMNS = 3
MAX_CELLS = 100_000
MAX_ROWS_PER_PERSON = 1_000
DEFAULT_MAX_ROWS_PER_PERSON = 10
#: 0 = "auto": a query grouped by public columns lets each person count in every cell of its
#: grouping (up to the rows cap), so no count is cut; a discovered grouping uses 1.
AUTO_GROUPS = 0
DEFAULT_MAX_GROUPS_PER_PERSON = AUTO_GROUPS


def privacy_unit(shared_identifiers: int) -> str:
    """The neighbouring relation in one line, as plans and releases state it."""
    plural = "identifier" if shared_identifiers == 1 else "identifiers"
    return (
        "one person (add/remove all their records, linked by shared identifiers), with at "
        f"most {shared_identifiers} {plural} also carried by other people's records"
    )


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
    spec: FilterSpec, datasets: tuple[Dataset, ...], depth: int = 0
) -> ResolvedFilter:
    """A leaf checked against its column's public domain, or an OR / AND node of one dataset."""
    if spec.any_of or spec.all_of:
        terms = tuple(_resolve_filter(t, datasets, depth + 1) for t in (*spec.any_of, *spec.all_of))
        if not terms:
            raise InvalidArgumentError("an OR / AND filter needs at least one condition")
        names = sorted({leaf.ref.dataset_name for t in terms for leaf in t.leaves})
        if len(names) > 1:
            word = "OR" if spec.any_of else "AND"
            raise InvalidArgumentError(
                f"a filter's {word} mixes datasets {names}: each condition may only combine "
                "columns of one dataset (filters apply to each dataset's rows before the join)"
            )
        if spec.any_of:
            return ResolvedFilter(terms[0].leaves[0].ref, FilterOp.IN, any_of=terms)
        return ResolvedFilter(terms[0].leaves[0].ref, FilterOp.IN, all_of=terms)
    return _resolve_leaf(spec.column, spec.op, spec.values, datasets)


def _resolve_leaf(
    spec_column: str, op: FilterOp, values: tuple[str, ...], datasets: tuple[Dataset, ...]
) -> ResolvedFilter:
    ref = _resolve(spec_column, datasets)
    listed = op in (FilterOp.IN, FilterOp.NOT_IN)
    if isinstance(ref.column, TextColumn | CategoricalColumn):
        if not listed:
            raise InvalidArgumentError(
                f"filter {op} needs a numeric or date column, {ref.qualified} is categorical"
            )
        if not values:
            raise InvalidArgumentError(f"filter on {ref.qualified} needs at least one value")
        if isinstance(ref.column, CategoricalColumn):
            unknown = [v for v in values if v not in ref.column.categories]
            if unknown:
                raise InvalidArgumentError(
                    f"filter on {ref.qualified}: {unknown} not among its declared categories"
                )
        return ResolvedFilter(ref, op, literals=tuple(dict.fromkeys(values)))
    if listed and not values:
        raise InvalidArgumentError(f"filter on {ref.qualified} needs at least one value")
    if not listed and len(values) != 1:
        what = "date" if isinstance(ref.column, DateColumn) else "number"
        raise InvalidArgumentError(f"filter {op} on {ref.qualified} takes exactly one {what}")
    literals = tuple(dict.fromkeys(_literal(ref, op, v) for v in values))
    return ResolvedFilter(ref, op, literals=literals)


def _literal(ref: ColumnRef, op: FilterOp, value: str) -> Literal:
    """A filter value as the engine compares it: a finite number, a date or a UTC timestamp."""
    column = ref.column
    if isinstance(column, DateColumn):
        try:
            if column.timestamp:
                moment = dt.datetime.fromisoformat(value)
                if moment.tzinfo is not None:
                    moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
                return moment
            return dt.date.fromisoformat(value)
        except ValueError:
            raise InvalidArgumentError(
                f"filter {op} on {ref.qualified}: {value!r} is not an ISO date (YYYY-MM-DD)"
            ) from None
    try:
        number = float(value)
    except ValueError:
        raise InvalidArgumentError(
            f"filter {op} on {ref.qualified}: {value!r} is not a number"
        ) from None
    if not math.isfinite(number):
        raise InvalidArgumentError(f"filter {op} on {ref.qualified}: values must be finite")
    return number


def _group_keys(
    group_by: tuple[ColumnRef, ...], filters: tuple[ResolvedFilter, ...]
) -> list[tuple[str, ...]]:
    """Cartesian product of the public cells, narrowed by the top-level filters on each."""
    domains: list[list[str]] = []
    for ref in group_by:
        # Only a comparison every row must pass (not one inside an OR / AND) narrows cells.
        own = [
            f for f in filters if not (f.any_of or f.all_of) and f.ref.qualified == ref.qualified
        ]
        if ref.derivation is not None:
            comparisons = [
                (f.op, f.literals[0]) for f in own if f.op not in (FilterOp.IN, FilterOp.NOT_IN)
            ]
            cells = derived.domain(ref.column, ref.derivation, comparisons)
            if not cells:
                raise InvalidArgumentError(f"filters leave no period of {ref.label} to group by")
            domains.append(cells)
            continue
        assert isinstance(ref.column, CategoricalColumn)
        allowed = list(ref.column.categories)
        for f in own:
            if f.op is FilterOp.IN:
                allowed = [c for c in allowed if c in f.literals]
            elif f.op is FilterOp.NOT_IN:
                allowed = [c for c in allowed if c not in f.literals]
        if not allowed:
            raise InvalidArgumentError(f"filters leave no category of {ref.qualified} to group by")
        domains.append(allowed)
    count = math.prod(len(d) for d in domains)
    if count > MAX_CELLS:
        raise InvalidArgumentError(
            f"group-by would release {count} cells; the limit is {MAX_CELLS}"
        )
    return [tuple(k) for k in itertools.product(*domains)]


def _split(total: PrivacyLoss, fixed: list[PrivacyLoss | None], measure: str) -> list[PrivacyLoss]:
    """Fixed shares stay as given; the rest of the query's budget is split evenly."""
    loss = type(total)
    used = sum((e.micros for e in fixed if e is not None), 0)
    free = [i for i, e in enumerate(fixed) if e is None]
    if any(e is not None and e.micros == 0 for e in fixed):
        raise InvalidArgumentError(f"an aggregate's {measure} share must be positive")
    if not free:
        if total.micros and total.micros != used:
            raise InvalidArgumentError(
                f"aggregate {measure}s add up to {loss(used)}, not the query {measure} {total}"
            )
        return [e for e in fixed if e is not None]
    if total.micros <= used:
        raise InvalidArgumentError(
            f"query {measure} {total} leaves nothing for aggregates without an explicit share"
        )
    shares = loss(total.micros - used).split(len(free))
    if any(s.micros == 0 for s in shares):
        raise InvalidArgumentError(f"query {measure} is too small to split over its aggregates")
    return [e if e is not None else shares.pop(0) for e in fixed]


def _query_budget(spec: QuerySpec, agreement: Agreement) -> tuple[PrivacyLoss, str]:
    """The query's total, in the agreement's measure (the other measure's field must be unset)."""
    if agreement.budget_kind is BudgetKind.ZCDP:
        if spec.epsilon.micros:
            raise InvalidArgumentError("this agreement counts zCDP rho: give rho, not epsilon")
        return spec.rho or Rho.zero(), "rho"
    if spec.rho is not None and spec.rho.micros:
        raise InvalidArgumentError("this agreement counts pure epsilon: give epsilon, not rho")
    return spec.epsilon, "epsilon"


@dataclass(frozen=True)
class _Draft:
    """An aggregate's resolved column and per-unit-budget sensitivities, before the split."""

    spec: AggregateSpec
    ref: ColumnRef | None
    components: tuple[tuple[str, int, float], ...]  # (component, L1 or Linf, L2)


def plan_query(spec: QuerySpec, agreement: Agreement, datasets: tuple[Dataset, ...]) -> QueryPlan:
    """Validate a query against its agreement and the datasets' public schemas.

    Every step reads public inputs only: the query, the agreement's terms and the schemas.
    """
    total, measure_name = _check_shape(spec, agreement, datasets)
    filters = tuple(_resolve_filter(f, datasets) for f in spec.filters)
    group_by, private = _resolve_grouping(spec, datasets)
    keys = [] if private else _group_keys(tuple(group_by), filters)
    rows, groups = _contribution_bounds(spec, agreement, keys, bool(private))

    names: set[str] = set()
    relation = Neighbours(agreement.max_shared_identifiers)
    cells = None if private else len(keys)
    drafts = [_draft(a, datasets, rows, groups, relation, cells, names) for a in spec.aggregates]
    _check_scope(agreement, drafts, group_by, filters)
    fixed = [_fixed_share(d, agreement, measure_name) for d in drafts]
    if private:
        _check_discovery(spec, agreement, private[0])
        fixed.append(None)  # the keys take an even share of the rest
    shares = _split(total, fixed, measure_name)
    discovery = None
    if private:
        discovery = Discovery(
            private[0], shares.pop(), spec.delta_units, groups, relation.shared_identifiers
        )
    plans = [_finish(d, share) for d, share in zip(drafts, shares, strict=True)]
    spent = sum(p.epsilon.micros for p in plans) + (discovery.epsilon.micros if discovery else 0)
    return QueryPlan(
        agreement=agreement,
        datasets=datasets,
        group_by=tuple(group_by),
        group_keys=tuple(keys),
        filters=filters,
        aggregates=tuple(plans),
        max_rows_per_person=rows,
        max_groups_per_person=groups,
        epsilon=agreement.budget_kind.loss_type(spent),
        measure=agreement.budget_kind,
        discovery=discovery,
        shared_identifiers=relation.shared_identifiers,
    )


def _check_shape(
    spec: QuerySpec, agreement: Agreement, datasets: tuple[Dataset, ...]
) -> tuple[PrivacyLoss, str]:
    """Sizes the hub accepts, and the query's budget in the agreement's measure."""
    if len(datasets) != len(agreement.slots) or len(datasets) < 1:
        raise FailedPreconditionError("a dataset of this agreement is no longer available")
    if not spec.aggregates:
        raise InvalidArgumentError("a query needs at least one aggregate")
    if len(spec.aggregates) > MAX_AGGREGATES:
        raise InvalidArgumentError(f"a query may hold at most {MAX_AGGREGATES} aggregates")
    if len(spec.group_by) > MAX_GROUP_COLUMNS:
        raise InvalidArgumentError(f"group by at most {MAX_GROUP_COLUMNS} columns")
    total, measure_name = _query_budget(spec, agreement)
    if total.micros == 0 and any(
        a.epsilon is None and a.target_ci95 is None for a in spec.aggregates
    ):
        raise InvalidArgumentError(f"query {measure_name} must be positive")
    return total, measure_name


def _resolve_grouping(
    spec: QuerySpec, datasets: tuple[Dataset, ...]
) -> tuple[list[ColumnRef], list[ColumnRef]]:
    """The group-by columns, and those among them whose categories are private (discovered)."""
    group_by: list[ColumnRef] = []
    for text in spec.group_by:
        kind, name, rest = derived.split_grouping(text)
        ref = _resolve(name, datasets)
        if kind:
            ref = replace(ref, derivation=derived.derivation(kind, rest, ref.column, ref.qualified))
        elif isinstance(ref.column, NumericColumn):
            raise InvalidArgumentError(
                f"cannot group by numeric column {ref.qualified}; group by its bins, e.g. "
                f"bins:{ref.qualified}:0,50,100"
            )
        elif isinstance(ref.column, DateColumn):
            raise InvalidArgumentError(
                f"cannot group by date column {ref.qualified} itself; group by month:, week: "
                f"or day:{ref.qualified}"
            )
        if any(r.label == ref.label for r in group_by):
            raise InvalidArgumentError(f"{ref.label} appears twice in group_by")
        group_by.append(ref)
    private = [r for r in group_by if isinstance(r.column, TextColumn)]
    if private and len(group_by) > 1:
        raise InvalidArgumentError(
            f"{private[0].qualified} has private categories: group by it alone (keys are "
            "discovered with DP thresholding)"
        )
    return group_by, private


def _contribution_bounds(
    spec: QuerySpec, agreement: Agreement, keys: list[tuple[str, ...]], private: bool
) -> tuple[int, int]:
    """Rows per person and groups per person, from the query, the agreement and the keys."""
    rows = spec.max_rows_per_person or agreement.max_rows_per_person
    if not 1 <= rows <= MAX_ROWS_PER_PERSON:
        raise InvalidArgumentError(f"max_rows_per_person must be in [1, {MAX_ROWS_PER_PERSON}]")
    if spec.max_groups_per_person < 0:
        raise InvalidArgumentError("max_groups_per_person must not be negative")
    groups = spec.max_groups_per_person or agreement.max_groups_per_person
    if groups == AUTO_GROUPS:  # every cell of a public grouping; one discovered key
        groups = max(len(keys), 1)
    needs_group_cap = private or any(
        a.kind in (AggregateKind.COUNT, AggregateKind.QUANTILE) for a in spec.aggregates
    )
    if not needs_group_cap:
        # Row counts and sums are bounded by the rows cap alone (L1 <= k x max|value|), so no
        # extra group cap is needed: k rows reach at most k cells.
        groups = len(keys)
    groups = min(groups, rows, len(keys)) if keys else min(groups, rows)
    return rows, groups


def _fixed_share(draft: _Draft, agreement: Agreement, measure_name: str) -> PrivacyLoss | None:
    """An aggregate's own share (given, or from its target accuracy); None: split the rest."""
    spec = draft.spec
    if spec.target_ci95 is None:
        # A share is received as a decimal; it counts in the agreement's measure.
        if spec.epsilon is None:
            return None
        return agreement.budget_kind.loss_type(spec.epsilon.micros)
    if spec.epsilon is not None:
        raise InvalidArgumentError(
            f"aggregate {spec.name!r}: give a {measure_name} share or a target, not both"
        )
    if spec.kind not in (AggregateKind.COUNT, AggregateKind.COUNT_ROWS, AggregateKind.SUM):
        raise InvalidArgumentError(
            f"aggregate {spec.name!r}: a target accuracy applies to count, "
            "count_rows and sum (other intervals depend on the data)"
        )
    _, l1, l2 = draft.components[0]
    column = draft.ref.column if draft.ref else None
    unit = column.resolution if isinstance(column, NumericColumn) else 1.0
    try:
        return share_for_accuracy(agreement.budget_kind, l1, l2, spec.target_ci95 / unit)
    except MechanismError as exc:
        raise InvalidArgumentError(f"aggregate {spec.name!r}: {exc}") from None


def _check_discovery(spec: QuerySpec, agreement: Agreement, column: ColumnRef) -> None:
    """Key discovery spends delta: the query names one, and the agreement has a delta budget."""
    if not 0 < spec.delta_units < DELTA_UNITS:
        raise InvalidArgumentError(
            f"grouping by {column.qualified} discovers its keys with DP thresholding: "
            "give a delta in (0, 1), e.g. 1e-9"
        )
    if agreement.total_delta_units == 0:
        raise InvalidArgumentError("this agreement has no delta budget for key discovery")


def _check_scope(
    agreement: Agreement,
    drafts: list[_Draft],
    group_by: list[ColumnRef],
    filters: tuple[ResolvedFilter, ...],
) -> None:
    """Columns and aggregations outside the agreement are refused; small groups need a count."""
    if agreement.allowed_aggregations:
        for d in drafts:
            kind = d.spec.kind
            if kind is AggregateKind.STDDEV and "variance" in agreement.allowed_aggregations:
                continue  # the square root of an allowed variance: post-processing
            if kind.value not in agreement.allowed_aggregations:
                raise PermissionDeniedError(
                    f"aggregation {d.spec.kind.value!r} is outside this agreement (allowed: "
                    f"{list(agreement.allowed_aggregations)})"
                )
    if agreement.allowed_columns:
        used = (
            {r.qualified for r in group_by}
            | {leaf.ref.qualified for f in filters for leaf in f.leaves}
            | {d.ref.qualified for d in drafts if d.ref is not None}
        )
        outside = sorted(used - set(agreement.allowed_columns))
        if outside:
            raise PermissionDeniedError(f"columns {outside} are outside this agreement")
    if (
        agreement.min_group_size
        and group_by
        and not any(d.spec.kind is AggregateKind.COUNT for d in drafts)
    ):
        raise InvalidArgumentError(
            f"this agreement suppresses groups under {agreement.min_group_size} people: "
            "grouped queries must include a people count"
        )


def _draft(
    agg: AggregateSpec,
    datasets: tuple[Dataset, ...],
    rows: int,
    groups: int,
    relation: Neighbours,
    cells: int | None,
    names: set[str],
) -> _Draft:
    """Resolve one aggregate and size its sensitivities under the agreement's relation."""
    name = agg.name or (
        f"{agg.kind}_{agg.column}".replace(".", "_") if agg.column else str(agg.kind)
    )
    check_name(name, "aggregate name")
    if name in names:
        raise InvalidArgumentError(f"aggregate name {name!r} is used twice")
    names.add(name)

    def component(label: str, unit: UnitContribution) -> tuple[str, int, float]:
        return label, relation.l1(unit, cells), relation.l2(unit, cells)

    if agg.kind in (AggregateKind.COUNT, AggregateKind.COUNT_ROWS):
        if agg.column:
            raise InvalidArgumentError(f"aggregate {name!r}: {agg.kind} takes no column")
        spec = replace(agg, name=name, column="")
        if agg.kind is AggregateKind.COUNT:
            # A unit adds 1 to each of at most `groups` cells.
            return _Draft(spec, None, (component("count", count_unit(groups)),))
        return _Draft(spec, None, (component("count_rows", rows_unit(rows)),))
    ref = _resolve(agg.column, datasets)
    if not isinstance(ref.column, NumericColumn):
        raise InvalidArgumentError(
            f"aggregate {name!r}: {agg.kind} needs a numeric column, {ref.qualified} is categorical"
        )
    spec = replace(agg, name=name, column=ref.qualified)
    column = ref.column
    total = component("sum", sum_unit(rows, column.lower_units, column.upper_units))
    value_rows = component("value_rows", rows_unit(rows))
    if agg.kind is AggregateKind.SUM:
        return _Draft(spec, ref, (total,))
    if agg.kind is AggregateKind.MEAN:
        return _Draft(spec, ref, (total, value_rows))
    if agg.kind in (AggregateKind.VARIANCE, AggregateKind.STDDEV):
        squares = component("sum_sq", sum_unit(rows, 0, square_units_max(column)))
        return _Draft(spec, ref, (total, squares, value_rows))
    quantile = agg.quantile if agg.quantile is not None else 0.5
    if not 0 < quantile < 1:
        raise InvalidArgumentError(f"aggregate {name!r}: quantile must be in (0, 1)")
    num, den = quantile_fraction(quantile)
    # Score = |den x (#rows below candidate) - num x #rows|: one row moves it by at most
    # max(num, den - num); the S + 1 units touched have at most `rows` rows each, so the
    # changes summed over every cell stay within this total (report-noisy-min's loss adds up).
    total_change = relation.rank_change(rows, max(num, den - num))
    spec = replace(spec, quantile=quantile)
    return _Draft(spec, ref, (("quantile", total_change, float(total_change)),))


def _finish(draft: _Draft, share: PrivacyLoss) -> AggregatePlan:
    parts = len(draft.components)
    if share.micros < parts:
        raise InvalidArgumentError(f"aggregate {draft.spec.name!r}: share too small to split")
    split = share.split(parts)
    measurements = tuple(
        Measurement(component, l1, piece, l2)
        for (component, l1, l2), piece in zip(draft.components, split, strict=True)
    )
    return AggregatePlan(draft.spec, draft.ref, share, measurements)


def quantile_fraction(quantile: float) -> tuple[int, int]:
    """The quantile as an exact fraction num/den (den <= 10,000)."""
    fraction = Fraction(quantile).limit_denominator(10_000)
    return fraction.numerator, fraction.denominator


def square_units_max(column: NumericColumn) -> int:
    """Largest squared value, in units of `square_divisor` (kept below 2^31 per row)."""
    return math.ceil(column.max_units**2 / square_divisor(column))


def square_divisor(column: NumericColumn) -> int:
    """Squares are counted in units of (resolution^2 x divisor) so 64-bit sums cannot overflow."""
    return max(1, math.ceil(column.max_units**2 / 2**31))


def quantile_step(column: NumericColumn) -> int:
    """Spacing of quantile candidates, in resolution units."""
    span = column.upper_units - column.lower_units
    return max(1, math.ceil(span / (QUANTILE_CANDIDATES - 1)))
