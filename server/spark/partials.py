"""Per partition, the DuckDB engine's own SQL; on the driver, the exact sum of the partial results.

Rows reach a partition grouped by person (`pid`), every dataset's rows of a person in the same
one, so each partition holds whole people: the caps, which depend on a person's rows alone,
choose the same rows as in one DuckDB over everything, and the partial aggregates add up
exactly (people are disjoint across partitions, so even distinct counts add).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from entremise.server import spill
from entremise.server.domain.models import QueryPlan
from entremise.server.engine import build_sql, linked
from entremise.server.engine import combine as add_partials
from entremise.server.spark.source import decoded

#: The one column a partition yields: a JSON array per partial row (exact integers, no float).
PARTIAL = "partial string"
_ARROW = pa.schema([pa.field("partial", pa.string())])


def prefixed(i: int, column: str) -> str:
    """Dataset `i`'s `column` in the union of every dataset's rows."""
    return f"d{i}__{column}"


def partition_function(
    plan: QueryPlan, columns: list[list[str]], withdrawn: Collection[str], now: str
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The `mapInArrow` function: this partition's rows of each dataset in, partial rows out."""
    gone = sorted(withdrawn)
    person_table = linked(plan)
    names = [f"src{i}" for i in range(len(plan.datasets))]
    sql, params = build_sql(plan, names, now=now, person_table=person_table)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        union = pa.Table.from_batches(list(batches))
        if union.num_rows == 0:
            return
        conn = spill.connect(threads=1)  # in memory; never spills unencrypted
        try:
            conn.register("withdrawn", pa.table({"pseudonym": pa.array(gone, pa.string())}))
            tables = []
            for i, wanted in enumerate(columns):
                rows = union.filter(pc.equal(union.column("_ds"), i))
                table = pa.table(
                    {c: rows.column(prefixed(i, c)) for c in wanted} | {"pid": rows.column("pid")}
                )
                tables.append(table)
                conn.register(names[i], table.drop_columns(["pid"]))
            if person_table:
                conn.register("person", _people(plan, tables))
            result = conn.execute(sql, params).fetchall()
        finally:
            conn.close()
        partial = [json.dumps(_plain(row)) for row in result]
        yield pa.RecordBatch.from_arrays([pa.array(partial, pa.string())], schema=_ARROW)

    return run


def bucket_function(
    plan: QueryPlan, withdrawn: Collection[str], now: str
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The `mapInArrow` function over bucketed reads (`source.bucketed_source`).

    The partition's rows come as Arrow IPC streams, each dataset's rows of whole people (one
    identifier per dataset: the person is that pseudonym). They are the source tables of
    DuckDBEngine, restricted to consented rows of these people, and `build_sql` runs as is.
    """
    gone = sorted(withdrawn)
    names = [f"src{i}" for i in range(len(plan.datasets))]
    sql, params = build_sql(plan, names, now=now, person_table=False)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        parts: list[list[pa.Table]] = [[] for _ in names]
        for batch in batches:
            datasets = batch.column("ds").to_pylist()
            blobs = batch.column("rows")
            for j, ds in enumerate(datasets):
                parts[ds].append(decoded(pa.ipc.open_stream(blobs[j].as_buffer()).read_all()))
        if any(not p for p in parts):  # a dataset without a segment here: no data at all
            return
        tables = [pa.concat_tables(p, promote_options="default") for p in parts]
        if all(t.num_rows == 0 for t in tables):
            return
        conn = spill.connect(threads=1)  # in memory; never spills unencrypted
        try:
            conn.register("withdrawn", pa.table({"pseudonym": pa.array(gone, pa.string())}))
            for name, table in zip(names, tables, strict=True):
                conn.register(name, table)
            result = conn.execute(sql, params).fetchall()
        finally:
            conn.close()
        partial = [json.dumps(_plain(row)) for row in result]
        yield pa.RecordBatch.from_arrays([pa.array(partial, pa.string())], schema=_ARROW)

    return run


def _people(plan: QueryPlan, tables: list[pa.Table]) -> pa.Table:
    """`person(node, label)` for the partition's rows: each key of a row is labelled by its pid.

    This is the part of the global person table the partition needs, and complete: a key that
    is linked to others was seen on a consented row, whose pid is the key's component label,
    and that row was sent to the partition of that pid. A withdrawn pseudonym seen anywhere is
    therefore labelled in the partition holding its person's rows, and is itself (as in
    `build_sql`'s `gone`) elsewhere, where no row has it as pid. Keys on no edge get
    themselves as label, which is what the coalesce in `build_sql` gives them anyway.
    """
    nodes, labels = [], []
    for dataset, table in zip(plan.datasets, tables, strict=True):
        for key in dataset.schema.key_columns:
            present = table.filter(pc.is_valid(table.column(key)))
            nodes.append(present.column(key).cast(pa.string()))
            labels.append(present.column("pid").cast(pa.string()))
    pairs = pa.table(
        {
            "node": pa.chunked_array([c for n in nodes for c in n.chunks], pa.string()),
            "label": pa.chunked_array([c for n in labels for c in n.chunks], pa.string()),
        }
    )
    return pairs.group_by(["node", "label"]).aggregate([])


def _plain(row: tuple[Any, ...]) -> list[Any]:
    """A result row as JSON: group values as `_collect` reads them (str), integers exact."""
    out: list[Any] = []
    for value in row:
        if isinstance(value, dict):
            out.append({str(k): int(v) for k, v in value.items()})
        elif isinstance(value, int) or value is None:
            out.append(value)
        else:
            out.append(str(value))
    return out


def combine(plan: QueryPlan, partials: list[str]) -> list[tuple[Any, ...]]:
    """Sum the partial rows per group key (counts, sums, histogram buckets), in `_collect` shape."""
    return add_partials(plan, (json.loads(text) for text in partials))
