"""The aggregates of a select list, and the budget comments that set their shares.

Each aggregate is one the hub releases with noise: COUNT(*) (joined rows), COUNT(DISTINCT
person) (people), SUM, AVG, the variances and standard deviations, MEDIAN and
PERCENTILE_CONT, each over one column. A comment in the select item, /* epsilon 0.2 */ or
/* accuracy 20 */, sets that aggregate's share of the budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlglot import exp

from entremise.sdk.sql.literals import number
from entremise.sdk.sql.refusal import refuse
from entremise.sdk.sql.scope import PERSON, Scope
from entremise.v1 import query_service_pb2

_COMMENT = re.compile(
    r"^\s*(?P<word>accuracy|epsilon|rho|share)\s*[:=]?\s*(?P<value>[0-9.eE+-]+)\s*$", re.I
)
_BUDGET_WORD = re.compile(r"^\s*(accuracy|epsilon|rho|share)\b", re.I)

#: The hub's aggregate kind of each kind an `AggregateCall` names.
HUB_KINDS = {
    "count": query_service_pb2.AGGREGATE_KIND_COUNT,
    "count_rows": query_service_pb2.AGGREGATE_KIND_COUNT_ROWS,
    "sum": query_service_pb2.AGGREGATE_KIND_SUM,
    "mean": query_service_pb2.AGGREGATE_KIND_MEAN,
    "variance": query_service_pb2.AGGREGATE_KIND_VARIANCE,
    "stddev": query_service_pb2.AGGREGATE_KIND_STDDEV,
    "quantile": query_service_pb2.AGGREGATE_KIND_QUANTILE,
}


@dataclass(frozen=True)
class AggregateCall:
    """An aggregate as read: its kind, column, quantile level and PostgreSQL's default name."""

    kind: str
    column: str
    quantile: float | None
    default_name: str


_SIMPLE: dict[type[exp.Expression], tuple[str, str]] = {
    exp.Sum: ("sum", "sum"),
    exp.Avg: ("mean", "avg"),
    exp.Variance: ("variance", "variance"),
    exp.VariancePop: ("variance", "var_pop"),
    exp.Stddev: ("stddev", "stddev"),
    exp.StddevPop: ("stddev", "stddev_pop"),
    exp.StddevSamp: ("stddev", "stddev_samp"),
    exp.Median: ("quantile", "median"),
}


def is_aggregate(node: exp.Expression) -> bool:
    """True when `node` is or holds an aggregate (or a window function)."""
    return isinstance(node, exp.AggFunc | exp.WithinGroup | exp.Window) or any(
        isinstance(n, exp.AggFunc) for n in node.walk()
    )


def aggregate_call(scope: Scope, node: exp.Expression) -> AggregateCall:
    """The aggregate `node` is; `SqlRefusal` when the hub cannot release it."""
    if isinstance(node, exp.Window):
        raise refuse(node, "window functions are not supported: the hub releases aggregates")
    if isinstance(node, exp.Filter):
        raise refuse(node, "FILTER (WHERE ...) is not supported: use WHERE")
    if isinstance(node, exp.Count):
        arg = node.this
        if isinstance(arg, exp.Star):
            return AggregateCall("count_rows", "", None, "count")
        if (
            isinstance(arg, exp.Distinct)
            and len(arg.expressions) == 1
            and isinstance(arg.expressions[0], exp.Column)
            and arg.expressions[0].name.lower() == PERSON
        ):
            scope.dataset_of(arg.expressions[0])
            return AggregateCall("count", "", None, "count")
        raise refuse(
            node,
            f"counts are COUNT(*) (rows) or COUNT(DISTINCT {PERSON}) (people); "
            "COUNT of a column is not supported",
        )
    if isinstance(node, exp.WithinGroup):
        fn, order = node.this, node.expression
        if not isinstance(fn, exp.PercentileCont):
            raise refuse(node, "the only ordered-set aggregate is PERCENTILE_CONT")
        ordered = order.expressions if isinstance(order, exp.Order) else []
        if len(ordered) != 1 or ordered[0].args.get("desc"):
            raise refuse(node, "PERCENTILE_CONT takes WITHIN GROUP (ORDER BY column) ascending")
        level = number(fn.this, "PERCENTILE_CONT")
        if not 0 < level < 1:
            raise refuse(node, "PERCENTILE_CONT's level is between 0 and 1 (exclusive)")
        column = scope.column(ordered[0].this, "PERCENTILE_CONT")
        return AggregateCall("quantile", column, float(level), "percentile_cont")
    if isinstance(node, exp.PercentileCont | exp.PercentileDisc):
        raise refuse(node, "write PERCENTILE_CONT(q) WITHIN GROUP (ORDER BY column)")
    for kind_type, (kind, default) in _SIMPLE.items():
        if type(node) is kind_type:
            arg = node.this
            if isinstance(arg, exp.Distinct):
                raise refuse(node, "DISTINCT inside an aggregate is not supported")
            if not isinstance(arg, exp.Column):
                raise refuse(node, "aggregates take a column, not an expression")
            if node.args.get("expressions"):
                raise refuse(node, "aggregates take one column")
            column = scope.column(arg, default.upper())
            return AggregateCall(kind, column, 0.5 if kind == "quantile" else None, default)
    if isinstance(node, exp.AggFunc):
        raise refuse(node, "not a supported aggregate")
    if is_aggregate(node):
        raise refuse(node, "arithmetic on aggregates is not supported: compute it afterwards")
    raise refuse(node, "not an aggregate")


def budget_comment(node: exp.Expression) -> tuple[str, float | None]:
    """(share, target) from /* epsilon 0.2 */ or /* accuracy 20 */ comments in a select item.

    Other comments are left alone; one starting with accuracy, epsilon, rho or share must be
    one of these.
    """
    share, target = "", None
    for part in node.walk():
        for comment in part.comments or []:
            m = _COMMENT.match(comment)
            if not m and not _BUDGET_WORD.match(comment):
                continue  # an ordinary comment
            if not m:
                raise refuse(
                    f"/*{comment}*/",
                    "a comment on an aggregate is /* accuracy N */ or /* epsilon E */",
                )
            word, value = m["word"].lower(), m["value"]
            try:
                amount = float(value)
            except ValueError:
                raise refuse(f"/*{comment}*/", f"{value!r} is not a number") from None
            if word == "accuracy":
                target = amount
            else:
                share = value
    if share and target is not None:
        raise refuse(node, "give an aggregate an epsilon share or an accuracy, not both")
    return share, target
