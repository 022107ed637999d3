"""DP SQL: one PostgreSQL SELECT translated into the hub's query, plus post-processing.

::

    sql = translate(
        "SELECT bank.segment, COUNT(DISTINCT person) AS people, AVG(panel.amount) AS spend "
        "FROM bank JOIN panel GROUP BY bank.segment HAVING COUNT(DISTINCT person) > 100 "
        "ORDER BY spend DESC LIMIT 2"
    )
    sql.query          # the query_service_pb2.Query (no agreement id, no budget yet)
    sql.datasets       # ("bank", "panel"): the datasets named in FROM
    sql.columns        # ("segment", "people", "spend"): the output columns, in SELECT order
    sql.post           # HAVING, ORDER BY, LIMIT/OFFSET, applied to the released (noisy) cells

The hub releases every cell of the grouping's public domain, with noise; HAVING, ORDER BY and
LIMIT then act on those noisy values on the analyst's side (`PostProcessing.select`,
`post_process`), which is post-processing and costs nothing. Anything outside the supported
subset raises `SqlRefusal`, a `QueryError`, with one line naming the construct and why.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from itertools import pairwise
from typing import Literal, TypeAlias

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from entremise.sdk.query import QueryError
from entremise.sdk.results import Agreement, AgreementStatus, QueryResult
from entremise.v1 import query_service_pb2

#: The pseudo-column naming the person (the join key): only in COUNT(DISTINCT person) and ON.
PERSON = "person"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_COMMENT = re.compile(
    r"^\s*(?P<word>accuracy|epsilon|rho|share)\s*[:=]?\s*(?P<value>[0-9.eE+-]+)\s*$", re.I
)
_BUDGET_WORD = re.compile(r"^\s*(accuracy|epsilon|rho|share)\b", re.I)
_TRUNC_UNITS = {"MONTH": "month", "WEEK": "week", "DAY": "day"}


class SqlRefusal(QueryError):
    """SQL outside the supported subset: one line naming the construct and saying why."""


def _refuse(node: exp.Expression | str, why: str) -> SqlRefusal:
    text = node if isinstance(node, str) else node.sql(dialect="postgres")
    if len(text) > 80:
        text = text[:77] + "..."
    return SqlRefusal(f"{text}: {why}")


# -- what a translation holds ----------------------------------------------------------------

Value: TypeAlias = str | float | None
Op = Literal["=", "<>", "<", "<=", ">", ">="]


@dataclass(frozen=True)
class Compare:
    """`column op value` on an output column (a group label or a noisy aggregate)."""

    column: str
    op: Op
    value: str | float


@dataclass(frozen=True)
class AllOf:
    """AND of predicates."""

    parts: tuple[Predicate, ...]


@dataclass(frozen=True)
class AnyOf:
    """OR of predicates."""

    parts: tuple[Predicate, ...]


@dataclass(frozen=True)
class Negate:
    """NOT of a predicate."""

    part: Predicate


Predicate: TypeAlias = Compare | AllOf | AnyOf | Negate


@dataclass(frozen=True)
class OrderKey:
    """One ORDER BY key: an output column, ascending or not (NULLs last ascending, as SQL)."""

    column: str
    descending: bool = False


@dataclass(frozen=True)
class PostProcessing:
    """HAVING, ORDER BY, LIMIT and OFFSET, applied to released rows (noisy values)."""

    having: Predicate | None = None
    order_by: tuple[OrderKey, ...] = ()
    limit: int | None = None
    offset: int = 0

    @property
    def empty(self) -> bool:
        """True when every released row is kept, in the hub's order."""
        return self.having is None and not self.order_by and self.limit is None and not self.offset

    def select(self, rows: Sequence[Mapping[str, Value]]) -> list[int]:
        """Indices of the rows kept, in output order (a pure function of the rows)."""
        kept = [i for i, row in enumerate(rows) if _holds(self.having, row) is True]
        for key in reversed(self.order_by):  # stable sorts, last key first
            column = key.column

            def by(i: int, column: str = column) -> tuple[int, float | str]:
                return _sort_key(rows[i].get(column))

            kept.sort(key=by, reverse=key.descending)
        end = None if self.limit is None else self.offset + self.limit
        return kept[self.offset : end]


def _sort_key(value: Value) -> tuple[int, float | str]:
    """NULLs after every value: last ascending, first descending (as SQL's default)."""
    return (1, 0.0) if value is None else (0, value)


def _compare(left: Value, op: Op, right: str | float) -> bool | None:
    if left is None:
        return None
    if isinstance(left, str) != isinstance(right, str):
        left, right = str(left), str(right)
    ops: dict[str, Callable[[object, object], bool]] = {
        "=": lambda a, b: a == b,
        "<>": lambda a, b: a != b,
        "<": lambda a, b: a < b,  # type: ignore[operator]
        "<=": lambda a, b: a <= b,  # type: ignore[operator]
        ">": lambda a, b: a > b,  # type: ignore[operator]
        ">=": lambda a, b: a >= b,  # type: ignore[operator]
    }
    return ops[op](left, right)


def _holds(p: Predicate | None, row: Mapping[str, Value]) -> bool | None:
    """SQL's three-valued logic: None is unknown (a NULL compared)."""
    if p is None:
        return True
    if isinstance(p, Compare):
        return _compare(row.get(p.column), p.op, p.value)
    if isinstance(p, Negate):
        inner = _holds(p.part, row)
        return None if inner is None else not inner
    values = [_holds(q, row) for q in p.parts]
    if isinstance(p, AllOf):
        if False in values:
            return False
        return None if None in values else True
    if True in values:
        return True
    return None if None in values else False


@dataclass(frozen=True)
class OutputColumn:
    """One column of the SELECT list: a group (index into group_by) or an aggregate."""

    name: str
    group: int | None = None
    aggregate: int | None = None


@dataclass(frozen=True)
class SqlQuery:
    """A translated SELECT: the hub's query (no agreement, no budget), FROM, outputs, post."""

    sql: str
    query: query_service_pb2.Query
    datasets: tuple[str, ...]
    outputs: tuple[OutputColumn, ...]
    post: PostProcessing

    @property
    def columns(self) -> tuple[str, ...]:
        """The output column names, in SELECT order."""
        return tuple(o.name for o in self.outputs)

    def message(
        self,
        agreement_id: str,
        *,
        epsilon: str = "",
        rho: str = "",
        delta: str = "",
    ) -> query_service_pb2.Query:
        """The query message with its agreement and budget set."""
        msg = query_service_pb2.Query()
        msg.CopyFrom(self.query)
        msg.agreement_id, msg.epsilon, msg.rho, msg.delta = agreement_id, epsilon, rho, delta
        return msg

    def rows(self, results: Sequence[query_service_pb2.AggregateResult]) -> list[dict[str, Value]]:
        """The released rows: one per group key, each output column by name."""
        return [row for _, row in _released_rows(self, results)]


def _released_rows(
    sql: SqlQuery, results: Sequence[query_service_pb2.AggregateResult]
) -> list[tuple[tuple[str, ...], dict[str, Value]]]:
    keys: list[tuple[str, ...]] = []
    values: dict[tuple[str, ...], dict[int, Value]] = {}
    for index, result in enumerate(results):
        for cell in result.cells:
            key = tuple(cell.group)
            if key not in values:
                keys.append(key)
                values[key] = {}
            values[key][index] = cell.value if cell.HasField("value") else None
    rows = []
    for key in keys:
        row: dict[str, Value] = {}
        for out in sql.outputs:
            if out.group is not None:
                row[out.name] = key[out.group] if out.group < len(key) else None
            elif out.aggregate is not None:
                row[out.name] = values[key].get(out.aggregate)
        rows.append((key, row))
    return rows


def post_process(
    sql: SqlQuery, results: Sequence[query_service_pb2.AggregateResult]
) -> list[query_service_pb2.AggregateResult]:
    """The released results with HAVING, ORDER BY and LIMIT/OFFSET applied to their cells."""
    released = _released_rows(sql, results)
    order = sql.post.select([row for _, row in released])
    keys = [released[i][0] for i in order]
    out = []
    for result in results:
        by_key = {tuple(c.group): c for c in result.cells}
        msg = query_service_pb2.AggregateResult(
            name=result.name, kind=result.kind, column=result.column
        )
        msg.cells.extend(by_key[k] for k in keys if k in by_key)
        out.append(msg)
    return out


# -- translation -------------------------------------------------------------------------------


def _number(text: str) -> str:
    """A number as the hub reads it (repr of its float, as the SDK's builder writes it)."""
    return repr(float(text))


def _decimal_text(value: Decimal) -> str:
    """An edge as written (50, 12.5), or its float's repr when it has no short decimal (1/3)."""
    value = value.normalize()
    if len(value.as_tuple().digits) > 15:
        return repr(float(value))
    return format(value, "f")


@dataclass
class _Literal:
    text: str
    kind: Literal["string", "number", "date"]


class _Translator:
    def __init__(self, select: exp.Select, text: str) -> None:
        self.select = select
        self.text = text
        self.tables: dict[str, str] = {}  # alias or name -> dataset name
        self.datasets: list[str] = []

    # -- FROM ---------------------------------------------------------------------------------

    def tables_of(self) -> None:
        from_ = self.select.args.get("from_") or self.select.args.get("from")
        if from_ is None:
            raise _refuse("SELECT without FROM", "name the agreement's datasets in FROM")
        self._table(from_.this)
        for join in self.select.args.get("joins") or []:
            self._join(join)

    def _table(self, node: exp.Expression) -> str:
        if not isinstance(node, exp.Table) or not isinstance(node.this, exp.Identifier):
            if isinstance(node, exp.Subquery):
                raise _refuse(node, "subqueries are not supported: the hub answers one SELECT")
            raise _refuse(node, "FROM takes dataset names")
        if node.args.get("db") or node.args.get("catalog"):
            raise _refuse(node, "FROM takes dataset names, without a schema")
        name = node.name.lower()
        if name in self.datasets:
            raise _refuse(node, "a dataset is named twice: the hub joins each dataset once")
        self.datasets.append(name)
        self.tables[name] = name
        alias = node.alias
        if alias:
            self.tables[alias.lower()] = name
        return name

    def _join(self, join: exp.Join) -> None:
        side, kind = join.args.get("side"), join.args.get("kind")
        word = " ".join(str(w) for w in (side, kind) if w) or "comma"
        if side or (kind and str(kind).upper() not in ("INNER",)):
            raise _refuse(f"{word.upper()} JOIN", "the hub joins on the person only: inner join")
        if join.args.get("method"):
            raise _refuse(join, "the hub joins on the person only: inner join")
        name = self._table(join.this)
        using = join.args.get("using")
        on = join.args.get("on")
        if using:
            names = [u.name.lower() for u in using]
            if names != [PERSON]:
                raise _refuse(join, f"the hub joins on the person only: USING ({PERSON})")
        elif on is not None:
            if not (
                isinstance(on, exp.EQ)
                and isinstance(on.this, exp.Column)
                and isinstance(on.expression, exp.Column)
                and on.this.name.lower() == PERSON
                and on.expression.name.lower() == PERSON
            ):
                raise _refuse(on, f"the hub joins on the person only: ON a.{PERSON} = b.{PERSON}")
            for col in (on.this, on.expression):
                self._dataset_of(col)
        elif "pivots" not in join.args:  # sqlglot's mark of a comma, not a JOIN
            raise _refuse(
                f"FROM ..., {name}", f"write JOIN {name}: the hub joins on the person only"
            )

    def _dataset_of(self, column: exp.Column) -> str:
        table = column.table
        if not table:
            return ""
        if table.lower() not in self.tables:
            raise _refuse(column, f"no dataset {table} in FROM")
        return self.tables[table.lower()]

    # -- columns and literals -----------------------------------------------------------------

    def column(self, node: exp.Expression, where: str) -> str:
        if not isinstance(node, exp.Column) or not isinstance(node.this, exp.Identifier):
            if isinstance(node, exp.Column | exp.Star):
                raise _refuse(node, f"{where} takes a column")
            raise _refuse(node, f"{where} takes a column, not an expression")
        if node.args.get("db") or node.args.get("catalog"):
            raise _refuse(node, "columns are DATASET.COLUMN")
        name = node.name.lower()
        if name == PERSON:
            raise _refuse(
                node,
                f"the {PERSON} is the join key: it is only counted, COUNT(DISTINCT {PERSON})",
            )
        dataset = self._dataset_of(node)
        return f"{dataset}.{name}" if dataset else name

    def literal(self, node: exp.Expression, where: str) -> _Literal:
        if isinstance(node, exp.Paren):
            return self.literal(node.this, where)
        if isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal):
            inner = self.literal(node.this, where)
            if inner.kind == "number":
                return _Literal("-" + inner.text, "number")
        if isinstance(node, exp.Literal):
            if node.is_string:
                return _Literal(node.this, "string")
            return _Literal(node.this, "number")
        if isinstance(node, exp.Cast) and isinstance(node.this, exp.Literal):
            target = node.to.this if isinstance(node.to, exp.DataType) else None
            if target == exp.DataType.Type.DATE and _DATE.match(node.this.this):
                return _Literal(node.this.this, "date")
            raise _refuse(node, "the only typed literal is DATE 'YYYY-MM-DD'")
        if isinstance(node, exp.Null):
            raise _refuse(node, f"NULL in {where}: comparisons with NULL are never true")
        raise _refuse(node, f"{where} compares with a literal (string, number or DATE '...')")

    def number(self, node: exp.Expression, where: str) -> Decimal:
        lit = self.literal(node, where)
        if lit.kind != "number":
            raise _refuse(node, f"{where} takes a number")
        try:
            return Decimal(lit.text)
        except InvalidOperation:  # pragma: no cover - sqlglot only gives numbers here
            raise _refuse(node, f"{where} takes a number") from None

    # -- WHERE --------------------------------------------------------------------------------

    def filters(self) -> list[query_service_pb2.Filter]:
        where = self.select.args.get("where")
        if where is None:
            return []
        tree = self.condition(where.this, negate=False)
        if tree.all_of and not tree.column:
            return list(tree.all_of)
        return [tree]

    def condition(self, node: exp.Expression, *, negate: bool) -> query_service_pb2.Filter:
        if isinstance(node, exp.Paren):
            return self.condition(node.this, negate=negate)
        if isinstance(node, exp.Not):
            return self.condition(node.this, negate=not negate)
        if isinstance(node, exp.And | exp.Or):
            parts = [
                self.condition(node.this, negate=negate),
                self.condition(node.expression, negate=negate),
            ]
            conjunction = isinstance(node, exp.And) != negate  # De Morgan
            return _node(parts, conjunction)
        if isinstance(node, exp.In):
            return self._in(node, negate)
        if isinstance(node, exp.Between):
            return self._between(node, negate)
        comparisons: dict[type[exp.Expression], Op] = {
            exp.EQ: "=",
            exp.NEQ: "<>",
            exp.LT: "<",
            exp.LTE: "<=",
            exp.GT: ">",
            exp.GTE: ">=",
        }
        op = comparisons.get(type(node))
        if op is not None:
            return self._comparison(node, op, negate)
        if isinstance(node, exp.Is):
            raise _refuse(node, "IS NULL is not supported: the hub filters on public values only")
        if isinstance(node, exp.Like | exp.ILike | exp.SimilarTo | exp.RegexpLike):
            raise _refuse(node, "pattern matching is not supported: filter with = or IN")
        if isinstance(node, exp.Exists | exp.Subquery | exp.Select):
            raise _refuse(node, "subqueries are not supported: the hub answers one SELECT")
        raise _refuse(node, "not a supported condition (=, <>, <, <=, >, >=, IN, BETWEEN)")

    def _in(self, node: exp.In, negate: bool) -> query_service_pb2.Filter:
        if node.args.get("query") is not None or node.args.get("unnest") is not None:
            raise _refuse(node, "subqueries are not supported: the hub answers one SELECT")
        column = self.column(node.this, "IN")
        values = [self.literal(v, "IN").text for v in node.expressions]
        op = query_service_pb2.FILTER_OP_NOT_IN if negate else query_service_pb2.FILTER_OP_IN
        return query_service_pb2.Filter(column=column, op=op, values=values)

    def _between(self, node: exp.Between, negate: bool) -> query_service_pb2.Filter:
        if node.args.get("symmetric"):
            raise _refuse(node, "BETWEEN SYMMETRIC is not supported: write low first")
        column = self.column(node.this, "BETWEEN")
        low = self._bound(node.args["low"], node)
        high = self._bound(node.args["high"], node)
        if negate:
            return _node([_leaf(column, "<", low), _leaf(column, ">", high)], conjunction=False)
        return _node([_leaf(column, ">=", low), _leaf(column, "<=", high)], conjunction=True)

    def _bound(self, value: exp.Expression, node: exp.Expression) -> str:
        lit = self.literal(value, "a range")
        if lit.kind == "number":
            return _number(lit.text)
        if _DATE.match(lit.text):
            return lit.text
        raise _refuse(node, f"'{lit.text}': a range compares with a number or DATE 'YYYY-MM-DD'")

    def _comparison(self, node: exp.Expression, op: Op, negate: bool) -> query_service_pb2.Filter:
        left, right = node.this, node.args["expression"]
        if not isinstance(left, exp.Column) and isinstance(right, exp.Column):
            left, right = right, left
            op = _FLIPPED[op]
        if negate:
            op = _NEGATED[op]
        column = self.column(left, f"'{op}'")
        if isinstance(right, exp.Column):
            raise _refuse(node, "a column compares with a literal, not another column")
        if op in ("=", "<>"):
            text = self.literal(right, f"'{op}'").text
            kind = (
                query_service_pb2.FILTER_OP_IN if op == "=" else query_service_pb2.FILTER_OP_NOT_IN
            )
            return query_service_pb2.Filter(column=column, op=kind, values=[text])
        return _leaf(column, op, self._bound(right, node))

    # -- GROUP BY ------------------------------------------------------------------------------

    def grouping(self, node: exp.Expression) -> str:
        """The hub's group_by string of a grouping expression."""
        if isinstance(node, exp.Paren):
            return self.grouping(node.this)
        if isinstance(node, exp.Column):
            return self.column(node, "GROUP BY")
        if isinstance(node, exp.TimestampTrunc | exp.DateTrunc | exp.TimeTrunc):
            unit = node.args.get("unit")
            word = (unit.name if unit is not None else "").upper()
            if word not in _TRUNC_UNITS:
                raise _refuse(node, "DATE_TRUNC takes 'month', 'week' or 'day'")
            if node.args.get("zone"):
                raise _refuse(node, "DATE_TRUNC takes no time zone: dates have none")
            return f"{_TRUNC_UNITS[word]}:{self.column(node.this, 'DATE_TRUNC')}"
        if isinstance(node, exp.WidthBucket):
            return self._width_bucket(node)
        if isinstance(node, exp.Case):
            return self._case(node)
        if isinstance(node, exp.AggFunc):
            raise _refuse(node, "aggregates cannot be grouped by")
        raise _refuse(
            node,
            "not a supported grouping (a column, DATE_TRUNC, WIDTH_BUCKET or CASE WHEN col < ...)",
        )

    def _width_bucket(self, node: exp.WidthBucket) -> str:
        if node.args.get("threshold") is not None:
            raise _refuse(node, "WIDTH_BUCKET takes (column, low, high, count)")
        column = self.column(node.this, "WIDTH_BUCKET")
        parts = [node.args.get(k) for k in ("min_value", "max_value", "num_buckets")]
        if any(p is None for p in parts):
            raise _refuse(node, "WIDTH_BUCKET takes (column, low, high, count)")
        low, high, count = (self.number(p, "WIDTH_BUCKET") for p in parts if p is not None)
        if count != count.to_integral_value() or count < 1:
            raise _refuse(node, "WIDTH_BUCKET's count is a whole number of at least 1")
        if not low < high:
            raise _refuse(node, "WIDTH_BUCKET's low is below its high")
        n = int(count)
        edges = [low + (high - low) * i / n for i in range(n + 1)]
        return f"bins:{column}:{','.join(_decimal_text(e) for e in edges)}"

    def _case(self, node: exp.Case) -> str:
        if node.this is not None:
            raise _refuse(node, "CASE x WHEN is not supported: write CASE WHEN col < e THEN ...")
        default = node.args.get("default")
        if default is None:
            raise _refuse(node, "CASE needs an ELSE: every value falls in one bin")
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
                raise _refuse(cond, "CASE bins take WHEN column < number (bins are [low, high))")
            name = self.column(col_node, "CASE")
            if column is not None and name != column:
                raise _refuse(node, "CASE bins compare one column")
            column = name
            edge = self.number(edge_node, "CASE")
            if edges and edge <= edges[-1]:
                raise _refuse(node, "CASE bins take increasing bounds")
            edges.append(edge)
            labels.append(self._label(branch.args["true"]))
        labels.append(self._label(default))
        if column is None:  # pragma: no cover - sqlglot requires a WHEN
            raise _refuse(node, "CASE needs a WHEN")
        return f"bins:{column}:{','.join(_decimal_text(e) for e in edges)}:{'|'.join(labels)}"

    def _label(self, node: exp.Expression) -> str:
        lit = self.literal(node, "a CASE label")
        if lit.kind != "string" or not lit.text or re.search(r"[|:,]", lit.text):
            raise _refuse(node, "a CASE label is a non-empty string without | : or ,")
        return lit.text


_FLIPPED: dict[Op, Op] = {"=": "=", "<>": "<>", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_NEGATED: dict[Op, Op] = {"=": "<>", "<>": "=", "<": ">=", "<=": ">", ">": "<=", ">=": "<"}
_LEAF_OPS = {
    "<": query_service_pb2.FILTER_OP_LT,
    "<=": query_service_pb2.FILTER_OP_LE,
    ">": query_service_pb2.FILTER_OP_GT,
    ">=": query_service_pb2.FILTER_OP_GE,
}


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


# -- aggregates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Agg:
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


def _is_aggregate(node: exp.Expression) -> bool:
    return isinstance(node, exp.AggFunc | exp.WithinGroup | exp.Window) or any(
        isinstance(n, exp.AggFunc) for n in node.walk()
    )


def _aggregate(t: _Translator, node: exp.Expression) -> _Agg:
    if isinstance(node, exp.Window):
        raise _refuse(node, "window functions are not supported: the hub releases aggregates")
    if isinstance(node, exp.Filter):
        raise _refuse(node, "FILTER (WHERE ...) is not supported: use WHERE")
    if isinstance(node, exp.Count):
        arg = node.this
        if isinstance(arg, exp.Star):
            return _Agg("count_rows", "", None, "count")
        if (
            isinstance(arg, exp.Distinct)
            and len(arg.expressions) == 1
            and isinstance(arg.expressions[0], exp.Column)
            and arg.expressions[0].name.lower() == PERSON
        ):
            t._dataset_of(arg.expressions[0])
            return _Agg("count", "", None, "count")
        raise _refuse(
            node,
            f"counts are COUNT(*) (rows) or COUNT(DISTINCT {PERSON}) (people); "
            "COUNT of a column is not supported",
        )
    if isinstance(node, exp.WithinGroup):
        fn, order = node.this, node.expression
        if not isinstance(fn, exp.PercentileCont):
            raise _refuse(node, "the only ordered-set aggregate is PERCENTILE_CONT")
        ordered = order.expressions if isinstance(order, exp.Order) else []
        if len(ordered) != 1 or ordered[0].args.get("desc"):
            raise _refuse(node, "PERCENTILE_CONT takes WITHIN GROUP (ORDER BY column) ascending")
        level = t.number(fn.this, "PERCENTILE_CONT")
        if not 0 < level < 1:
            raise _refuse(node, "PERCENTILE_CONT's level is between 0 and 1 (exclusive)")
        column = t.column(ordered[0].this, "PERCENTILE_CONT")
        return _Agg("quantile", column, float(level), "percentile_cont")
    if isinstance(node, exp.PercentileCont | exp.PercentileDisc):
        raise _refuse(node, "write PERCENTILE_CONT(q) WITHIN GROUP (ORDER BY column)")
    for kind_type, (kind, default) in _SIMPLE.items():
        if type(node) is kind_type:
            arg = node.this
            if isinstance(arg, exp.Distinct):
                raise _refuse(node, "DISTINCT inside an aggregate is not supported")
            if not isinstance(arg, exp.Column):
                raise _refuse(node, "aggregates take a column, not an expression")
            if node.args.get("expressions"):
                raise _refuse(node, "aggregates take one column")
            column = t.column(arg, default.upper())
            return _Agg(kind, column, 0.5 if kind == "quantile" else None, default)
    if isinstance(node, exp.AggFunc):
        raise _refuse(node, "not a supported aggregate")
    if _is_aggregate(node):
        raise _refuse(node, "arithmetic on aggregates is not supported: compute it afterwards")
    raise _refuse(node, "not an aggregate")


def _budget_comment(node: exp.Expression) -> tuple[str, float | None]:
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
                raise _refuse(
                    f"/*{comment}*/",
                    "a comment on an aggregate is /* accuracy N */ or /* epsilon E */",
                )
            word, value = m["word"].lower(), m["value"]
            try:
                number = float(value)
            except ValueError:
                raise _refuse(f"/*{comment}*/", f"{value!r} is not a number") from None
            if word == "accuracy":
                target = number
            else:
                share = value
    if share and target is not None:
        raise _refuse(node, "give an aggregate an epsilon share or an accuracy, not both")
    return share, target


# -- the SELECT ------------------------------------------------------------------------------


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
            raise _refuse(node, "subqueries are not supported: the hub answers one SELECT")
        if isinstance(node, exp.Window):
            raise _refuse(node, "window functions are not supported: the hub releases aggregates")


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
            raise _refuse(node, f"{where} takes a column, an alias or a position") from None
        if not 1 <= n <= count:
            raise _refuse(node, f"{where} position {n} is not in the select list (1-{count})")
        return n - 1
    return None


def translate(text: str) -> SqlQuery:
    """Translate one SELECT into the hub's query; `SqlRefusal` names what is not supported."""
    stmt = _statement(text)
    _check_select(stmt)
    t = _Translator(stmt, text)
    t.tables_of()
    items = list(stmt.expressions)
    if any(isinstance(i, exp.Star) or (isinstance(i, exp.Column) and i.is_star) for i in items):
        raise SqlRefusal("SELECT *: would release rows; select aggregates")

    # GROUP BY: each entry a grouping string; ordinals and aliases refer to the select list.
    aliases = {
        item.alias.lower(): item for item in items if isinstance(item, exp.Alias) and item.alias
    }
    group_strings: list[str] = []
    group = stmt.args.get("group")
    if group is not None:
        if group.args.get("rollup") or group.args.get("cube") or group.args.get("grouping_sets"):
            raise _refuse(group, "ROLLUP, CUBE and GROUPING SETS are not supported")
        for node in group.expressions:
            position = _ordinal(node, len(items), "GROUP BY")
            if position is not None:
                target = items[position]
                node = target.this if isinstance(target, exp.Alias) else target
            elif (
                isinstance(node, exp.Column)
                and not node.table
                and node.name.lower() in aliases
                and not _is_aggregate(aliases[node.name.lower()].this)
            ):
                node = aliases[node.name.lower()].this
            if _is_aggregate(node):
                raise _refuse(node, "aggregates cannot be grouped by")
            grouping = t.grouping(node)
            if grouping in group_strings:
                raise _refuse(node, "grouped by twice")
            group_strings.append(grouping)

    # SELECT: group expressions (which must be in GROUP BY) and aggregates.
    aggregates: list[query_service_pb2.Aggregate] = []
    agg_sql: dict[str, int] = {}
    outputs: list[OutputColumn] = []
    names: set[str] = set()
    for item in items:
        inner = item.this if isinstance(item, exp.Alias) else item
        if _is_aggregate(inner):
            agg = _aggregate(t, inner)
            name = _output_name(item, agg.default_name)
            if not _NAME.match(name):
                raise _refuse(
                    item,
                    f"aggregate name {name!r}: 1-63 lowercase letters, digits and _, "
                    "starting with a letter",
                )
            share, target = _budget_comment(item)
            if target is not None and agg.kind in ("quantile",):
                raise _refuse(item, "an accuracy target applies to counts, sums, means, variances")
            msg = query_service_pb2.Aggregate(
                name=name,
                kind=_KINDS[agg.kind],
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
                raise _refuse(inner, "would release the person: select aggregates")
            try:
                grouping = t.grouping(inner)
            except SqlRefusal:
                if isinstance(inner, exp.Literal | exp.Binary):
                    raise _refuse(item, "not an aggregate nor a grouping") from None
                raise
            if grouping not in group_strings:
                raise _refuse(
                    inner,
                    "must appear in GROUP BY or be used in an aggregate "
                    "(a bare column would release rows)",
                )
            default = inner.name.lower() if isinstance(inner, exp.Column) else _func_name(inner)
            name = _output_name(item, default)
            outputs.append(OutputColumn(name, group=group_strings.index(grouping)))
        if name in names:
            raise _refuse(item, f"two output columns named {name!r}: give each an alias (AS ...)")
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
        if _is_aggregate(node):
            key = node.sql(dialect="postgres")
            if key in agg_sql:
                return outputs[[o.aggregate for o in outputs].index(agg_sql[key])].name
            raise _refuse(
                node, f"{where} uses aggregates of the select list only (each costs budget)"
            )
        try:
            grouping = t.grouping(node)
        except SqlRefusal:
            raise _refuse(
                node, f"{where} takes select-list columns, aliases or aggregates"
            ) from None
        for out in outputs:
            if out.group is not None and group_strings[out.group] == grouping:
                return out.name
        raise _refuse(node, f"{where} takes columns of the select list")

    post = _post_processing(stmt, output_of, t)
    query = query_service_pb2.Query(
        aggregates=aggregates,
        group_by=group_strings,
        filters=t.filters(),
    )
    return SqlQuery(text, query, tuple(t.datasets), tuple(outputs), post)


_KINDS = {
    "count": query_service_pb2.AGGREGATE_KIND_COUNT,
    "count_rows": query_service_pb2.AGGREGATE_KIND_COUNT_ROWS,
    "sum": query_service_pb2.AGGREGATE_KIND_SUM,
    "mean": query_service_pb2.AGGREGATE_KIND_MEAN,
    "variance": query_service_pb2.AGGREGATE_KIND_VARIANCE,
    "stddev": query_service_pb2.AGGREGATE_KIND_STDDEV,
    "quantile": query_service_pb2.AGGREGATE_KIND_QUANTILE,
}


def _func_name(node: exp.Expression) -> str:
    """PostgreSQL's name of an unaliased expression column."""
    if isinstance(node, exp.TimestampTrunc | exp.DateTrunc | exp.TimeTrunc):
        return "date_trunc"
    if isinstance(node, exp.WidthBucket):
        return "width_bucket"
    if isinstance(node, exp.Case):
        return "case"
    return node.key.lower()


def _post_processing(
    stmt: exp.Select, output_of: Callable[[exp.Expression, str], str], t: _Translator
) -> PostProcessing:
    having_node = stmt.args.get("having")
    having = None if having_node is None else _predicate(having_node.this, output_of, t)
    keys = []
    order = stmt.args.get("order")
    if order is not None:
        for ordered in order.expressions:
            if ordered.args.get("with_fill"):
                raise _refuse(ordered, "WITH FILL is not supported")
            nulls_first = ordered.args.get("nulls_first")
            desc = bool(ordered.args.get("desc"))
            if nulls_first is not None and bool(nulls_first) != desc:
                raise _refuse(
                    ordered, "NULLS FIRST/LAST: NULLs sort last ascending, first descending"
                )
            keys.append(OrderKey(output_of(ordered.this, "ORDER BY"), desc))
    limit = _count(stmt.args.get("limit"), "LIMIT", t)
    offset = _count(stmt.args.get("offset"), "OFFSET", t)
    return PostProcessing(having, tuple(keys), limit, offset or 0)


def _count(node: exp.Expression | None, word: str, t: _Translator) -> int | None:
    if node is None:
        return None
    value = node.args.get("expression") or node.this
    if value is None:
        return None
    n = t.number(value, word)
    if n != n.to_integral_value() or n < 0:
        raise _refuse(node, f"{word} takes a whole number")
    return int(n)


def _predicate(
    node: exp.Expression, output_of: Callable[[exp.Expression, str], str], t: _Translator
) -> Predicate:
    if isinstance(node, exp.Paren):
        return _predicate(node.this, output_of, t)
    if isinstance(node, exp.Not):
        return Negate(_predicate(node.this, output_of, t))
    if isinstance(node, exp.And):
        return AllOf(
            (_predicate(node.this, output_of, t), _predicate(node.expression, output_of, t))
        )
    if isinstance(node, exp.Or):
        return AnyOf(
            (_predicate(node.this, output_of, t), _predicate(node.expression, output_of, t))
        )
    if isinstance(node, exp.Between):
        column = output_of(node.this, "HAVING")
        return AllOf(
            (
                Compare(column, ">=", _value(t.literal(node.args["low"], "HAVING"))),
                Compare(column, "<=", _value(t.literal(node.args["high"], "HAVING"))),
            )
        )
    if isinstance(node, exp.In) and not node.args.get("query"):
        column = output_of(node.this, "HAVING")
        return AnyOf(
            tuple(Compare(column, "=", _value(t.literal(v, "HAVING"))) for v in node.expressions)
        )
    ops: dict[type[exp.Expression], Op] = {
        exp.EQ: "=",
        exp.NEQ: "<>",
        exp.LT: "<",
        exp.LTE: "<=",
        exp.GT: ">",
        exp.GTE: ">=",
    }
    op = ops.get(type(node))
    if op is None:
        raise _refuse(node, "HAVING takes comparisons of select-list values with literals")
    left, right = node.this, node.args["expression"]
    if isinstance(left, exp.Literal | exp.Neg | exp.Cast) and not isinstance(
        right, exp.Literal | exp.Neg | exp.Cast
    ):
        left, right = right, left
        op = _FLIPPED[op]
    return Compare(output_of(left, "HAVING"), op, _value(t.literal(right, "HAVING")))


def _value(lit: _Literal) -> str | float:
    return float(lit.text) if lit.kind == "number" else lit.text


# -- agreements, budgets and releases ----------------------------------------------------------


def _names(agreement: Agreement) -> tuple[str, ...]:
    return tuple(slot.name for slot in agreement.datasets)


def _described(agreement: Agreement) -> str:
    return f"{agreement.agreement_id} ({', '.join(_names(agreement))})"


def check_agreement(sql: SqlQuery, agreement: Agreement) -> None:
    """FROM names exactly the agreement's datasets (the hub always joins them all)."""
    names = _names(agreement)
    unknown = [d for d in sql.datasets if d not in names]
    if unknown:
        raise SqlRefusal(
            f"FROM {', '.join(unknown)}: not a dataset of agreement {agreement.agreement_id}, "
            f"which joins {', '.join(names)}"
        )
    missing = [d for d in names if d not in sql.datasets]
    if missing:
        raise SqlRefusal(
            f"FROM must name every dataset of agreement {agreement.agreement_id}: missing "
            f"{', '.join(missing)} (the hub always joins them all)"
        )


def choose_agreement(sql: SqlQuery, agreements: Sequence[Agreement]) -> Agreement:
    """The caller's one active agreement whose datasets are exactly those named in FROM.

    Dataset names are the agreement's slot names (`DatasetSlot.name`), as partners upload
    into them; `SqlRefusal` lists the candidates when there is none or more than one.
    """
    active = [a for a in agreements if a.status is AgreementStatus.ACTIVE]
    wanted = set(sql.datasets)
    matches = [a for a in active if set(_names(a)) == wanted]
    if len(matches) == 1:
        return matches[0]
    tables = ", ".join(sql.datasets)
    if matches:
        raise SqlRefusal(
            f"FROM {tables}: several active agreements join these datasets: "
            f"{'; '.join(_described(a) for a in matches)}; give one (--agreement)"
        )
    yours = "; ".join(_described(a) for a in active) or "none"
    raise SqlRefusal(
        f"FROM {tables}: none of your active agreements joins exactly these datasets "
        f"(yours: {yours})"
    )


def with_accuracy(sql: SqlQuery, accuracy: Mapping[str, float]) -> SqlQuery:
    """The translation with a 95% half-width target for the aggregates named in `accuracy`."""
    if not accuracy:
        return sql
    names = {o.name: o.aggregate for o in sql.outputs if o.aggregate is not None}
    query = query_service_pb2.Query()
    query.CopyFrom(sql.query)
    for name, target in accuracy.items():
        if name not in names:
            known = ", ".join(names) or "none"
            raise SqlRefusal(f"accuracy {name}: no aggregate of that name (aggregates: {known})")
        index = names[name]
        assert index is not None
        agg = query.aggregates[index]
        if agg.kind == query_service_pb2.AGGREGATE_KIND_QUANTILE:
            raise SqlRefusal(
                f"accuracy {name}: an accuracy target applies to counts, sums, means, variances"
            )
        agg.epsilon = ""
        agg.target_ci95 = float(target)
    return replace(sql, query=query)


def post_process_response(
    sql: SqlQuery, response: query_service_pb2.RunQueryResponse
) -> query_service_pb2.RunQueryResponse:
    """A copy of the hub's answer whose results hold the post-processed cells only."""
    out = query_service_pb2.RunQueryResponse()
    out.CopyFrom(response)
    del out.release.results[:]
    out.release.results.extend(post_process(sql, response.release.results))
    return out


def processed_result(sql: SqlQuery, result: QueryResult) -> QueryResult:
    """`result` with post-processed cells; its `raw` (and its release's) keep the full release."""
    processed = QueryResult.from_proto(post_process_response(sql, result.raw))
    return replace(
        processed, release=replace(processed.release, raw=result.release.raw), raw=result.raw
    )


@dataclass(frozen=True)
class SqlRequest:
    """A translated SELECT bound to its agreement and budget: the message the hub is sent."""

    sql: SqlQuery
    agreement: Agreement
    message: query_service_pb2.Query


def _budget_text(value: str | float | None) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else repr(float(value))


def bind(
    sql: SqlQuery,
    agreements: Sequence[Agreement],
    *,
    agreement: Agreement | None = None,
    epsilon: str | float | None = None,
    rho: str | float | None = None,
    delta: str | float | None = None,
    accuracy: Mapping[str, float] | None = None,
) -> SqlRequest:
    """Bind a translation to `agreement` (else the one `choose_agreement` finds) and a budget."""
    if epsilon is None and rho is None:
        raise SqlRefusal("no budget: give epsilon (or rho on a zCDP agreement)")
    chosen = agreement if agreement is not None else choose_agreement(sql, agreements)
    check_agreement(sql, chosen)
    sql = with_accuracy(sql, accuracy or {})
    message = sql.message(
        chosen.agreement_id,
        epsilon=_budget_text(epsilon),
        rho=_budget_text(rho),
        delta=_budget_text(delta),
    )
    return SqlRequest(sql, chosen, message)


# -- in words --------------------------------------------------------------------------------

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
            f"{', '.join(_names(agreement))} on the person"
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
