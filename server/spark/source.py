"""A Spark data source over one sealed version: each segment is a partition, opened by an executor.

The data key travels only inside the pickled data source class (built per query by
`sealed_source`), never in the DataSource options, so it is absent from Spark's plans, its
logs and its event files. Each executor opens the store's filesystem from its URI (shared
storage on a cluster), decrypts its own segment and yields Arrow batches of the consented
rows: consent is checked before any row enters Spark.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql.datasource import DataSource, DataSourceReader, InputPartition
from pyspark.sql.pandas.types import from_arrow_schema
from pyspark.sql.types import StructType

from entremise.server.files import segments
from entremise.server.files.sealed import SealedLocation

#: The one name the per-query classes take; see `SparkEngine` for why it is reused.
SOURCE_NAME = "entremise_sealed"


@dataclass(frozen=True)
class Consent:
    """Which rows enter: `column` is true and `expiry` (if any) is missing or after `now`."""

    column: str
    expiry: str | None
    now: str

    def mask(self, table: pa.Table) -> pa.Array:
        """The rule of `engine._consent_filter`, over an Arrow table (NULL consent: out)."""
        keep = pc.fill_null(table.column(self.column), False)
        if self.expiry is not None:
            moment = dt.datetime.fromisoformat(self.now)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=dt.UTC)
            expiry = table.column(self.expiry)
            later = pc.fill_null(pc.greater(expiry, pa.scalar(moment, expiry.type)), False)
            keep = pc.and_(keep, pc.or_(pc.is_null(expiry), later))
        return keep


class SegmentPartition(InputPartition):  # type: ignore[misc]
    """One segment: where it lies. No key (partitions are planned on the driver's side)."""

    def __init__(self, span: segments.Span) -> None:
        super().__init__(span.index)
        self.span = span


def spark_schema(arrow: pa.Schema) -> StructType:
    """Spark's schema for the Arrow columns a reader yields."""
    return from_arrow_schema(arrow)


def sealed_source(
    location: SealedLocation, columns: list[str], arrow: pa.Schema, consent: Consent
) -> type[DataSource]:
    """A data source class for one query's read of one version (it holds the key, in memory).

    A class, not options: Spark instantiates registered classes itself, with string options
    that end up in plans; the class is pickled by value with what it closes over.
    """
    schema = spark_schema(arrow)

    class SealedReader(DataSourceReader):  # type: ignore[misc]
        def partitions(self) -> list[InputPartition]:
            return [SegmentPartition(span) for span in location.spans]

        def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
            assert isinstance(partition, SegmentPartition)
            span = partition.span
            fs, _ = segments.local_or(location.uri)
            with fs.open_input_file(location.path) as handle:
                sealed = handle.read_at(span.length, span.offset)
            table = segments.open_segment(
                sealed, location.key, location.dataset_id, location.version, span
            )
            table = table.filter(consent.mask(table)).select(columns).cast(arrow)
            yield from table.to_batches()

    class SealedSource(DataSource):  # type: ignore[misc]
        @classmethod
        def name(cls) -> str:
            return SOURCE_NAME

        def schema(self) -> StructType:
            return schema

        def reader(self, schema: Any) -> DataSourceReader:
            return SealedReader()

    return SealedSource


#: What a bucketed read yields: per segment and bucket, the rows as one Arrow IPC stream.
BUCKETED = "bucket int, ds int, rows binary"


class SegmentGroup(InputPartition):  # type: ignore[misc]
    """Segments `(dataset, span)` one task reads in turn (no key: planned on the driver's side)."""

    def __init__(self, index: int, parts: list[tuple[int, segments.Span]]) -> None:
        super().__init__(index)
        self.parts = parts


def grouped(spans: list[list[segments.Span]], tasks: int) -> list[list[tuple[int, segments.Span]]]:
    """Every dataset's segments in at most `tasks` groups of similar size (largest first)."""
    every = sorted(
        ((ds, span) for ds, of in enumerate(spans) for span in of), key=lambda p: -p[1].length
    )
    groups: list[list[tuple[int, segments.Span]]] = [[] for _ in range(min(tasks, len(every)))]
    sizes = [0] * len(groups)
    for part in every:
        k = sizes.index(min(sizes))
        groups[k].append(part)
        sizes[k] += part[1].length
    return groups


def buckets_of(keys: pa.ChunkedArray | pa.Array, n: int) -> np.ndarray:
    """Each row's bucket in `range(n)`: DuckDB's hash of the key as text (the same everywhere)."""
    conn = duckdb.connect(config={"threads": 1})
    try:
        conn.register("k", pa.table({"k": keys}))
        out = conn.execute(f"SELECT (hash(CAST(k AS VARCHAR)) % {int(n)})::INTEGER FROM k")
        return np.asarray(out.fetchnumpy()[out.description[0][0]], dtype=np.int64)
    finally:
        conn.close()


def bucketed_source(
    locations: list[SealedLocation],
    columns: list[list[str]],
    consents: list[Consent],
    keys: list[str],
    labels: list[int],
    compression: str | None = "zstd",
    dictionary: bool = True,
    tasks: int | None = None,
) -> type[DataSource]:
    """One data source over every dataset of a query whose people are their one identifier.

    Each task decrypts its segments one by one (`tasks` groups of them: a Python task has a
    fixed cost), keeps each one's consented rows and needed columns, and splits them by person
    into `len(labels)` buckets (a hash of the identifier, `buckets_of`). It yields one row per
    segment and bucket, `(labels[bucket], dataset, Arrow IPC stream of the rows)`, text
    dictionary-encoded and the stream compressed: Spark moves a few large values per segment
    instead of every row, and `labels` are chosen so that repartitioning by `bucket` sends
    bucket k to partition k.
    """
    n = len(labels)

    class BucketReader(DataSourceReader):  # type: ignore[misc]
        def partitions(self) -> list[InputPartition]:
            spans = [list(location.spans) for location in locations]
            count = tasks or sum(len(of) for of in spans)
            return [SegmentGroup(i, parts) for i, parts in enumerate(grouped(spans, count))]

        def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
            assert isinstance(partition, SegmentGroup)
            for ds, span in partition.parts:
                yield self.segment(ds, span)

        def segment(self, ds: int, span: segments.Span) -> pa.RecordBatch:
            """One segment's consented rows, split by bucket, as one row per bucket."""
            location = locations[ds]
            fs, _ = segments.local_or(location.uri)
            with fs.open_input_file(location.path) as handle:
                sealed = handle.read_at(span.length, span.offset)
            table = segments.open_segment(
                sealed, location.key, location.dataset_id, location.version, span
            )
            del sealed
            table = table.filter(consents[ds].mask(table)).select(columns[ds])
            bucket = buckets_of(table.column(keys[ds]), n)
            order = np.argsort(bucket, kind="stable")
            table = table.take(pa.array(order)).combine_chunks()
            ends = np.cumsum(np.bincount(bucket, minlength=n))
            # The n streams back to back in one buffer: the binary column's data, as is.
            options = pa.ipc.IpcWriteOptions(compression=compression, use_threads=False)
            sink = pa.BufferOutputStream()
            offsets = [0]
            for k in range(n):  # every bucket, even empty: each partition learns each schema
                start = int(ends[k - 1]) if k else 0
                rows = table.slice(start, int(ends[k]) - start)
                if dictionary:
                    rows = encoded(rows)
                with pa.ipc.new_stream(sink, rows.schema, options=options) as writer:
                    writer.write_table(rows)
                offsets.append(sink.tell())
            blobs = pa.Array.from_buffers(
                pa.binary(), n, [None, pa.py_buffer(np.array(offsets, np.int32)), sink.getvalue()]
            )
            return pa.RecordBatch.from_arrays(
                [pa.array(labels, pa.int32()), pa.array([ds] * n, pa.int32()), blobs],
                names=["bucket", "ds", "rows"],
            )

    class BucketedSource(DataSource):  # type: ignore[misc]
        @classmethod
        def name(cls) -> str:
            return SOURCE_NAME

        def schema(self) -> str:
            return BUCKETED

        def reader(self, schema: Any) -> DataSourceReader:
            return BucketReader()

    return BucketedSource


def encoded(table: pa.Table) -> pa.Table:
    """Text columns dictionary-encoded (a pseudonym repeated on a person's rows: stored once)."""
    for i, field in enumerate(table.schema):
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            table = table.set_column(i, field.name, pc.dictionary_encode(table.column(i)))
    return table


def decoded(table: pa.Table) -> pa.Table:
    """What `encoded` dictionary-encoded, as it was (the types DuckDBEngine reads)."""
    for i, field in enumerate(table.schema):
        if pa.types.is_dictionary(field.type):
            column = table.column(i).cast(field.type.value_type)
            table = table.set_column(i, pa.field(field.name, column.type, field.nullable), column)
    return table


class EmptySource(DataSource):  # type: ignore[misc]
    """Registered under `SOURCE_NAME` after a query, so no key stays in the session."""

    @classmethod
    def name(cls) -> str:  # noqa: D102
        return SOURCE_NAME

    def schema(self) -> str:  # noqa: D102
        return "empty string"

    def reader(self, schema: Any) -> DataSourceReader:  # noqa: D102
        raise RuntimeError("no sealed version is open")
