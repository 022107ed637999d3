"""WHERE as the hub's filter tree: comparisons, IN and BETWEEN on columns, under AND/OR/NOT.

The hub filters joined rows on public values before any noise, so a condition compares one
column with literals; NOT is pushed down to the comparisons (De Morgan), leaving a tree of
`all_of` / `any_of` nodes over IN, NOT IN and range leaves.
"""

from __future__ import annotations

from sqlglot import exp

from entremise.sdk.sql.literals import DATE, hub_number, literal
from entremise.sdk.sql.model import Op
from entremise.sdk.sql.refusal import refuse
from entremise.sdk.sql.scope import Scope
from entremise.v1 import query_service_pb2

#: SQL's comparison nodes, as operators (WHERE and HAVING read the same six).
COMPARISONS: dict[type[exp.Expression], Op] = {
    exp.EQ: "=",
    exp.NEQ: "<>",
    exp.LT: "<",
    exp.LTE: "<=",
    exp.GT: ">",
    exp.GTE: ">=",
}
#: An operator with its sides swapped (`5 < x` is `x > 5`).
FLIPPED: dict[Op, Op] = {"=": "=", "<>": "<>", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_NEGATED: dict[Op, Op] = {"=": "<>", "<>": "=", "<": ">=", "<=": ">", ">": "<=", ">=": "<"}
_LEAF_OPS = {
    "<": query_service_pb2.FILTER_OP_LT,
    "<=": query_service_pb2.FILTER_OP_LE,
    ">": query_service_pb2.FILTER_OP_GT,
    ">=": query_service_pb2.FILTER_OP_GE,
}


def filters(scope: Scope, select: exp.Select) -> list[query_service_pb2.Filter]:
    """The query's filters: WHERE's top-level AND split into a list, else its one tree."""
    where = select.args.get("where")
    if where is None:
        return []
    tree = _condition(scope, where.this, negate=False)
    if tree.all_of and not tree.column:
        return list(tree.all_of)
    return [tree]


def _condition(scope: Scope, node: exp.Expression, *, negate: bool) -> query_service_pb2.Filter:
    if isinstance(node, exp.Paren):
        return _condition(scope, node.this, negate=negate)
    if isinstance(node, exp.Not):
        return _condition(scope, node.this, negate=not negate)
    if isinstance(node, exp.And | exp.Or):
        parts = [
            _condition(scope, node.this, negate=negate),
            _condition(scope, node.expression, negate=negate),
        ]
        conjunction = isinstance(node, exp.And) != negate  # De Morgan
        return _node(parts, conjunction)
    if isinstance(node, exp.In):
        return _in(scope, node, negate)
    if isinstance(node, exp.Between):
        return _between(scope, node, negate)
    op = COMPARISONS.get(type(node))
    if op is not None:
        return _comparison(scope, node, op, negate)
    if isinstance(node, exp.Is):
        raise refuse(node, "IS NULL is not supported: the hub filters on public values only")
    if isinstance(node, exp.Like | exp.ILike | exp.SimilarTo | exp.RegexpLike):
        raise refuse(node, "pattern matching is not supported: filter with = or IN")
    if isinstance(node, exp.Exists | exp.Subquery | exp.Select):
        raise refuse(node, "subqueries are not supported: the hub answers one SELECT")
    raise refuse(node, "not a supported condition (=, <>, <, <=, >, >=, IN, BETWEEN)")


def _in(scope: Scope, node: exp.In, negate: bool) -> query_service_pb2.Filter:
    if node.args.get("query") is not None or node.args.get("unnest") is not None:
        raise refuse(node, "subqueries are not supported: the hub answers one SELECT")
    column = scope.column(node.this, "IN")
    values = [literal(v, "IN").text for v in node.expressions]
    op = query_service_pb2.FILTER_OP_NOT_IN if negate else query_service_pb2.FILTER_OP_IN
    return query_service_pb2.Filter(column=column, op=op, values=values)


def _between(scope: Scope, node: exp.Between, negate: bool) -> query_service_pb2.Filter:
    if node.args.get("symmetric"):
        raise refuse(node, "BETWEEN SYMMETRIC is not supported: write low first")
    column = scope.column(node.this, "BETWEEN")
    low = _bound(node.args["low"], node)
    high = _bound(node.args["high"], node)
    if negate:
        return _node([_leaf(column, "<", low), _leaf(column, ">", high)], conjunction=False)
    return _node([_leaf(column, ">=", low), _leaf(column, "<=", high)], conjunction=True)


def _bound(value: exp.Expression, node: exp.Expression) -> str:
    lit = literal(value, "a range")
    if lit.kind == "number":
        return hub_number(lit.text)
    if DATE.match(lit.text):
        return lit.text
    raise refuse(node, f"'{lit.text}': a range compares with a number or DATE 'YYYY-MM-DD'")


def _comparison(
    scope: Scope, node: exp.Expression, op: Op, negate: bool
) -> query_service_pb2.Filter:
    left, right = node.this, node.args["expression"]
    if not isinstance(left, exp.Column) and isinstance(right, exp.Column):
        left, right = right, left
        op = FLIPPED[op]
    if negate:
        op = _NEGATED[op]
    column = scope.column(left, f"'{op}'")
    if isinstance(right, exp.Column):
        raise refuse(node, "a column compares with a literal, not another column")
    if op in ("=", "<>"):
        text = literal(right, f"'{op}'").text
        kind = query_service_pb2.FILTER_OP_IN if op == "=" else query_service_pb2.FILTER_OP_NOT_IN
        return query_service_pb2.Filter(column=column, op=kind, values=[text])
    return _leaf(column, op, _bound(right, node))


def _leaf(column: str, op: str, value: str) -> query_service_pb2.Filter:
    return query_service_pb2.Filter(column=column, op=_LEAF_OPS[op], values=[value])


def _node(parts: list[query_service_pb2.Filter], conjunction: bool) -> query_service_pb2.Filter:
    """AND (all_of) or OR (any_of) of parts, nested nodes of the same kind flattened."""
    flat: list[query_service_pb2.Filter] = []
    for part in parts:
        same = part.all_of if conjunction else part.any_of
        if not part.column and len(same):
            flat.extend(same)
        else:
            flat.append(part)
    return (
        query_service_pb2.Filter(all_of=flat)
        if conjunction
        else query_service_pb2.Filter(any_of=flat)
    )
