"""A translation in words: the lines `query sql --preview` prints, and aggregate words.

Each line says what the hub will compute (aggregates, groupings, filters) or what happens to
the released values afterwards (HAVING, ORDER BY, LIMIT), so an analyst can check a SELECT
before spending budget on it.
"""

from __future__ import annotations

from itertools import pairwise

from entremise.sdk.results import Agreement
from entremise.sdk.sql.binding import dataset_names
from entremise.sdk.sql.model import AllOf, Compare, Negate, Predicate, SqlQuery
from entremise.v1 import query_service_pb2

_KIND_WORDS = {
    query_service_pb2.AGGREGATE_KIND_COUNT: "count of people",
    query_service_pb2.AGGREGATE_KIND_COUNT_ROWS: "count of joined rows",
    query_service_pb2.AGGREGATE_KIND_SUM: "sum",
    query_service_pb2.AGGREGATE_KIND_MEAN: "mean",
    query_service_pb2.AGGREGATE_KIND_VARIANCE: "population variance",
    query_service_pb2.AGGREGATE_KIND_STDDEV: "population standard deviation",
    query_service_pb2.AGGREGATE_KIND_QUANTILE: "quantile",
}
_OP_WORDS = {
    query_service_pb2.FILTER_OP_IN: "in",
    query_service_pb2.FILTER_OP_NOT_IN: "not in",
    query_service_pb2.FILTER_OP_GE: ">=",
    query_service_pb2.FILTER_OP_LE: "<=",
    query_service_pb2.FILTER_OP_LT: "<",
    query_service_pb2.FILTER_OP_GT: ">",
}


def aggregate_words(agg: query_service_pb2.Aggregate) -> str:
    """What one aggregate computes: "median of panel.amount", "count of people"."""
    words = _KIND_WORDS.get(agg.kind, "aggregate")
    if agg.kind == query_service_pb2.AGGREGATE_KIND_QUANTILE:
        level = float(agg.quantile or 0.5)
        words = "median" if level == 0.5 else f"quantile {level:g}"
    return f"{words} of {agg.column}" if agg.column else words


def share_words(agg: query_service_pb2.Aggregate, unit: str = "epsilon") -> str:
    """How an aggregate's share of the budget is chosen."""
    if agg.HasField("target_ci95"):
        return f"the share giving a 95% half-width of {agg.target_ci95:g}"
    if agg.epsilon:
        return f"{unit} {agg.epsilon}"
    return "an even split of the rest"


def grouping_words(group: str) -> str:
    """A group_by string in words: "month of panel.purchased_on", "panel.amount in bins ..."."""
    head, _, rest = group.partition(":")
    if head in ("month", "week", "day") and rest:
        return f"{head} of {rest}"
    if head == "bins" and rest:
        column, _, tail = rest.partition(":")
        edges, _, labels = tail.partition(":")
        bounds = edges.split(",")
        intervals = [f"< {bounds[0]}"]  # the hub's labels of unlabelled bins
        intervals += [f"[{a}, {b})" for a, b in pairwise(bounds)]
        intervals.append(f">= {bounds[-1]}")
        if labels:
            intervals = [
                f"{name} ({interval})"
                for name, interval in zip(labels.split("|"), intervals, strict=False)
            ]
        return f"{column} in bins {', '.join(intervals)}"
    return group


def filter_words(f: query_service_pb2.Filter) -> str:
    """A filter tree in words: "panel.category in (travel) and (panel.amount < 10 or ...)"."""
    if f.any_of:
        return "(" + " or ".join(filter_words(p) for p in f.any_of) + ")"
    if f.all_of:
        return "(" + " and ".join(filter_words(p) for p in f.all_of) + ")"
    op = _OP_WORDS.get(f.op, "?")
    if f.op in (query_service_pb2.FILTER_OP_IN, query_service_pb2.FILTER_OP_NOT_IN):
        return f"{f.column} {op} ({', '.join(f.values)})"
    return f"{f.column} {op} {f.values[0] if f.values else '?'}"


def _predicate_words(p: Predicate) -> str:
    if isinstance(p, Compare):
        value = f"'{p.value}'" if isinstance(p.value, str) else f"{p.value:g}"
        return f"{p.column} {p.op} {value}"
    if isinstance(p, Negate):
        return f"not {_predicate_words(p.part)}"
    word = " and " if isinstance(p, AllOf) else " or "
    return "(" + word.join(_predicate_words(q) for q in p.parts) + ")"


def describe(sql: SqlQuery, agreement: Agreement | None = None) -> list[str]:
    """How a translation reads, one line per item (what `query sql --preview` prints)."""
    lines = []
    unit = agreement.measure.unit if agreement is not None else "epsilon"
    if agreement is not None:
        lines.append(
            f"agreement {agreement.agreement_id} ({agreement.name}): joins "
            f"{', '.join(dataset_names(agreement))} on the person"
        )
    for out in sql.outputs:
        if out.aggregate is not None:
            agg = sql.query.aggregates[out.aggregate]
            lines.append(f"{out.name}: {aggregate_words(agg)}; share: {share_words(agg, unit)}")
        elif out.group is not None:
            lines.append(f"{out.name}: group {grouping_words(sql.query.group_by[out.group])}")
    if sql.query.group_by:
        lines.append(
            "one row per cell of: "
            + " x ".join(grouping_words(g) for g in sql.query.group_by)
            + " (every public cell, empty or not)"
        )
    if sql.query.filters:
        lines.append("where " + " and ".join(filter_words(f) for f in sql.query.filters))
    post = sql.post
    steps = []
    if post.having is not None:
        steps.append(f"HAVING {_predicate_words(post.having)}")
    if post.order_by:
        keys = [f"{k.column}{' DESC' if k.descending else ''}" for k in post.order_by]
        steps.append(f"ORDER BY {', '.join(keys)}")
    if post.limit is not None:
        steps.append(f"LIMIT {post.limit}")
    if post.offset:
        steps.append(f"OFFSET {post.offset}")
    if steps:
        lines.append("then, on the released (noisy) values: " + "; ".join(steps))
    return lines
