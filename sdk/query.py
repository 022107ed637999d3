"""Queries: a builder, the command line's mini-language, and the message helpers under both.

A query asks for private aggregates of an agreement's consented join, optionally grouped by
public columns and filtered. Build one in Python::

    Query(agreement_id, epsilon="1").count().mean("panel.amount").group_by("bank.segment")

or from the mini-language the command line takes (`entremise query run --agg ... --where ...`)::

    Query(agreement_id, epsilon="1").aggregate("count").aggregate("mean:panel.amount~20")
    parse_aggregate("median:panel.amount@0.2"); parse_filter("panel.category=travel,fashion")

`Client.preview` and `Client.run` take a `Query` or the `query_service_pb2.Query` it builds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from entremise.sdk.errors import InvalidArgumentError
from entremise.v1 import query_service_pb2

#: Aggregate kinds by the names the SDK and the command line use ("median" is quantile 0.5).
AGGREGATES = {
    "count": query_service_pb2.AGGREGATE_KIND_COUNT,
    "count_rows": query_service_pb2.AGGREGATE_KIND_COUNT_ROWS,
    "sum": query_service_pb2.AGGREGATE_KIND_SUM,
    "mean": query_service_pb2.AGGREGATE_KIND_MEAN,
    "variance": query_service_pb2.AGGREGATE_KIND_VARIANCE,
    "quantile": query_service_pb2.AGGREGATE_KIND_QUANTILE,
    "stddev": query_service_pb2.AGGREGATE_KIND_STDDEV,
}
#: The mini-language of one aggregate: KIND[:COLUMN][@EPSILON|~TARGET].
AGGREGATE_SYNTAX = "KIND[:COLUMN][@EPSILON|~TARGET]"
#: The mini-language of one filter.
FILTER_SYNTAX = "COLUMN=A,B | COLUMN!=A | COLUMN>=N | COLUMN<=N"

_AGG = re.compile(
    r"^(?P<kind>[a-z_]+)(?::(?P<column>[a-z0-9_.]+))?"
    r"(?:@(?P<eps>[^@~]+)|~(?P<target>[0-9.eE+-]+))?$"
)
_WHERE = re.compile(r"^(?P<column>[a-z0-9_.]+)\s*(?P<op>!=|>=|<=|=)\s*(?P<value>.+)$")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_RANGE_OPS = {">=": query_service_pb2.FILTER_OP_GE, "<=": query_service_pb2.FILTER_OP_LE}


class QueryError(InvalidArgumentError):
    """A query that cannot be built: an unknown aggregate kind, a quantile level outside 0-1."""


class QuerySyntaxError(QueryError):
    """Text that is not in the query mini-language; the message starts with the text."""


def aggregate(
    kind: str,
    column: str = "",
    *,
    name: str = "",
    epsilon: str = "",
    quantile: float | None = None,
    target_ci95: float | None = None,
) -> query_service_pb2.Aggregate:
    """Build one aggregate.

    ``aggregate("mean", "panel.amount")``; ``aggregate("quantile", "panel.amount",
    quantile=0.9)``; ``aggregate("count", target_ci95=10)`` lets the hub compute the share
    whose 95% half-width is 10.
    """
    if kind == "median":
        kind, quantile = "quantile", 0.5
    if kind not in AGGREGATES:
        kinds = ", ".join([*sorted(AGGREGATES), "median"])
        raise QueryError(f"aggregate kind {kind!r} is not one of {kinds}")
    msg = query_service_pb2.Aggregate(
        name=name,
        kind=AGGREGATES[kind],
        column=column,
        epsilon=epsilon,
        quantile="" if quantile is None else repr(float(quantile)),
    )
    if target_ci95 is not None:
        msg.target_ci95 = float(target_ci95)
    return msg


def where_in(column: str, *categories: str) -> query_service_pb2.Filter:
    """Keep rows whose categorical `column` is one of `categories`."""
    return query_service_pb2.Filter(
        column=column, op=query_service_pb2.FILTER_OP_IN, values=list(categories)
    )


def where_not_in(column: str, *categories: str) -> query_service_pb2.Filter:
    """Keep rows whose categorical `column` is none of `categories`."""
    return query_service_pb2.Filter(
        column=column, op=query_service_pb2.FILTER_OP_NOT_IN, values=list(categories)
    )


def where_range(column: str, op: str, value: float) -> query_service_pb2.Filter:
    """Keep rows with numeric `column` >= or <= `value` (op is ">=" or "<=")."""
    if op not in _RANGE_OPS:
        raise QueryError(f"range filter {op!r}: expected >= or <=")
    return query_service_pb2.Filter(column=column, op=_RANGE_OPS[op], values=[repr(float(value))])


def query(
    agreement_id: str,
    epsilon: str,
    aggregates: Sequence[query_service_pb2.Aggregate],
    *,
    group_by: Sequence[str] = (),
    filters: Sequence[query_service_pb2.Filter] = (),
    max_rows_per_person: int = 0,
    max_groups_per_person: int = 0,
    rho: str = "",
    delta: str = "",
) -> query_service_pb2.Query:
    """Build a query message (give `rho` instead of `epsilon` on zCDP agreements)."""
    return query_service_pb2.Query(
        agreement_id=agreement_id,
        epsilon=epsilon,
        rho=rho,
        delta=delta,
        aggregates=list(aggregates),
        group_by=list(group_by),
        filters=list(filters),
        max_rows_per_person=max_rows_per_person,
        max_groups_per_person=max_groups_per_person,
    )


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise QueryError(f"quantile {level:g}: a level between 0 and 1, e.g. 0.9")


def quantile_name(column: str, level: float) -> str:
    """The name that keeps a quantile's level: median_panel_amount, quantile_0_9_panel_amount.

    The hub names every quantile quantile_<column> whatever its level; "" when the name would
    not be a valid aggregate name (the hub's default then applies).
    """
    word = "median" if level == 0.5 else "quantile_" + re.sub(r"[^a-z0-9]+", "_", f"{level:g}")
    name = f"{word}_{column.replace('.', '_')}"
    return name if _NAME.match(name) else ""


def parse_aggregate(text: str, *, quantile: float = 0.5) -> query_service_pb2.Aggregate:
    """One aggregate of the mini-language: KIND[:COLUMN][@EPSILON|~TARGET].

    KIND is count (people), count_rows, sum, mean, variance, quantile or median; @EPSILON
    gives it its own share of the query's budget, ~TARGET asks for that 95% half-width.
    `quantile` is the level of a `quantile` aggregate. A quantile is named after its level
    (see `quantile_name`). `QuerySyntaxError` says what is wrong, starting with `text`;
    `QueryError` names an unknown kind.
    """
    _check_level(quantile)
    m = _AGG.match(text.strip())
    if not m:
        raise QuerySyntaxError(f"{text!r}: expected {AGGREGATE_SYNTAX}, e.g. mean:panel.amount")
    msg = aggregate(
        m["kind"],
        m["column"] or "",
        epsilon=m["eps"] or "",
        quantile=quantile if m["kind"] == "quantile" else None,
        target_ci95=float(m["target"]) if m["target"] else None,
    )
    if msg.kind == query_service_pb2.AGGREGATE_KIND_QUANTILE and msg.column:
        msg.name = quantile_name(msg.column, float(msg.quantile))
    return msg


def parse_filter(text: str) -> query_service_pb2.Filter:
    """One filter of the mini-language: COLUMN=A,B | COLUMN!=A | COLUMN>=N | COLUMN<=N.

    `QuerySyntaxError` says what is wrong, starting with `text`.
    """
    m = _WHERE.match(text.strip())
    if not m:
        raise QuerySyntaxError(f"{text!r}: expected {FILTER_SYNTAX}")
    op, column, value = m["op"], m["column"], m["value"].strip()
    if op in ("=", "!="):
        values = [v.strip() for v in value.split(",")]
        return where_in(column, *values) if op == "=" else where_not_in(column, *values)
    try:
        number = float(value)
    except ValueError:
        raise QuerySyntaxError(f"{text!r}: {value!r} is not a number") from None
    return where_range(column, op, number)


def _text(value: str | float) -> str:
    """A budget as the hub reads it: exact decimal text ("0.5"), not a binary float."""
    return value if isinstance(value, str) else repr(value)


@dataclass(frozen=True)
class Query:
    """A query under construction; each method returns a new `Query`, `build()` the message.

    ``Query(agreement_id, epsilon="1").count().mean("panel.amount").group_by("bank.segment")
    .where("panel.category", "travel")``. Budgets are decimal text ("0.5") or numbers; give
    `rho` instead of `epsilon` on zCDP agreements, and `delta` to group by a text column.
    `max_rows_per_person` and `max_groups_per_person` (0: the agreement's) bound each person's
    contribution.
    """

    agreement_id: str
    epsilon: str | float = ""
    rho: str | float = ""
    delta: str | float = ""
    max_rows_per_person: int = 0
    max_groups_per_person: int = 0
    aggregates: tuple[query_service_pb2.Aggregate, ...] = ()
    grouped_by: tuple[str, ...] = ()
    filters: tuple[query_service_pb2.Filter, ...] = ()

    def _add(self, msg: query_service_pb2.Aggregate) -> Query:
        return replace(self, aggregates=(*self.aggregates, msg))

    def aggregate(self, text: str, *, quantile: float = 0.5) -> Query:
        """Add an aggregate written in the mini-language, e.g. "mean:panel.amount@0.5"."""
        return self._add(parse_aggregate(text, quantile=quantile))

    def count(
        self, *, name: str = "", epsilon: str = "", target_ci95: float | None = None
    ) -> Query:
        """Add the number of people (each counted once per group)."""
        return self._add(aggregate("count", name=name, epsilon=epsilon, target_ci95=target_ci95))

    def count_rows(
        self, *, name: str = "", epsilon: str = "", target_ci95: float | None = None
    ) -> Query:
        """Add the number of joined rows."""
        return self._add(
            aggregate("count_rows", name=name, epsilon=epsilon, target_ci95=target_ci95)
        )

    def sum(
        self, column: str, *, name: str = "", epsilon: str = "", target_ci95: float | None = None
    ) -> Query:
        """Add the sum of a numeric column."""
        return self._add(
            aggregate("sum", column, name=name, epsilon=epsilon, target_ci95=target_ci95)
        )

    def mean(
        self, column: str, *, name: str = "", epsilon: str = "", target_ci95: float | None = None
    ) -> Query:
        """Add the mean of a numeric column."""
        return self._add(
            aggregate("mean", column, name=name, epsilon=epsilon, target_ci95=target_ci95)
        )

    def variance(
        self, column: str, *, name: str = "", epsilon: str = "", target_ci95: float | None = None
    ) -> Query:
        """Add the variance of a numeric column."""
        return self._add(
            aggregate("variance", column, name=name, epsilon=epsilon, target_ci95=target_ci95)
        )

    def quantile(self, column: str, level: float, *, name: str = "", epsilon: str = "") -> Query:
        """Add a quantile of a numeric column (level 0.5: the median), named after its level."""
        _check_level(level)
        return self._add(
            aggregate(
                "quantile",
                column,
                name=name or quantile_name(column, level),
                epsilon=epsilon,
                quantile=level,
            )
        )

    def median(self, column: str, *, name: str = "", epsilon: str = "") -> Query:
        """Add the median of a numeric column."""
        return self.quantile(column, 0.5, name=name, epsilon=epsilon)

    def group_by(self, *columns: str) -> Query:
        """Group by these columns (public categorical columns, or one text column)."""
        return replace(self, grouped_by=(*self.grouped_by, *columns))

    def where(self, column: str, *values: str) -> Query:
        """Keep rows whose categorical `column` is one of `values`."""
        return replace(self, filters=(*self.filters, where_in(column, *values)))

    def where_not(self, column: str, *values: str) -> Query:
        """Keep rows whose categorical `column` is none of `values`."""
        return replace(self, filters=(*self.filters, where_not_in(column, *values)))

    def at_least(self, column: str, value: float) -> Query:
        """Keep rows whose numeric `column` is at least `value`."""
        return replace(self, filters=(*self.filters, where_range(column, ">=", value)))

    def at_most(self, column: str, value: float) -> Query:
        """Keep rows whose numeric `column` is at most `value`."""
        return replace(self, filters=(*self.filters, where_range(column, "<=", value)))

    def filter(self, text: str) -> Query:
        """Add a filter written in the mini-language, e.g. "panel.amount>=50"."""
        return replace(self, filters=(*self.filters, parse_filter(text)))

    def build(self) -> query_service_pb2.Query:
        """The query message the hub takes."""
        return query(
            self.agreement_id,
            _text(self.epsilon),
            self.aggregates,
            group_by=self.grouped_by,
            filters=self.filters,
            max_rows_per_person=self.max_rows_per_person,
            max_groups_per_person=self.max_groups_per_person,
            rho=_text(self.rho),
            delta=_text(self.delta),
        )
