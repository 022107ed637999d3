"""Derived public domains: a date's month, week or day, and a numeric value's bin.

A grouping is written `month:panel.purchased_on` (or `week:`, `day:`) or
`bins:panel.amount:0,50,100[:LABEL|LABEL|...]`. Its cells come from public inputs only (the
column's declared bounds and the edges in the query), so every cell is released, empty or not,
and the set of cells says nothing about the data. Dates outside their bounds and missing values
belong to no cell; a numeric value is clamped to its bounds first, like every aggregate does.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
from collections.abc import Sequence

from entremise.server.domain.errors import InvalidArgumentError
from entremise.server.domain.models import (
    Column,
    DateColumn,
    Derivation,
    FilterOp,
    Literal,
    NumericColumn,
    format_number,
)

PERIODS = ("month", "week", "day")
MAX_EDGES = 1_000
MAX_LABEL = 200


def split_grouping(text: str) -> tuple[str, str, str]:
    """`kind:column[:rest]` -> (kind, column, rest); a plain column -> ("", column, "")."""
    if ":" not in text:
        return "", text, ""
    kind, _, remainder = text.partition(":")
    column, _, rest = remainder.partition(":")
    if kind not in (*PERIODS, "bins"):
        raise InvalidArgumentError(
            f"group-by {text!r}: unknown derivation {kind!r} (use month:, week:, day: or bins:)"
        )
    return kind, column, rest


def derivation(kind: str, rest: str, column: Column, qualified: str) -> Derivation:
    """Check a derivation against its column's declared kind and parse its edges and labels."""
    if kind in PERIODS:
        if not isinstance(column, DateColumn):
            raise InvalidArgumentError(
                f"group-by {kind}:{qualified}: {kind} needs a date column, {qualified} is not one"
            )
        if rest:
            raise InvalidArgumentError(f"group-by {kind}:{qualified} takes no edges")
        return Derivation(kind)
    if not isinstance(column, NumericColumn):
        raise InvalidArgumentError(
            f"group-by bins:{qualified}: bins need a numeric column, {qualified} is not one"
        )
    edge_text, _, label_text = rest.partition(":")
    edges = _edges(edge_text, qualified)
    labels = tuple(label_text.split("|")) if label_text else ()
    if labels and len(labels) != len(edges) + 1:
        raise InvalidArgumentError(
            f"group-by bins:{qualified}: {len(edges)} edges make {len(edges) + 1} bins, "
            f"but {len(labels)} labels were given"
        )
    if any(not 1 <= len(label) <= MAX_LABEL or not label.isprintable() for label in labels):
        raise InvalidArgumentError(
            f"group-by bins:{qualified}: labels must be 1-200 printable characters"
        )
    if len(set(labels)) != len(labels):
        raise InvalidArgumentError(f"group-by bins:{qualified}: labels must be distinct")
    return Derivation("bins", edges, labels)


def _edges(text: str, qualified: str) -> tuple[float, ...]:
    try:
        edges = tuple(float(e) for e in text.split(","))
    except ValueError:
        raise InvalidArgumentError(
            f"group-by bins:{qualified}: edges must be numbers separated by commas, got {text!r}"
        ) from None
    if not edges or len(edges) > MAX_EDGES:
        raise InvalidArgumentError(f"group-by bins:{qualified}: give 1 to {MAX_EDGES} edges")
    if not all(math.isfinite(e) for e in edges):
        raise InvalidArgumentError(f"group-by bins:{qualified}: edges must be finite")
    if any(b <= a for a, b in itertools.pairwise(edges)):
        raise InvalidArgumentError(f"group-by bins:{qualified}: edges must increase strictly")
    return edges


def domain(
    column: Column, d: Derivation, comparisons: Sequence[tuple[FilterOp, Literal]] = ()
) -> list[str]:
    """Every public cell of a derived grouping, in order.

    A date's periods run between its bounds, narrowed by the query's own top-level
    comparisons on that column (`comparisons`), so `>= 2026-03-01` grouped by month does not
    release January and February: both inputs are public, the cells still say nothing.
    """
    if d.kind == "bins":
        assert isinstance(column, NumericColumn)
        return [label for label, _ in reachable_bins(column, d)]
    assert isinstance(column, DateColumn)
    low, high = column.lower_date, column.upper_date
    for op, value in comparisons:
        first, last = _days_allowed(op, value, column.timestamp)
        low, high = max(low, first), min(high, last)
    if low > high:
        return []
    return [p.isoformat() for p in _periods(d.kind, low, high)]


def _days_allowed(op: FilterOp, value: Literal, timestamp: bool) -> tuple[dt.date, dt.date]:
    """The days a comparison with `value` can keep (conservatively, for timestamps)."""
    never, ever = dt.date.min, dt.date.max
    if isinstance(value, dt.datetime):
        day = value.date()
        midnight = value.time() == dt.time()
        after = day + dt.timedelta(days=1) if not timestamp else day
        before = day - dt.timedelta(days=1) if midnight else day
    elif isinstance(value, dt.date):
        day, after, before = value, value + dt.timedelta(days=1), value - dt.timedelta(days=1)
        if timestamp:  # a date compared with a timestamp means its midnight
            after = value
    else:
        return never, ever
    return {
        FilterOp.GE: (day, ever),
        FilterOp.GT: (after, ever),
        FilterOp.LE: (never, day),
        FilterOp.LT: (never, before),
    }.get(op, (never, ever))


def _periods(kind: str, low: dt.date, high: dt.date) -> list[dt.date]:
    start = period_start(kind, low)
    periods = []
    while start <= high:
        periods.append(start)
        start = _next(kind, start)
    return periods


def period_start(kind: str, day: dt.date) -> dt.date:
    """The first day of `day`'s month, ISO week (a Monday) or day, as DATE_TRUNC gives it."""
    if kind == "month":
        return day.replace(day=1)
    if kind == "week":
        return day - dt.timedelta(days=day.weekday())
    return day


def _next(kind: str, start: dt.date) -> dt.date:
    if kind == "month":
        year, month = divmod(start.month, 12)
        return dt.date(start.year + year, month + 1, 1)
    return start + dt.timedelta(days=7 if kind == "week" else 1)


def bin_labels(d: Derivation) -> list[str]:
    """Labels of all k + 1 bins: given, or the intervals (< E1), [E1, E2), ..., (>= Ek)."""
    if d.labels:
        return list(d.labels)
    e = [format_number(x) for x in d.edges]
    middle = [f"[{a}, {b})" for a, b in itertools.pairwise(e)]
    return [f"< {e[0]}", *middle, f">= {e[-1]}"]


def reachable_bins(column: NumericColumn, d: Derivation) -> list[tuple[str, int]]:
    """(label, position) of the bins a value clamped to the column's bounds can fall in.

    Bin 0 is (< E1), bin i is [Ei, Ei+1), bin k is (>= Ek); a bin outside [lower, upper] is
    empty for every dataset, so it is not a cell.
    """
    edges = d.edges
    out = []
    for i, label in enumerate(bin_labels(d)):
        above_lower = i == len(edges) or edges[i] > column.lower
        below_upper = i == 0 or edges[i - 1] <= column.upper
        if above_lower and below_upper:
            out.append((label, i))
    return out
