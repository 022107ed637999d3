"""Turn a plan into calibrated mechanisms, previews and noisy results (noise drawn by OpenDP)."""

from __future__ import annotations

from entremise.privacy.budget import Epsilon
from entremise.privacy.mechanisms import IntegerLaplace
from entremise.server.domain.models import (
    AggregateKind,
    AggregatePlan,
    AggregatePreview,
    AggregateResult,
    CellResult,
    ExactAggregates,
    Measurement,
    MeasurementInfo,
    NumericColumn,
    PlanSummary,
    QueryPlan,
)
from entremise.server.domain.planner import PRIVACY_UNIT

ALPHA = 0.05


def mechanism(m: Measurement) -> IntegerLaplace:
    """The OpenDP-backed mechanism for one measurement."""
    return IntegerLaplace(sensitivity=m.sensitivity, epsilon=m.epsilon)


def measurement_info(m: Measurement, alpha: float = ALPHA) -> MeasurementInfo:
    """Scale and interval of one measurement, in integer units."""
    mech = mechanism(m)
    return MeasurementInfo(
        component=m.component,
        mechanism=mech.name,
        sensitivity=m.sensitivity,
        scale_units=mech.scale,
        ci95_units=mech.ci_halfwidth(alpha),
        epsilon=mech.privacy_loss(),
    )


def _unit(agg: AggregatePlan) -> float:
    return (
        agg.ref.column.resolution if agg.ref and isinstance(agg.ref.column, NumericColumn) else 1.0
    )


def preview_aggregate(agg: AggregatePlan) -> AggregatePreview:
    """Accuracy of one aggregate before spending (data-independent except for MEAN)."""
    infos = [measurement_info(m) for m in agg.measurements]
    unit = _unit(agg)
    main = infos[0]
    if agg.spec.kind is AggregateKind.MEAN:
        count = infos[1]
        note = (
            f"mean = noisy sum / noisy row count; 95% half-width is about "
            f"({main.ci95_units * unit:.4g} + |mean| x {count.ci95_units:.4g}) / rows, "
            "computed exactly after release"
        )
        return AggregatePreview(
            agg.spec.name,
            agg.spec.kind,
            agg.spec.column,
            agg.epsilon,
            f"{main.mechanism} (sum) / {count.mechanism} (rows)",
            main.scale_units * unit,
            main.sensitivity * unit,
            None,
            count.scale_units,
            note,
        )
    note = f"95% of releases fall within +/- {main.ci95_units * unit:.4g} of the bounded true value"
    return AggregatePreview(
        agg.spec.name,
        agg.spec.kind,
        agg.spec.column,
        agg.epsilon,
        main.mechanism,
        main.scale_units * unit,
        main.sensitivity * unit,
        main.ci95_units * unit,
        0.0,
        note,
    )


def summarize(plan: QueryPlan, remaining: Epsilon) -> PlanSummary:
    """What the analyst sees before spending, and what is stored with the release."""
    return PlanSummary(
        aggregates=tuple(preview_aggregate(a) for a in plan.aggregates),
        group_by=tuple(r.qualified for r in plan.group_by),
        cell_count=len(plan.group_keys),
        max_rows_per_person=plan.max_rows_per_person,
        max_groups_per_person=plan.max_groups_per_person,
        clamped_columns=tuple(plan.clamped_columns),
        epsilon=plan.epsilon,
        privacy_unit=PRIVACY_UNIT,
        remaining_before=remaining,
        remaining_after=remaining - plan.epsilon if remaining >= plan.epsilon else Epsilon.zero(),
    )


def _exact_vector(exact: ExactAggregates, agg: AggregatePlan, component: str) -> list[int]:
    if component == "count":
        return exact.people
    if component == "count_rows":
        return exact.rows
    assert agg.ref is not None
    key = agg.ref.qualified
    return exact.sums[key] if component == "sum" else exact.value_rows[key]


def _mean_cell(
    noisy_sum: int,
    noisy_rows: int,
    sum_m: IntegerLaplace,
    rows_m: IntegerLaplace,
    column: NumericColumn,
) -> tuple[float | None, float | None]:
    """Post-process a noisy sum and row count into a mean with a conservative 95% interval.

    Each component's interval holds with probability 97.5%, so both hold with >= 95%
    (union bound); the mean's interval is the range of ratios over that box, clipped to the
    column's public bounds. Pure post-processing: no extra privacy loss.
    """
    if noisy_rows < 1:
        return None, None
    res = column.resolution
    mean = min(max(noisy_sum * res / noisy_rows, column.lower), column.upper)
    a_sum = sum_m.ci_halfwidth(ALPHA / 2)
    a_rows = rows_m.ci_halfwidth(ALPHA / 2)
    if noisy_rows - a_rows < 1:
        low, high = column.lower, column.upper
    else:
        corners = [
            (noisy_sum + ds) * res / (noisy_rows + dr)
            for ds in (-a_sum, a_sum)
            for dr in (-a_rows, a_rows)
        ]
        low, high = max(min(corners), column.lower), min(max(corners), column.upper)
    return mean, max(mean - low, high - mean, 0.0)


def release(plan: QueryPlan, exact: ExactAggregates) -> tuple[AggregateResult, ...]:
    """Draw the noise (OpenDP) and post-process every aggregate of the plan."""
    results: list[AggregateResult] = []
    for agg in plan.aggregates:
        mechs = [mechanism(m) for m in agg.measurements]
        noisy = [
            mech.release(_exact_vector(exact, agg, m.component))
            for mech, m in zip(mechs, agg.measurements, strict=True)
        ]
        unit = _unit(agg)
        cells: list[CellResult] = []
        for i, key in enumerate(plan.group_keys):
            if agg.spec.kind is AggregateKind.MEAN:
                assert agg.ref is not None and isinstance(agg.ref.column, NumericColumn)
                value, ci = _mean_cell(noisy[0][i], noisy[1][i], mechs[0], mechs[1], agg.ref.column)
            elif agg.spec.kind is AggregateKind.SUM:
                value, ci = noisy[0][i] * unit, mechs[0].ci_halfwidth(ALPHA) * unit
            else:
                # Counts are never negative: clamping at 0 is post-processing and only helps.
                value, ci = float(max(noisy[0][i], 0)), mechs[0].ci_halfwidth(ALPHA)
            cells.append(CellResult(key, value, ci))
        results.append(AggregateResult(agg.spec.name, agg.spec.kind, agg.spec.column, tuple(cells)))
    return tuple(results)
