"""The SELECT: one statement checked and translated into the hub's query (`translate`).

The statement must be one plain SELECT over the agreement's datasets. Its GROUP BY becomes the
query's group_by strings (module `grouping`), its select list the aggregates (`aggregates`)
and the groups shown, its WHERE the filters (`where`); HAVING, ORDER BY and LIMIT/OFFSET
become the `PostProcessing` applied to the released rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from entremise.sdk.sql.aggregates import HUB_KINDS, aggregate_call, budget_comment, is_aggregate
from entremise.sdk.sql.grouping import expression_name, group_string
from entremise.sdk.sql.literals import SqlLiteral, literal, number
from entremise.sdk.sql.model import (
    AllOf,
    AnyOf,
    Compare,
    Negate,
    OrderKey,
    OutputColumn,
    PostProcessing,
    Predicate,
    SqlQuery,
)
from entremise.sdk.sql.refusal import SqlRefusal, refuse
from entremise.sdk.sql.scope import PERSON, Scope
from entremise.sdk.sql.where import COMPARISONS, FLIPPED, filters
from entremise.v1 import query_service_pb2

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def _statement(text: str) -> exp.Select:
    try:
        statements = sqlglot.parse(text, read="postgres")
    except ParseError as exc:
        errors = exc.errors[0] if exc.errors else {}
        line, col = errors.get("line"), errors.get("col")
        desc = str(errors.get("description") or exc).splitlines()[0]
        where = f" at line {line}, column {col}" if line else ""
        raise SqlRefusal(f"SQL does not parse{where}: {desc}") from None
    except TokenError as exc:
        raise SqlRefusal(f"SQL does not parse: {str(exc).splitlines()[0]}") from None
    given = [s for s in statements if s is not None]
    if len(given) != 1:
        raise SqlRefusal(f"{len(given)} statements: give one SELECT" if given else "no SQL given")
    stmt = given[0]
    if isinstance(stmt, exp.Union | exp.Intersect | exp.Except):
        word = {exp.Union: "UNION", exp.Intersect: "INTERSECT", exp.Except: "EXCEPT"}[type(stmt)]
        raise SqlRefusal(f"{word}: one SELECT only (each SELECT is its own release)")
    if isinstance(stmt, exp.Insert | exp.Update | exp.Delete | exp.Merge):
        raise SqlRefusal(
            f"{stmt.key.upper()}: the hub answers SELECT only; data is uploaded by partners"
        )
    if not isinstance(stmt, exp.Select):
        raise SqlRefusal(f"{stmt.key.upper()}: the hub answers SELECT only")
    if stmt.args.get("with_") or stmt.args.get("with"):
        raise SqlRefusal("WITH (a common table expression): one SELECT only, no subqueries")
    return stmt


def _check_select(stmt: exp.Select) -> None:
    if stmt.args.get("distinct"):
        raise SqlRefusal("SELECT DISTINCT: would release rows; select aggregates")
    for word, key in (
        ("INTO", "into"),
        ("WINDOW", "windows"),
        ("QUALIFY", "qualify"),
        ("FOR UPDATE", "locks"),
    ):
        if stmt.args.get(key):
            raise SqlRefusal(f"{word}: not supported in a query")
    for node in stmt.walk():
        if node is stmt:
            continue
        if isinstance(node, exp.Select | exp.Subquery):
            raise refuse(node, "subqueries are not supported: the hub answers one SELECT")
        if isinstance(node, exp.Window):
            raise refuse(node, "window functions are not supported: the hub releases aggregates")


def _output_name(item: exp.Expression, default: str) -> str:
    if isinstance(item, exp.Alias):
        ident = item.args.get("alias")
        if isinstance(ident, exp.Identifier) and ident.quoted:
            return str(ident.this)
        return item.alias.lower()
    return default


def _ordinal(node: exp.Expression, count: int, where: str) -> int | None:
    """A 0-based select-list position for `GROUP BY 2` / `ORDER BY 2`, else None."""
    if isinstance(node, exp.Literal) and not node.is_string:
        try:
            n = int(node.this)
        except ValueError:
            raise refuse(node, f"{where} takes a column, an alias or a position") from None
        if not 1 <= n <= count:
            raise refuse(node, f"{where} position {n} is not in the select list (1-{count})")
        return n - 1
    return None


def _group_by(stmt: exp.Select, items: list[exp.Expression], scope: Scope) -> list[str]:
    """GROUP BY's grouping strings; ordinals and aliases refer to the select list."""
    aliases = {
        item.alias.lower(): item for item in items if isinstance(item, exp.Alias) and item.alias
    }
    group_strings: list[str] = []
    group = stmt.args.get("group")
    if group is not None:
        if group.args.get("rollup") or group.args.get("cube") or group.args.get("grouping_sets"):
            raise refuse(group, "ROLLUP, CUBE and GROUPING SETS are not supported")
        for node in group.expressions:
            position = _ordinal(node, len(items), "GROUP BY")
            if position is not None:
                target = items[position]
                node = target.this if isinstance(target, exp.Alias) else target
            elif (
                isinstance(node, exp.Column)
                and not node.table
                and node.name.lower() in aliases
                and not is_aggregate(aliases[node.name.lower()].this)
            ):
                node = aliases[node.name.lower()].this
            if is_aggregate(node):
                raise refuse(node, "aggregates cannot be grouped by")
            grouping = group_string(scope, node)
            if grouping in group_strings:
                raise refuse(node, "grouped by twice")
            group_strings.append(grouping)
    return group_strings


def translate(text: str) -> SqlQuery:
    """Translate one SELECT into the hub's query; `SqlRefusal` names what is not supported."""
    stmt = _statement(text)
    _check_select(stmt)
    scope = Scope(stmt)
    items = list(stmt.expressions)
    if any(isinstance(i, exp.Star) or (isinstance(i, exp.Column) and i.is_star) for i in items):
        raise SqlRefusal("SELECT *: would release rows; select aggregates")

    group_strings = _group_by(stmt, items, scope)

    # SELECT: group expressions (which must be in GROUP BY) and aggregates.
    aggregates: list[query_service_pb2.Aggregate] = []
    agg_sql: dict[str, int] = {}
    outputs: list[OutputColumn] = []
    names: set[str] = set()
    for item in items:
        inner = item.this if isinstance(item, exp.Alias) else item
        if is_aggregate(inner):
            agg = aggregate_call(scope, inner)
            name = _output_name(item, agg.default_name)
            if not _NAME.match(name):
                raise refuse(
                    item,
                    f"aggregate name {name!r}: 1-63 lowercase letters, digits and _, "
                    "starting with a letter",
                )
            share, target = budget_comment(item)
            if target is not None and agg.kind in ("quantile",):
                raise refuse(item, "an accuracy target applies to counts, sums, means, variances")
            msg = query_service_pb2.Aggregate(
                name=name,
                kind=HUB_KINDS[agg.kind],
                column=agg.column,
                epsilon=share,
                quantile="" if agg.quantile is None else repr(agg.quantile),
            )
            if target is not None:
                msg.target_ci95 = target
            agg_sql[inner.sql(dialect="postgres")] = len(aggregates)
            outputs.append(OutputColumn(name, aggregate=len(aggregates)))
            aggregates.append(msg)
        else:
            if isinstance(inner, exp.Column) and inner.name.lower() == PERSON:
                raise refuse(inner, "would release the person: select aggregates")
            try:
                grouping = group_string(scope, inner)
            except SqlRefusal:
                if isinstance(inner, exp.Literal | exp.Binary):
                    raise refuse(item, "not an aggregate nor a grouping") from None
                raise
            if grouping not in group_strings:
                raise refuse(
                    inner,
                    "must appear in GROUP BY or be used in an aggregate "
                    "(a bare column would release rows)",
                )
            default = (
                inner.name.lower() if isinstance(inner, exp.Column) else expression_name(inner)
            )
            name = _output_name(item, default)
            outputs.append(OutputColumn(name, group=group_strings.index(grouping)))
        if name in names:
            raise refuse(item, f"two output columns named {name!r}: give each an alias (AS ...)")
        names.add(name)
    if not aggregates:
        raise SqlRefusal("no aggregate in the select list: would release rows; select aggregates")

    def output_of(node: exp.Expression, where: str) -> str:
        position = _ordinal(node, len(items), where)
        if position is not None:
            return outputs[position].name
        if isinstance(node, exp.Column) and not node.table and node.name.lower() in names:
            return node.name.lower()
        if isinstance(node, exp.Column) and node.name in names:
            return node.name
        if is_aggregate(node):
            key = node.sql(dialect="postgres")
            if key in agg_sql:
                return outputs[[o.aggregate for o in outputs].index(agg_sql[key])].name
            raise refuse(
                node, f"{where} uses aggregates of the select list only (each costs budget)"
            )
        try:
            grouping = group_string(scope, node)
        except SqlRefusal:
            raise refuse(
                node, f"{where} takes select-list columns, aliases or aggregates"
            ) from None
        for out in outputs:
            if out.group is not None and group_strings[out.group] == grouping:
                return out.name
        raise refuse(node, f"{where} takes columns of the select list")

    post = _post_processing(stmt, output_of)
    query = query_service_pb2.Query(
        aggregates=aggregates,
        group_by=group_strings,
        filters=filters(scope, stmt),
    )
    return SqlQuery(text, query, tuple(scope.datasets), tuple(outputs), post)


def _post_processing(
    stmt: exp.Select, output_of: Callable[[exp.Expression, str], str]
) -> PostProcessing:
    having_node = stmt.args.get("having")
    having = None if having_node is None else _predicate(having_node.this, output_of)
    keys = []
    order = stmt.args.get("order")
    if order is not None:
        for ordered in order.expressions:
            if ordered.args.get("with_fill"):
                raise refuse(ordered, "WITH FILL is not supported")
            nulls_first = ordered.args.get("nulls_first")
            desc = bool(ordered.args.get("desc"))
            if nulls_first is not None and bool(nulls_first) != desc:
                raise refuse(
                    ordered, "NULLS FIRST/LAST: NULLs sort last ascending, first descending"
                )
            keys.append(OrderKey(output_of(ordered.this, "ORDER BY"), desc))
    limit = _count(stmt.args.get("limit"), "LIMIT")
    offset = _count(stmt.args.get("offset"), "OFFSET")
    return PostProcessing(having, tuple(keys), limit, offset or 0)


def _count(node: exp.Expression | None, word: str) -> int | None:
    if node is None:
        return None
    value = node.args.get("expression") or node.this
    if value is None:
        return None
    n = number(value, word)
    if n != n.to_integral_value() or n < 0:
        raise refuse(node, f"{word} takes a whole number")
    return int(n)


def _predicate(node: exp.Expression, output_of: Callable[[exp.Expression, str], str]) -> Predicate:
    if isinstance(node, exp.Paren):
        return _predicate(node.this, output_of)
    if isinstance(node, exp.Not):
        return Negate(_predicate(node.this, output_of))
    if isinstance(node, exp.And):
        return AllOf((_predicate(node.this, output_of), _predicate(node.expression, output_of)))
    if isinstance(node, exp.Or):
        return AnyOf((_predicate(node.this, output_of), _predicate(node.expression, output_of)))
    if isinstance(node, exp.Between):
        column = output_of(node.this, "HAVING")
        return AllOf(
            (
                Compare(column, ">=", _value(literal(node.args["low"], "HAVING"))),
                Compare(column, "<=", _value(literal(node.args["high"], "HAVING"))),
            )
        )
    if isinstance(node, exp.In) and not node.args.get("query"):
        column = output_of(node.this, "HAVING")
        return AnyOf(
            tuple(Compare(column, "=", _value(literal(v, "HAVING"))) for v in node.expressions)
        )
    op = COMPARISONS.get(type(node))
    if op is None:
        raise refuse(node, "HAVING takes comparisons of select-list values with literals")
    left, right = node.this, node.args["expression"]
    if isinstance(left, exp.Literal | exp.Neg | exp.Cast) and not isinstance(
        right, exp.Literal | exp.Neg | exp.Cast
    ):
        left, right = right, left
        op = FLIPPED[op]
    return Compare(output_of(left, "HAVING"), op, _value(literal(right, "HAVING")))


def _value(lit: SqlLiteral) -> str | float:
    return float(lit.text) if lit.kind == "number" else lit.text
