"""What a translation holds: the SELECT's outputs, its post-processing, and applying it.

The hub releases every cell of the grouping's public domain; HAVING, ORDER BY and LIMIT/OFFSET
are kept here as data (`PostProcessing`) and applied to the released, noisy rows on the
analyst's side (`post_process`), which costs no budget.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

from entremise.v1 import query_service_pb2

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
