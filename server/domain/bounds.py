"""Where a query's contribution bounds can cut people's data, said in plain words.

Bounding is what makes the noise finite, and it biases an answer when someone has more rows or
groups than the bounds allow. The notes are computed from public inputs only (the grouping's
public domain, the bounds, the aggregates asked for), never from the data: they cost no budget
and reveal nothing, at the price of saying "can", not "how many". A DP count of the people cut
would spend budget on every query and be noisiest exactly for the small groups where the cut
matters; the preview shows the notes before anything is spent, so bounds can be chosen first.
"""

from __future__ import annotations

from entremise.server.domain.models import AggregateKind, NumericColumn, QueryPlan

#: Aggregates whose value depends on how many rows each person keeps.
_ROW_KINDS = {
    AggregateKind.COUNT_ROWS: "row counts",
    AggregateKind.SUM: "sums",
    AggregateKind.MEAN: "means",
    AggregateKind.VARIANCE: "variances",
    AggregateKind.STDDEV: "standard deviations",
    AggregateKind.QUANTILE: "quantiles",
}
#: Aggregates that make the planner cap the groups a person counts in.
_GROUP_CAPPED = (AggregateKind.COUNT, AggregateKind.QUANTILE)


def bounds_notes(plan: QueryPlan) -> tuple[str, ...]:
    """Plain-word notes, one per bound that can cut this query's data (empty: none can)."""
    notes: list[str] = []
    kinds = {a.spec.kind for a in plan.aggregates}
    groups = plan.max_groups_per_person
    rows = plan.max_rows_per_person
    grouping = ", ".join(r.label for r in plan.group_by)
    capped = bool(kinds & set(_GROUP_CAPPED))
    if plan.discovery is not None:
        notes.append(
            f"Each person counts in at most {_groups(groups)} of the groups of {grouping} "
            f"(max groups per person): someone found in more is counted in {groups} of them "
            "only, chosen at random, so every value per group can be lower than the truth. "
            "Groups with too few people to pass the discovery threshold are not released."
        )
    elif capped and plan.group_by and groups < len(plan.group_keys):
        cells = len(plan.group_keys)
        fix = (
            f" --max-groups {min(cells, rows)} keeps everyone in every group, at more noise."
            if groups < min(cells, rows)
            else f" Raising --max-rows (now {rows}) lets --max-groups go higher, at more noise."
        )
        notes.append(
            f"Each person counts in at most {_groups(groups)} of the {cells} groups of "
            f"{grouping} (max groups per person): someone found in more is counted in "
            f"{groups} of them only, chosen at random, so every value per group can be lower "
            f"than the truth.{fix}"
        )
    cut = [word for kind, word in _ROW_KINDS.items() if kind in kinds]
    if cut:
        joined = " x ".join(d.name for d in plan.datasets)
        notes.append(
            f"Each person keeps at most {rows} joined rows (max rows per person; a person's "
            f"joined rows pair their rows of {joined}): beyond that, rows are left out at "
            f"random (one per group first), so {_listing(cut)} can be lower or shifted "
            "compared to the truth for people with more rows."
        )
    for agg in plan.aggregates:
        column = agg.ref.column if agg.ref is not None else None
        if isinstance(column, NumericColumn) and agg.ref is not None:
            note = (
                f"Values of {agg.ref.qualified} outside its declared range "
                f"[{column.lower:g}, {column.upper:g}] count as the nearest bound."
            )
            if note not in notes:
                notes.append(note)
    return tuple(notes)


def _groups(n: int) -> str:
    return "1 group" if n == 1 else f"{n} groups"


def _listing(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"
