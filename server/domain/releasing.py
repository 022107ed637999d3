"""Turn a plan into calibrated mechanisms, previews and noisy results (noise drawn by OpenDP)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from entremise.privacy.budget import Measure, PrivacyLoss
from entremise.privacy.mechanisms import (
    KeyDiscovery,
    NoiseMechanism,
    NoisyArgMin,
    mechanism_for,
)
from entremise.server.domain.bounds import bounds_notes
from entremise.server.domain.models import (
    QUANTILE_CANDIDATES,
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
from entremise.server.domain.planner import (
    privacy_unit,
    quantile_fraction,
    quantile_step,
    square_divisor,
)

ALPHA = 0.05


def mechanism(m: Measurement, measure: Measure) -> NoiseMechanism:
    """The OpenDP-backed noise for one measurement (not for quantiles)."""
    return mechanism_for(measure, m.sensitivity, m.l2, m.epsilon)


def quantile_mechanism(m: Measurement, measure: Measure) -> NoisyArgMin:
    """Report-noisy-min in every cell, all at one scale.

    `m.sensitivity` bounds the score changes one person causes summed over all cells, and
    the noisy-min loss is linear (pure) or quadratic (zCDP) in the change, so the per-cell
    losses add up to at most the map at that total: the whole share.
    """
    return NoisyArgMin(m.sensitivity, m.epsilon, measure)


def measurement_info(m: Measurement, measure: Measure, alpha: float = ALPHA) -> MeasurementInfo:
    """Scale and interval of one measurement, in integer units."""
    mech = mechanism(m, measure)
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


def preview_aggregate(agg: AggregatePlan, plan: QueryPlan) -> AggregatePreview:
    """Accuracy of one aggregate before spending (data-independent except for ratios)."""
    measure = plan.measure
    unit = _unit(agg)
    if agg.spec.kind is AggregateKind.QUANTILE:
        m = agg.measurements[0]
        mech = quantile_mechanism(m, measure)
        mech.privacy_loss()
        return AggregatePreview(
            agg.spec.name,
            agg.spec.kind,
            agg.spec.column,
            agg.epsilon,
            "report_noisy_min",
            mech.scale,
            float(m.sensitivity),
            None,
            0.0,
            f"q={agg.spec.quantile}: picks one of {QUANTILE_CANDIDATES} public candidate values "
            "by report-noisy-min on rank error; no data-independent interval",
        )
    infos = [measurement_info(m, measure) for m in agg.measurements]
    main = infos[0]
    if agg.spec.kind in (AggregateKind.MEAN, AggregateKind.VARIANCE, AggregateKind.STDDEV):
        count = infos[-1]
        assert agg.ref is not None and isinstance(agg.ref.column, NumericColumn)
        mechs = [mechanism(m, measure) for m in agg.measurements]
        bound = ratio_halfwidth_bound(agg.spec.kind, mechs, agg.ref.column)
        at_rows = tuple((rows, bound(rows)) for rows in PREVIEW_ROWS)
        target = agg.spec.target_ci95
        needed = rows_for(bound, target) if target else 0
        shown = ", ".join(f"{width:.4g} at {rows:,} rows" for rows, width in at_rows)
        note = (
            f"{agg.spec.kind} = post-processing of noisy sums over a noisy row count; its 95% "
            "interval is computed after release and depends on the cell's row count: it is "
            f"at most {shown} (worst case over values within the public bounds, whenever "
            "the noise stays inside the interval's own 95% event)"
            + (f"; under the target {target:g} from {needed:,} rows" if needed else "")
            + f" (sum +/- {main.ci95_units * unit:.4g}, rows +/- {count.ci95_units:.4g})"
        )
        return AggregatePreview(
            agg.spec.name,
            agg.spec.kind,
            agg.spec.column,
            agg.epsilon,
            f"{main.mechanism} on {', '.join(i.component for i in infos)}",
            main.scale_units * unit,
            main.sensitivity * unit,
            None,
            count.scale_units,
            note,
            at_rows,
            needed,
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


#: Row counts at which a preview states the half-width of a mean's, variance's or stddev's cell.
PREVIEW_ROWS = (100, 1_000, 10_000, 100_000)


def _ratio_bound(a_num: float, num_max: float, a_den: float, rows: int) -> float:
    """Bound on half the width of `_ratio_box` for a cell of `rows` true rows, or inf.

    Under the union-bound event (|noise| <= a_num on the numerator, <= a_den on the row
    count), the noisy count N >= rows - a_den and |numerator| <= num_max + a_num, and each
    corner of the box differs from num/N by at most (a_num + a_den |num/N|) / (N - a_den).
    """
    noisy_rows = rows - a_den
    if noisy_rows - a_den < 1:
        return math.inf
    ratio_max = (num_max + a_num) / noisy_rows
    return (a_num + a_den * ratio_max) / (noisy_rows - a_den)


def ratio_halfwidth_bound(
    kind: AggregateKind, mechs: list[NoiseMechanism], column: NumericColumn
) -> Callable[[int], float]:
    """Rows -> an upper bound on the 95% half-width of a released mean, variance or stddev.

    Data-independent: the worst case over every value within the column's public bounds,
    with the same union-bound arithmetic as the release (each of the k noisy totals within
    its 1 - 0.05/k interval), for a cell with `rows` true rows; capped by what clipping to the
    bounds allows. It bounds the released half-width whenever the release's own 95% event
    holds. A decreasing function of `rows`.
    """
    res = column.resolution
    top = max(abs(column.lower), abs(column.upper))
    if kind is AggregateKind.MEAN:
        a_sum = mechs[0].ci_halfwidth(ALPHA / 2) * res
        a_rows = mechs[1].ci_halfwidth(ALPHA / 2)
        cap = column.upper - column.lower

        def mean(rows: int) -> float:
            # Clipping is a contraction: the half-width is at most the box's, and the bounds'.
            return min(cap, _ratio_bound(a_sum, top * rows, a_rows, rows))

        return mean
    q = square_divisor(column)
    a = [m.ci_halfwidth(ALPHA / 3) for m in mechs]
    a_sum, a_sq, a_rows = a[0] * res, a[1] * q * res * res, a[2]
    span = (column.upper - column.lower) ** 2 / 4

    def variance(rows: int) -> float:
        squares = _ratio_bound(a_sq, top * top * rows, a_rows, rows)
        means = _ratio_bound(a_sum, top * rows, a_rows, rows)
        if math.isinf(squares) or math.isinf(means):
            return span
        # The mean lies within `reach` of 0, so its square moves by at most 2 reach per unit
        # of the mean's interval (2 means): the variance's interval is within both widths.
        reach = (top * rows + a_sum) / (rows - a_rows) + means
        return min(span, 2 * squares + 4 * reach * means)

    def stddev(rows: int) -> float:
        # `_root` maps the variance's interval [v - c, v + c] through the square root, and
        # |sqrt(a) - sqrt(b)| <= sqrt(|a - b|): its half-width is at most sqrt(c).
        return math.sqrt(variance(rows))

    return stddev if kind is AggregateKind.STDDEV else variance


def rows_for(bound: Callable[[int], float], target: float) -> int:
    """The fewest rows at which a decreasing `bound` is at most `target` (0 if none do)."""
    high = 1 << 40
    if bound(high) > target:
        return 0
    low = 1
    while low < high:
        mid = (low + high) // 2
        if bound(mid) <= target:
            high = mid
        else:
            low = mid + 1
    return low


def discovery_mechanism(plan: QueryPlan) -> KeyDiscovery:
    """The one object that sizes, shows and applies a plan's key discovery."""
    d = plan.discovery
    assert d is not None
    return KeyDiscovery(
        keys_per_unit=d.max_keys_per_person,
        shared_identifiers=d.shared_identifiers,
        share=d.epsilon,
        delta=d.delta,
        measure=plan.measure,
    )


def discovery_info(plan: QueryPlan) -> dict[str, object] | None:
    """Key discovery parameters, as applied (the threshold is data-independent)."""
    if plan.discovery is None:
        return None
    mech = discovery_mechanism(plan)
    mech.privacy_loss()
    return {
        "column": plan.discovery.ref.qualified,
        "epsilon": str(plan.discovery.epsilon),
        "delta": plan.discovery.delta,
        "threshold": mech.threshold,
    }


def summarize(plan: QueryPlan, remaining: PrivacyLoss) -> PlanSummary:
    """What the analyst sees before spending, and what is stored with the release."""
    return PlanSummary(
        aggregates=tuple(preview_aggregate(a, plan) for a in plan.aggregates),
        group_by=tuple(r.label for r in plan.group_by),
        cell_count=len(plan.group_keys),
        max_rows_per_person=plan.max_rows_per_person,
        max_groups_per_person=plan.max_groups_per_person,
        clamped_columns=tuple(plan.clamped_columns),
        epsilon=plan.epsilon,
        privacy_unit=privacy_unit(plan.shared_identifiers),
        remaining_before=remaining,
        remaining_after=remaining - plan.epsilon
        if remaining >= plan.epsilon
        else type(remaining).zero(),
        measure=plan.measure,
        delta_units=plan.delta_units,
        discovery=discovery_info(plan),
        shared_identifiers=plan.shared_identifiers,
        bounds_notes=bounds_notes(plan),
    )


def _exact_vector(exact: ExactAggregates, agg: AggregatePlan, component: str) -> list[int]:
    if component == "count":
        return exact.people
    if component == "count_rows":
        return exact.rows
    assert agg.ref is not None
    key = agg.ref.qualified
    return {"sum": exact.sums, "sum_sq": exact.sq_sums, "value_rows": exact.value_rows}[component][
        key
    ]


def _ratio_box(num: float, den: float, a_num: float, a_den: float) -> tuple[float, float] | None:
    """Range of num'/den' over the box |num'-num| <= a_num, |den'-den| <= a_den (den' >= 1)."""
    if den - a_den < 1:
        return None
    corners = [(num + dn) / (den + dd) for dn in (-a_num, a_num) for dd in (-a_den, a_den)]
    return min(corners), max(corners)


def _mean_cell(
    noisy_sum: int,
    noisy_rows: int,
    sum_m: NoiseMechanism,
    rows_m: NoiseMechanism,
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
    box = _ratio_box(
        noisy_sum * res,
        noisy_rows,
        sum_m.ci_halfwidth(ALPHA / 2) * res,
        rows_m.ci_halfwidth(ALPHA / 2),
    )
    low, high = box if box else (column.lower, column.upper)
    low, high = max(low, column.lower), min(high, column.upper)
    return mean, max(mean - low, high - mean, 0.0)


def _variance_cell(
    noisy: tuple[int, int, int], mechs: list[NoiseMechanism], column: NumericColumn
) -> tuple[float | None, float | None]:
    """Variance = E[x^2] - E[x]^2 from three noisy totals; interval by a 3-way union bound."""
    s, sq, n = noisy
    if n < 2:
        return None, None
    res = column.resolution
    q = square_divisor(column)
    span = (column.upper - column.lower) ** 2 / 4  # largest possible variance on the bounds
    variance = min(max(sq * q * res * res / n - (s * res / n) ** 2, 0.0), span)
    a = [m.ci_halfwidth(ALPHA / 3) for m in mechs]
    squares = _ratio_box(sq * q * res * res, n, a[1] * q * res * res, a[2])
    means = _ratio_box(s * res, n, a[0] * res, a[2])
    if squares is None or means is None:
        return variance, span
    mean_sq_high = max(means[0] ** 2, means[1] ** 2)
    mean_sq_low = 0.0 if means[0] <= 0 <= means[1] else min(means[0] ** 2, means[1] ** 2)
    low = max(squares[0] - mean_sq_high, 0.0)
    high = min(squares[1] - mean_sq_low, span)
    return variance, max(variance - low, high - variance, 0.0)


def _root(variance: float | None, ci: float | None) -> tuple[float | None, float | None]:
    """Standard deviation from a variance and its 95% interval.

    The square root is monotone, so it maps the variance's interval onto one of the same
    coverage; it is reported by its larger half-width.
    """
    if variance is None or ci is None:
        return None, None
    value = math.sqrt(variance)
    low, high = math.sqrt(max(variance - ci, 0.0)), math.sqrt(variance + ci)
    return value, max(value - low, high - value)


def _quantile_cells(
    agg: AggregatePlan, exact: ExactAggregates, plan: QueryPlan, keys: list[tuple[str, ...]]
) -> list[CellResult]:
    assert agg.ref is not None and isinstance(agg.ref.column, NumericColumn)
    column = agg.ref.column
    mech = quantile_mechanism(agg.measurements[0], plan.measure)
    num, den = quantile_fraction(agg.spec.quantile or 0.5)
    step = quantile_step(column)
    cells = []
    for i, key in enumerate(keys):
        counts = exact.buckets[agg.ref.qualified][i]
        n = sum(counts)
        below, scores = 0, []
        for j in range(QUANTILE_CANDIDATES):
            scores.append(abs(den * below - num * n))
            below += counts[j] if j < len(counts) else 0
        choice = mech.release(scores)
        units = min(column.lower_units + choice * step, column.upper_units)
        cells.append(CellResult(key, units * column.resolution, None))
    return cells


def release(plan: QueryPlan, exact: ExactAggregates) -> tuple[AggregateResult, ...]:
    """Draw the noise (OpenDP) and post-process every aggregate of the plan."""
    keys = exact.keys if exact.keys is not None else list(plan.group_keys)
    measure = plan.measure
    results: list[AggregateResult] = []
    for agg in plan.aggregates:
        if agg.spec.kind is AggregateKind.QUANTILE:
            cells = _quantile_cells(agg, exact, plan, keys)
            results.append(
                AggregateResult(agg.spec.name, agg.spec.kind, agg.spec.column, tuple(cells))
            )
            continue
        mechs = [mechanism(m, measure) for m in agg.measurements]
        noisy = [
            mech.release(_exact_vector(exact, agg, m.component))
            for mech, m in zip(mechs, agg.measurements, strict=True)
        ]
        unit = _unit(agg)
        out: list[CellResult] = []
        for i, key in enumerate(keys):
            value: float | None
            ci: float | None
            if agg.spec.kind is AggregateKind.MEAN:
                assert agg.ref is not None and isinstance(agg.ref.column, NumericColumn)
                value, ci = _mean_cell(noisy[0][i], noisy[1][i], mechs[0], mechs[1], agg.ref.column)
            elif agg.spec.kind in (AggregateKind.VARIANCE, AggregateKind.STDDEV):
                assert agg.ref is not None and isinstance(agg.ref.column, NumericColumn)
                value, ci = _variance_cell(
                    (noisy[0][i], noisy[1][i], noisy[2][i]), mechs, agg.ref.column
                )
                if agg.spec.kind is AggregateKind.STDDEV:
                    value, ci = _root(value, ci)
            elif agg.spec.kind is AggregateKind.SUM:
                value, ci = noisy[0][i] * unit, mechs[0].ci_halfwidth(ALPHA) * unit
            else:
                # Counts are never negative: clamping at 0 is post-processing and only helps.
                value, ci = float(max(noisy[0][i], 0)), mechs[0].ci_halfwidth(ALPHA)
            out.append(CellResult(key, value, ci))
        results.append(AggregateResult(agg.spec.name, agg.spec.kind, agg.spec.column, tuple(out)))
    return tuple(results)


def discover_keys(plan: QueryPlan, people_per_key: dict[str, int]) -> tuple[list[str], float]:
    """Keys whose noisy people count clears the threshold, and a noisy count of the others."""
    mech = discovery_mechanism(plan)
    released = mech.release(people_per_key)
    return sorted(released), mech.withheld(len(people_per_key), len(released))


def restrict(exact: ExactAggregates, keys: list[tuple[str, ...]]) -> ExactAggregates:
    """The cells of `keys` only (after key discovery), in that order."""
    index = {k: i for i, k in enumerate(exact.keys or [])}
    rows = [index[k] for k in keys]

    def pick(values: list[int]) -> list[int]:
        return [values[i] for i in rows]

    return ExactAggregates(
        people=pick(exact.people),
        rows=pick(exact.rows),
        sums={n: pick(v) for n, v in exact.sums.items()},
        value_rows={n: pick(v) for n, v in exact.value_rows.items()},
        sq_sums={n: pick(v) for n, v in exact.sq_sums.items()},
        buckets={n: [v[i] for i in rows] for n, v in exact.buckets.items()},
        keys=keys,
    )


def suppress_small_groups(
    plan: QueryPlan, results: tuple[AggregateResult, ...]
) -> tuple[AggregateResult, ...]:
    """Blank every cell whose noisy people count is under the agreement's minimum group size.

    Post-processing of released noisy counts: it costs no privacy and never looks at the data.
    """
    minimum = plan.agreement.min_group_size
    if not minimum or not plan.group_by:
        return results
    counts = next(r for r in results if r.kind is AggregateKind.COUNT)
    small = {c.group for c in counts.cells if c.value is None or c.value < minimum}
    return tuple(
        replace(
            r,
            cells=tuple(
                replace(c, value=None, ci95_halfwidth=None) if c.group in small else c
                for c in r.cells
            ),
        )
        for r in results
    )


def draw(
    plan: QueryPlan, exact: ExactAggregates, summary: PlanSummary
) -> tuple[PlanSummary, tuple[AggregateResult, ...]]:
    """Discover keys (if asked), draw every noisy value, blank small groups.

    Everything here depends on the rows only through OpenDP mechanisms; the summary gains the
    number of keys released (itself a noisy outcome).
    """
    if plan.discovery is not None:
        people = {k[0]: n for k, n in zip(exact.keys or [], exact.people, strict=True)}
        keys, suppressed = discover_keys(plan, people)
        exact = restrict(exact, [(k,) for k in keys])
        summary = replace(
            summary,
            discovery={
                **(summary.discovery or {}),
                "released_keys": len(keys),
                "suppressed_keys_noisy": suppressed,
            },
        )
    return summary, suppress_small_groups(plan, release(plan, exact))
