"""GROUP BY expressions as the hub's group_by strings: columns, DATE_TRUNC, WIDTH_BUCKET, CASE.

The hub releases every cell of a grouping's public domain, so a grouping is one it can
enumerate: a column (its public domain), a date truncated to a month, week or day
("month:panel.purchased_on"), or a number in fixed bins ("bins:panel.amount:0,50,100[:labels]").
"""

from __future__ import annotations

import re
from decimal import Decimal

from sqlglot import exp

from entremise.sdk.sql.literals import decimal_text, literal, number
from entremise.sdk.sql.refusal import refuse
from entremise.sdk.sql.scope import Scope

_TRUNC_UNITS = {"MONTH": "month", "WEEK": "week", "DAY": "day"}


def group_string(scope: Scope, node: exp.Expression) -> str:
    """The hub's group_by string of a grouping expression."""
    if isinstance(node, exp.Paren):
        return group_string(scope, node.this)
    if isinstance(node, exp.Column):
        return scope.column(node, "GROUP BY")
    if isinstance(node, exp.TimestampTrunc | exp.DateTrunc | exp.TimeTrunc):
        unit = node.args.get("unit")
        word = (unit.name if unit is not None else "").upper()
        if word not in _TRUNC_UNITS:
            raise refuse(node, "DATE_TRUNC takes 'month', 'week' or 'day'")
        if node.args.get("zone"):
            raise refuse(node, "DATE_TRUNC takes no time zone: dates have none")
        return f"{_TRUNC_UNITS[word]}:{scope.column(node.this, 'DATE_TRUNC')}"
    if isinstance(node, exp.WidthBucket):
        return _width_bucket(scope, node)
    if isinstance(node, exp.Case):
        return _case(scope, node)
    if isinstance(node, exp.AggFunc):
        raise refuse(node, "aggregates cannot be grouped by")
    raise refuse(
        node,
        "not a supported grouping (a column, DATE_TRUNC, WIDTH_BUCKET or CASE WHEN col < ...)",
    )


def expression_name(node: exp.Expression) -> str:
    """PostgreSQL's name of an unaliased expression column."""
    if isinstance(node, exp.TimestampTrunc | exp.DateTrunc | exp.TimeTrunc):
        return "date_trunc"
    if isinstance(node, exp.WidthBucket):
        return "width_bucket"
    if isinstance(node, exp.Case):
        return "case"
    return node.key.lower()


def _width_bucket(scope: Scope, node: exp.WidthBucket) -> str:
    if node.args.get("threshold") is not None:
        raise refuse(node, "WIDTH_BUCKET takes (column, low, high, count)")
    column = scope.column(node.this, "WIDTH_BUCKET")
    parts = [node.args.get(k) for k in ("min_value", "max_value", "num_buckets")]
    if any(p is None for p in parts):
        raise refuse(node, "WIDTH_BUCKET takes (column, low, high, count)")
    low, high, count = (number(p, "WIDTH_BUCKET") for p in parts if p is not None)
    if count != count.to_integral_value() or count < 1:
        raise refuse(node, "WIDTH_BUCKET's count is a whole number of at least 1")
    if not low < high:
        raise refuse(node, "WIDTH_BUCKET's low is below its high")
    n = int(count)
    edges = [low + (high - low) * i / n for i in range(n + 1)]
    return f"bins:{column}:{','.join(decimal_text(e) for e in edges)}"


def _case(scope: Scope, node: exp.Case) -> str:
    if node.this is not None:
        raise refuse(node, "CASE x WHEN is not supported: write CASE WHEN col < e THEN ...")
    default = node.args.get("default")
    if default is None:
        raise refuse(node, "CASE needs an ELSE: every value falls in one bin")
    column: str | None = None
    edges: list[Decimal] = []
    labels: list[str] = []
    for branch in node.args.get("ifs") or []:
        cond = branch.this
        while isinstance(cond, exp.Paren):
            cond = cond.this
        if isinstance(cond, exp.LT) and isinstance(cond.this, exp.Column):
            col_node, edge_node = cond.this, cond.expression
        elif isinstance(cond, exp.GT) and isinstance(cond.expression, exp.Column):
            col_node, edge_node = cond.expression, cond.this
        else:
            raise refuse(cond, "CASE bins take WHEN column < number (bins are [low, high))")
        name = scope.column(col_node, "CASE")
        if column is not None and name != column:
            raise refuse(node, "CASE bins compare one column")
        column = name
        edge = number(edge_node, "CASE")
        if edges and edge <= edges[-1]:
            raise refuse(node, "CASE bins take increasing bounds")
        edges.append(edge)
        labels.append(_label(branch.args["true"]))
    labels.append(_label(default))
    if column is None:  # pragma: no cover - sqlglot requires a WHEN
        raise refuse(node, "CASE needs a WHEN")
    return f"bins:{column}:{','.join(decimal_text(e) for e in edges)}:{'|'.join(labels)}"


def _label(node: exp.Expression) -> str:
    lit = literal(node, "a CASE label")
    if lit.kind != "string" or not lit.text or re.search(r"[|:,]", lit.text):
        raise refuse(node, "a CASE label is a non-empty string without | : or ,")
    return lit.text
