"""The aggregation engine on Spark: DuckDBEngine's exact aggregates, partition by partition.

Spark reads the sealed segments in its executors (`source`), links people across identifiers
(the union-find itself runs on the driver, shared with DuckDBEngine), sends each person's rows
of every dataset to one partition, and there runs DuckDBEngine's own SQL (`partials`). Only
the bounding and aggregation SQL exists, once: the engines agree by construction.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections.abc import Collection
from functools import reduce
from typing import Any

import numpy as np
import pyarrow as pa
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from entremise.server.domain.errors import ComputationStopped
from entremise.server.domain.models import ExactAggregates, QueryPlan
from entremise.server.domain.ports import AggregationEngine
from entremise.server.engine import _collect, linked, smallest_in_component, source_columns
from entremise.server.files import segments
from entremise.server.spark.partials import (
    PARTIAL,
    bucket_function,
    combine,
    partition_function,
    prefixed,
)
from entremise.server.spark.source import (
    SOURCE_NAME,
    Consent,
    EmptySource,
    bucketed_source,
    sealed_source,
)


class SparkEngine(AggregationEngine):
    """Runs queries on a Spark cluster (`spark://host:port`) or in-process (`local[N]`).

    One session per engine, started on first use. Queries are serialised: each registers its
    data sources (which hold the data keys) under one name, replaced by a keyless one after.
    """

    def __init__(
        self,
        master: str = "local[2]",
        *,
        spill_dir: str | None = None,
        partitions: int | None = None,
    ) -> None:
        self.master = master
        self.spill_dir = spill_dir
        self._partitions = partitions
        self._session: SparkSession | None = None
        self._labels: list[int] | None = None
        self._lock = threading.Lock()
        self._stopping = False

    def interrupt(self) -> None:
        """Cancel the running job (hub shutdown): it, and any later query, stop uncharged."""
        self._stopping = True
        if self._session is not None:
            self._session.sparkContext.cancelAllJobs()

    @property
    def session(self) -> SparkSession:
        """The engine's Spark session, started on first use."""
        if self._session is None or self._session.sparkContext._jsc is None:
            # (Stopped elsewhere: pyspark has one context per process, shared by engines.)
            # Executors run this interpreter: it has pyarrow, duckdb and entremise.
            os.environ["PYSPARK_PYTHON"] = sys.executable
            os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
            builder = (
                SparkSession.builder.master(self.master)
                .appName("entremise")
                .config("spark.sql.execution.arrow.pyspark.enabled", "true")
                .config("spark.sql.session.timeZone", "UTC")
                # Shuffled and spilled rows are decrypted records: encrypted on local disk.
                .config("spark.io.encryption.enabled", "true")
                .config("spark.ui.enabled", "false")
                .config("spark.ui.showConsoleProgress", "false")
            )
            if self.master.startswith("local"):  # a cluster must reach the driver: its choice
                builder = builder.config("spark.driver.bindAddress", "127.0.0.1").config(
                    "spark.driver.host", "127.0.0.1"
                )
            if self.spill_dir:
                os.makedirs(self.spill_dir, exist_ok=True)
                builder = builder.config("spark.local.dir", self.spill_dir)
            self._session = builder.getOrCreate()
            self._session.sparkContext.setLogLevel("ERROR")
            self._labels = None
        return self._session

    @property
    def partitions(self) -> int:
        """Partitions per query: as given, else one per task slot (every executor core).

        Each Python task costs a fixed ~0.1 s, and holds its share of the rows in memory:
        data larger than the task slots' memory needs more partitions.
        """
        if self._partitions is not None:
            return self._partitions
        return max(1, int(self.session.sparkContext.defaultParallelism))

    def close(self) -> None:
        """Stop the Spark session (its JVM stays up for the process, as pyspark does)."""
        if self._session is not None:
            self._session.stop()
            self._session = None

    def compute(  # noqa: D102
        self, plan: QueryPlan, sources: list[Any], withdrawn: Collection[str], now: str
    ) -> ExactAggregates:
        with self._lock:
            if self._stopping:
                raise ComputationStopped
            spark = self.session
            # The linking joins' partitions: per query, as a cluster's executors (the task
            # slots) may register after the session starts.
            spark.conf.set("spark.sql.shuffle.partitions", str(self.partitions))
            try:
                if linked(plan):
                    frames = [self._read(spark, plan, i, s, now) for i, s in enumerate(sources)]
                    partials = self._partials(spark, plan, frames, withdrawn, now)
                else:
                    partials = self._bucketed(spark, plan, sources, withdrawn, now)
            except Exception:
                if self._stopping:  # the job was cancelled: nothing came out of it
                    raise ComputationStopped from None
                raise
            finally:
                spark.dataSource.register(EmptySource)
        return _collect(plan, combine(plan, partials))

    def _bucketed(
        self,
        spark: SparkSession,
        plan: QueryPlan,
        sources: list[Any],
        withdrawn: Collection[str],
        now: str,
    ) -> list[str]:
        """People known by one identifier: bucketed by it as segments are read, no row in the JVM.

        Each reading task splits its segment's rows into one Arrow stream per partition (by
        a hash of the identifier, the person); Spark shuffles these few values, and each
        partition runs DuckDB's SQL over its people's rows of every dataset.
        """
        locations, consents = [], []
        for i, source in enumerate(sources):
            if not hasattr(source, "location"):
                raise TypeError(
                    "the Spark engine reads stored versions (StoredVersion), not tables"
                )
            locations.append(source.location())
            consent = plan.datasets[i].schema.consent(plan.agreement.purpose)
            assert consent is not None
            consents.append(Consent(consent.column, consent.expiry_column or None, now))
        columns = [source_columns(plan, i) for i in range(len(sources))]
        keys = [d.schema.key_columns[0] for d in plan.datasets]
        labels = self._partition_labels(spark)
        source = bucketed_source(locations, columns, consents, keys, labels, tasks=len(labels))
        spark.dataSource.register(source)
        run = bucket_function(plan, withdrawn, now)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "PySpark does not yet fully support pandas")
            frame = spark.read.format(SOURCE_NAME).load()
            out = frame.repartition(self.partitions, "bucket").mapInArrow(run, PARTIAL)
        return [row.partial for row in out.collect()]

    def _partition_labels(self, spark: SparkSession) -> list[int]:
        """Bucket labels l_k such that Spark's hash partitioning sends l_k to partition k."""
        if self._labels is None or len(self._labels) != self.partitions:
            n = self.partitions
            found: dict[int, int] = {}
            start = 0
            while len(found) < n:
                rows = spark.range(start, start + 64 * n).select(
                    F.col("id").cast("int").alias("v"),
                    F.expr(f"pmod(hash(CAST(id AS INT)), {n})").alias("p"),
                )
                for row in rows.collect():
                    found.setdefault(row.p, row.v)
                start += 64 * n
            self._labels = [found[k] for k in range(n)]
        return self._labels

    def _read(
        self, spark: SparkSession, plan: QueryPlan, i: int, source: Any, now: str
    ) -> DataFrame:
        """Dataset `i`'s consented rows (its needed columns) as a DataFrame read by executors."""
        columns = source_columns(plan, i)
        if not hasattr(source, "location"):  # an in-memory table: nowhere executors can read
            raise TypeError("the Spark engine reads stored versions (StoredVersion), not tables")
        location = source.location()
        fs, _ = segments.local_or(location.uri)
        first = next(
            segments.read_segments(
                fs,
                location.path,
                location.key,
                location.dataset_id,
                location.version,
                [location.spans[0]],
            )
        )
        consent = plan.datasets[i].schema.consent(plan.agreement.purpose)
        assert consent is not None
        rule = Consent(consent.column, consent.expiry_column or None, now)
        arrow = first.select(columns).schema
        spark.dataSource.register(sealed_source(location, columns, arrow, rule))
        return spark.read.format("entremise_sealed").load()

    def _partials(
        self,
        spark: SparkSession,
        plan: QueryPlan,
        frames: list[DataFrame],
        withdrawn: Collection[str],
        now: str,
    ) -> list[str]:
        """Each dataset's rows with their person, repartitioned by person, aggregated by DuckDB."""
        keys = [d.schema.key_columns for d in plan.datasets]
        person = self._person(spark, plan, frames) if linked(plan) else None
        columns = [source_columns(plan, i) for i in range(len(frames))]
        parts = []
        for i, frame in enumerate(frames):
            frame = _with_pid(frame, keys[i], person)
            parts.append(
                frame.select(
                    F.lit(i).alias("_ds"),
                    F.col("pid"),
                    *(F.col(c).alias(prefixed(i, c)) for c in columns[i]),
                )
            )
        union = reduce(lambda a, b: a.unionByName(b, allowMissingColumns=True), parts)
        run = partition_function(plan, columns, withdrawn, now)
        with warnings.catch_warnings():
            # mapInArrow checks for pandas (and warns about pandas 3) though no pandas is used:
            # every batch here is Arrow.
            warnings.filterwarnings("ignore", "PySpark does not yet fully support pandas")
            out = union.repartition(self.partitions, "pid").mapInArrow(run, PARTIAL)
        return [row.partial for row in out.collect()]

    def _person(self, spark: SparkSession, plan: QueryPlan, frames: list[DataFrame]) -> DataFrame:
        """`person(node, label)`: DuckDBEngine's linking (`link_people`) with edges from Spark."""
        edges = []
        for dataset, frame in zip(plan.datasets, frames, strict=True):
            keys = dataset.schema.key_columns
            for n, first in enumerate(keys):
                for other in keys[n + 1 :]:
                    edges.append(
                        frame.where(F.col(first).isNotNull() & F.col(other).isNotNull()).select(
                            F.col(first).cast("string").alias("a"),
                            F.col(other).cast("string").alias("b"),
                        )
                    )
        if edges:
            table = reduce(DataFrame.union, edges).distinct().toArrow()
            a = table.column("a").to_numpy(zero_copy_only=False)
            b = table.column("b").to_numpy(zero_copy_only=False)
        else:
            a = b = np.array([], dtype=object)
        # Nodes numbered in pseudonym order, as link_people does, so the labels are the same.
        nodes = np.unique(np.concatenate([a, b])).astype(object)
        _, label_id = smallest_in_component(
            np.searchsorted(nodes, a).astype(np.int64),
            np.searchsorted(nodes, b).astype(np.int64),
            len(nodes),
        )
        labels = pa.table(
            {
                "node": pa.array(list(nodes), pa.string()),
                "label": pa.array(list(nodes[label_id]) if len(nodes) else [], pa.string()),
            }
        )
        return spark.createDataFrame(labels)


def _with_pid(frame: DataFrame, keys: list[str], person: DataFrame | None) -> DataFrame:
    """The rows with their person, as in build_sql: coalesce(label(k1), k1, label(k2), k2, ...)."""
    if person is None:
        return frame.withColumn("pid", F.col(keys[0]).cast("string"))
    parts: list[Column] = []
    for n, key in enumerate(keys):
        node, label = f"_node{n}", f"_label{n}"
        labels = person.select(F.col("node").alias(node), F.col("label").alias(label))
        frame = frame.join(labels, F.col(key).cast("string") == F.col(node), "left")
        parts += [F.col(label), F.col(key).cast("string")]
    frame = frame.withColumn("pid", F.coalesce(*parts))
    return frame.drop(*(f"_{w}{n}" for w in ("node", "label") for n in range(len(keys))))
