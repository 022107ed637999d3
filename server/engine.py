"""Exact, contribution-bounded aggregates of the consented join, computed by DuckDB over Parquet.

Pipeline (one SQL statement):
1. each dataset keeps only rows whose consent column for the agreement's purpose is true;
2. inner join on the pseudonym, then the analyst's filters;
3. bound each person's contribution AFTER the join: at most `max_groups_per_person` group
   cells, then at most `max_rows_per_person` rows. The choice is pseudo-random per person
   (a hash of the pseudonym and the row), depends only on that person's own rows, and is
   stable across runs, so it adds no sensitivity;
4. clamp numeric values to their public bounds, in integer units of the declared resolution;
5. aggregate per public group cell; cells with no row are reported as zero.
"""

from __future__ import annotations

import math
import os
from typing import Any

import duckdb

from entremise.server.domain.models import (
    ColumnRef,
    ExactAggregates,
    FilterOp,
    NumericColumn,
    QueryPlan,
)
from entremise.server.domain.ports import AggregationEngine


def _alias(ref: ColumnRef) -> str:
    return f"d{ref.dataset_index}_{ref.column.name}"


def _literal_path(path: str) -> str:
    return "'" + path.replace("'", "''") + "'"


def build_sql(plan: QueryPlan, paths: list[str]) -> tuple[str, list[Any]]:
    """SQL text and parameters computing the exact bounded aggregates of `plan`."""
    params: list[Any] = []
    purpose = plan.agreement.purpose
    needed: dict[int, set[str]] = {i: set() for i in range(len(plan.datasets))}
    refs = [
        *plan.group_by,
        *(f.ref for f in plan.filters),
        *(a.ref for a in plan.aggregates if a.ref is not None),
    ]
    for ref in refs:
        needed[ref.dataset_index].add(ref.column.name)

    ctes = []
    for i, (dataset, path) in enumerate(zip(plan.datasets, paths, strict=True)):
        consent = dataset.schema.consent_column(purpose)
        assert consent is not None
        cols = ", ".join(f'"{c}" AS d{i}_{c}' for c in sorted(needed[i]))
        select = f'"{dataset.schema.key_column}" AS pid' + (f", {cols}" if cols else "")
        ctes.append(
            f'd{i} AS (SELECT {select} FROM read_parquet({_literal_path(path)}) WHERE "{consent}")'
        )
    join = "d0" + "".join(f" JOIN d{i} USING (pid)" for i in range(1, len(plan.datasets)))
    aliases = [f"d{i}_{c}" for i in sorted(needed) for c in sorted(needed[i])]
    columns = ", ".join(["pid", *aliases])

    where = []
    for f in plan.filters:
        alias = _alias(f.ref)
        if f.op in (FilterOp.IN, FilterOp.NOT_IN):
            marks = ", ".join("?" for _ in f.categories)
            where.append(f"{alias} {'IN' if f.op is FilterOp.IN else 'NOT IN'} ({marks})")
            params.extend(f.categories)
        else:
            where.append(f"{alias} {'>=' if f.op is FilterOp.GE else '<='} ?")
            params.append(f.threshold)
    ctes.append(
        f"j AS (SELECT {columns} FROM {join}"
        + (f" WHERE {' AND '.join(where)}" if where else "")
        + ")"
    )

    groups = [_alias(r) for r in plan.group_by]
    source = "j"
    if groups and plan.max_groups_per_person < len(plan.group_keys):
        key = ", ".join(groups)
        ctes.append(
            "jg AS (SELECT * FROM (SELECT *, dense_rank() OVER (PARTITION BY pid ORDER BY "
            f"hash(pid, {key}), {key}) AS group_rank FROM j) "
            f"WHERE group_rank <= {plan.max_groups_per_person})"
        )
        source = "jg"
    # Upload statistics bound the rows any person can have in the join; when that bound is
    # already within the cap, the (sorting) window below would drop nothing and is skipped.
    most_rows = math.prod(d.max_rows_per_key for d in plan.datasets)
    if most_rows == 0 or most_rows > plan.max_rows_per_person:
        order = ", ".join([*groups, *(a for a in aliases if a not in groups)]) or "pid"
        ctes.append(
            "b AS (SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY pid ORDER BY "
            f"hash(pid, {order}), {order}) AS row_rank FROM {source}) "
            f"WHERE row_rank <= {plan.max_rows_per_person})"
        )
    else:
        ctes.append(f"b AS (SELECT * FROM {source})")

    aggregates = ["count(DISTINCT pid) AS people", "count(*) AS n_rows"]
    seen: set[str] = set()
    for agg in plan.aggregates:
        if agg.ref is None or agg.ref.qualified in seen:
            continue
        seen.add(agg.ref.qualified)
        column = agg.ref.column
        assert isinstance(column, NumericColumn)
        alias = _alias(agg.ref)
        units = (
            f"least(greatest(CAST(round({alias} / {column.resolution!r}) AS BIGINT), "
            f"{column.lower_units}), {column.upper_units})"
        )
        aggregates.append(f"CAST(coalesce(sum({units}), 0) AS HUGEINT) AS sum_{alias}")
        aggregates.append(f"count({alias}) AS rows_{alias}")
    group_clause = f" GROUP BY {', '.join(groups)}" if groups else ""
    select_groups = f"{', '.join(groups)}, " if groups else ""
    sql = (
        f"WITH {', '.join(ctes)} SELECT {select_groups}{', '.join(aggregates)} FROM b{group_clause}"
    )
    return sql, params


class DuckDBEngine(AggregationEngine):
    """Runs the bounded join in an in-process DuckDB over the stored Parquet files."""

    def __init__(self, threads: int | None = None, memory_limit: str | None = None) -> None:
        self.threads = threads or max(1, os.cpu_count() or 1)
        self.memory_limit = memory_limit

    def compute(self, plan: QueryPlan, paths: list[str]) -> ExactAggregates:  # noqa: D102
        sql, params = build_sql(plan, paths)
        config: dict[str, Any] = {"threads": self.threads}
        if self.memory_limit:
            config["memory_limit"] = self.memory_limit
        with duckdb.connect(config=config) as conn:
            rows = conn.execute(sql, params).fetchall()
        n_groups = len(plan.group_by)
        index = {key: i for i, key in enumerate(plan.group_keys)}
        size = len(plan.group_keys)
        people, n_rows = [0] * size, [0] * size
        numeric = [a.ref for a in plan.aggregates if a.ref is not None]
        names = list(dict.fromkeys(r.qualified for r in numeric))
        sums = {n: [0] * size for n in names}
        value_rows = {n: [0] * size for n in names}
        for row in rows:
            key = tuple(str(v) for v in row[:n_groups])
            cell = index.get(key)
            if cell is None:  # excluded by a NOT IN / IN filter on another column: not a public key
                continue
            people[cell], n_rows[cell] = int(row[n_groups]), int(row[n_groups + 1])
            for j, name in enumerate(names):
                sums[name][cell] = int(row[n_groups + 2 + 2 * j])
                value_rows[name][cell] = int(row[n_groups + 3 + 2 * j])
        return ExactAggregates(people=people, rows=n_rows, sums=sums, value_rows=value_rows)
