"""Stage 6: the same ten DP queries in Tumult Analytics on Spark local mode. Prints JSON.

A peer, not a baseline: Tumult Analytics pins its own pandas, numpy and pyspark, so it runs
in its own virtualenv (`make bench-tumult` builds `.venv-tumult` from
`bench/requirements-tumult.txt`) and reads its rows from `bench/data.py` only, never from
Entremise.

    .venv-tumult/bin/python -m bench.tumult --size M --runs 5 [--out PATH]
        [--shuffle-partitions 8] [--input-partitions 4] [--driver-memory 8g]

Privacy unit: one person (email) across both tables, via `AddRowsWithID("email")` in one
identifier space. Each query filters consent on both tables, inner-joins them privately on
email, truncates to `MAX_ROWS_PER_PERSON` rows per person and clamps amounts to
`AMOUNT_BOUNDS`. Pure DP, epsilon 1 per evaluation, drawn from one Session whose total budget
is exactly what the warm-ups and timed runs spend (10 queries x (1 + runs) x 1).

Timings, all wall seconds: Spark start-up (JVM launch included), loading the pandas frames into
cached Spark DataFrames, building the Session, then per query one warm-up and `--runs` timed
evaluations, each materialised with `.toPandas()`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyspark
import tmlt.analytics
from pyspark.sql import DataFrame, SparkSession
from tmlt.analytics import (
    AddRowsWithID,
    KeySet,
    MaxRowsPerID,
    PureDPBudget,
    Query,
    QueryBuilder,
    Session,
)
from tmlt.analytics.utils import cleanup as tumult_cleanup

from .data import (
    AMOUNT_BOUNDS,
    CATEGORIES,
    MAX_ROWS_PER_PERSON,
    SEGMENTS,
    SHOPS,
    SIZES,
    generate,
)

EPSILON = 1.0
ID_SPACE = "person"
LOW, HIGH = AMOUNT_BOUNDS


def spark_settings(shuffle_partitions: int, driver_memory: str, warehouse: str) -> dict[str, str]:
    """Spark settings for 2 cores: few shuffle partitions, Arrow for pandas transfers, no UI."""
    return {
        "spark.master": "local[2]",
        "spark.driver.memory": driver_memory,
        "spark.sql.shuffle.partitions": str(shuffle_partitions),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.adaptive.enabled": "true",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.warehouse.dir": warehouse,
        "spark.local.dir": warehouse,
    }


def start_spark(settings: dict[str, str]) -> SparkSession:
    """A fresh local Spark session (this launches the JVM).

    Tumult adds its noise in Python UDFs, so Spark's Python workers must run this venv's
    interpreter, not whatever `python3` is first on PATH.
    """
    os.environ["PYSPARK_PYTHON"] = sys.executable
    builder = SparkSession.builder.appName("entremise-bench-tumult")
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def summary(walls: list[float]) -> dict[str, float]:
    """Median/min/max of wall seconds."""
    return {"median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls)}


def load(
    spark: SparkSession, bank: pd.DataFrame, panel: pd.DataFrame, partitions: int
) -> dict[str, DataFrame]:
    """Cached Spark copies of the frames; `ok` becomes 0/1 as Tumult has no boolean type.

    Arrow slices a frame into one partition per 10,000-row batch (500 for the M panel); every
    Tumult stage then pays per-task overhead 500 times on 2 cores, so repartition round-robin.
    """
    frames = {}
    for name, pdf in (("bank", bank), ("panel", panel)):
        sdf = spark.createDataFrame(pdf.assign(ok=pdf["ok"].astype("int64")))
        sdf = sdf.repartition(partitions).cache()
        sdf.count()  # materialise the cache inside the timed load
        frames[name] = sdf
    return frames


def build_session(frames: dict[str, DataFrame], budget: float) -> Session:
    """Both tables keyed by email in one identifier space, so a person is the privacy unit."""
    builder = Session.Builder().with_privacy_budget(PureDPBudget(budget)).with_id_space(ID_SPACE)
    for name, sdf in frames.items():
        builder = builder.with_private_dataframe(
            name, sdf, protected_change=AddRowsWithID(id_column="email", id_space=ID_SPACE)
        )
    return builder.build()


def consented_join() -> QueryBuilder:
    """Consenting bank clients inner-joined on email with their consented purchases."""
    bank = QueryBuilder("bank").filter("ok = 1").select(["email", "segment"])
    panel = QueryBuilder("panel").filter("ok = 1").select(["email", "category", "shop", "amount"])
    return bank.join_private(panel, join_columns=["email"])


def bounded() -> QueryBuilder:
    """The consented join truncated to at most MAX_ROWS_PER_PERSON rows per person."""
    return consented_join().enforce(MaxRowsPerID(MAX_ROWS_PER_PERSON))


def queries() -> dict[str, Callable[[], Query]]:
    """The ten queries of the Entremise benchmark, with public keys for every group-by.

    Factories, so each evaluation builds its query (and key set) afresh.
    """

    def by(**keys: tuple[str, ...]) -> KeySet:
        return KeySet.from_dict({column: list(values) for column, values in keys.items()})

    return {
        # Tumult rewrites a distinct count of the ID column as MaxRowsPerID(1) + count.
        "people": lambda: consented_join().count_distinct(["email"], mechanism="laplace"),
        "rows": lambda: bounded().count(mechanism="laplace"),
        "sum_amount": lambda: bounded().sum("amount", LOW, HIGH, mechanism="laplace"),
        "mean_amount": lambda: bounded().average("amount", LOW, HIGH, mechanism="laplace"),
        "hist_category": lambda: (
            bounded().groupby(by(category=CATEGORIES)).count(mechanism="laplace")
        ),
        "hist_shop": lambda: bounded().groupby(by(shop=SHOPS)).count(mechanism="laplace"),
        "sum_by_category": lambda: (
            bounded().groupby(by(category=CATEGORIES)).sum("amount", LOW, HIGH, mechanism="laplace")
        ),
        # Quantiles take no mechanism: Tumult always uses the exponential mechanism.
        "median_amount": lambda: bounded().median("amount", LOW, HIGH),
        "rows_by_segment": lambda: (
            bounded().groupby(by(segment=SEGMENTS)).count(mechanism="laplace")
        ),
        "rows_by_segment_category": lambda: (
            bounded().groupby(by(segment=SEGMENTS, category=CATEGORIES)).count(mechanism="laplace")
        ),
    }


def jvm_pid() -> int | None:
    """The Spark JVM: the java child of this process (found via /proc)."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if int(fields[1]) == me and comm == "java":
            return int(entry.name)
    return None


def proc_status_mb(pid: int | None, key: str) -> float | None:
    """A memory line of /proc/PID/status (VmHWM = peak RSS) in MiB, or None."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def jvm_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of the JVM so far (the work runs there, not in Python)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(fn: Callable[[], Any], runs: int, pid: int | None) -> tuple[dict[str, Any], Any]:
    """One warm-up then `runs` timed calls; wall summary, JVM CPU median and the last result."""
    result = fn()
    walls, cpus = [], []
    for _ in range(runs):
        c0 = jvm_cpu_s(pid)
        w0 = time.perf_counter()
        result = fn()
        walls.append(time.perf_counter() - w0)
        c1 = jvm_cpu_s(pid)
        if c0 is not None and c1 is not None:
            cpus.append(c1 - c0)
    stats: dict[str, Any] = summary(walls)
    stats["jvm_cpu_median_s"] = statistics.median(cpus) if cpus else None
    return stats, result


def answer(result: pd.DataFrame) -> Any:
    """A short, JSON-safe view of one noisy answer: the value, or the number of groups."""
    if len(result) == 1 and len(result.columns) == 1:
        return float(result.iloc[0, 0])
    return {"groups": len(result), "columns": list(result.columns)}


def write(document: dict[str, Any], out: Path | None) -> None:
    """Write the JSON to `out` (after each query too, so a cut-short run leaves its figures)."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(document, indent=2) + "\n")


def run(
    size: str,
    runs: int,
    shuffle_partitions: int,
    input_partitions: int,
    driver_memory: str,
    out: Path | None = None,
) -> dict[str, Any]:
    """Every measurement at one size, in one Spark application."""
    # pyspark 3.5 warns on every pandas UDF Tumult declares; it would drown the table.
    warnings.filterwarnings("ignore", category=UserWarning, module="pyspark")
    load_before = os.getloadavg()
    w0 = time.perf_counter()
    bank, panel = generate(size)
    generate_s = time.perf_counter() - w0
    warehouse = tempfile.mkdtemp(prefix="entremise-tumult-")
    settings = spark_settings(shuffle_partitions, driver_memory, warehouse)
    try:
        w0 = time.perf_counter()
        spark = start_spark(settings)
        startup_s = time.perf_counter() - w0
        pid = jvm_pid()

        w0 = time.perf_counter()
        frames = load(spark, bank, panel, input_partitions)
        load_s = time.perf_counter() - w0

        planned = queries()
        budget = EPSILON * len(planned) * (1 + runs)
        builds = []
        for _ in range(runs):
            w0 = time.perf_counter()
            session = build_session(frames, budget)
            builds.append(time.perf_counter() - w0)

        results: dict[str, Any] = {}
        document: dict[str, Any] = {
            "stage": "6 Tumult Analytics on Spark (same ten DP queries)",
            "size": size,
            "rows": {"bank": len(bank), "panel": len(panel)},
            "runs": runs,
            "cpus": os.cpu_count(),
            "complete": False,
            "versions": {
                "tmlt.analytics": tmlt.analytics.__version__,
                "tmlt.core": _version("tmlt.core"),
                "pyspark": pyspark.__version__,
                "pandas": pd.__version__,
                "java": _java_version(spark),
                "python": sys.version.split()[0],
            },
            "spark": {k: v for k, v in settings.items() if not k.endswith(".dir")}
            | {
                "default_parallelism": spark.sparkContext.defaultParallelism,
                "input_partitions": {k: v.rdd.getNumPartitions() for k, v in frames.items()},
                "input_cached": True,
                "input_repartitioned": "round-robin, in the timed load",
            },
            "privacy": {
                "unit": "person (email), AddRowsWithID in one ID space over both tables",
                "definition": "pure DP (PureDPBudget), Laplace except median (exponential)",
                "epsilon_per_query": EPSILON,
                "session_budget": budget,
                "max_rows_per_person": MAX_ROWS_PER_PERSON,
                "amount_bounds": list(AMOUNT_BOUNDS),
            },
            "generate_s": generate_s,
            "spark_startup_s": startup_s,
            "load_to_spark_s": load_s,
            "session_build": summary(builds),
            "queries": results,
            "loadavg_1_5_15": {"before": list(load_before)},
        }
        for name, make in planned.items():

            def evaluate(make: Callable[[], Query] = make) -> pd.DataFrame:
                return session.evaluate(make(), PureDPBudget(EPSILON)).toPandas()

            stats, last = timed(evaluate, runs, pid)
            stats["last_answer"] = answer(last)
            results[name] = stats
            print(f"  {name:26} {stats['median_s']:8.3f} s", file=sys.stderr)
            write(document, out)

        document["total_of_query_medians_s"] = sum(r["median_s"] for r in results.values())
        document["loadavg_1_5_15"]["after"] = list(os.getloadavg())
        document["peak_rss_mb"] = {
            "python": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "jvm": proc_status_mb(pid, "VmHWM"),
        }
        document["complete"] = True
        write(document, out)
        return document
    finally:
        active = SparkSession.getActiveSession()
        if active is not None:  # not when the JVM failed to start
            tumult_cleanup()
            active.stop()
        shutil.rmtree(warehouse, ignore_errors=True)


def _java_version(spark: SparkSession) -> str:
    """The JVM's own version string (the java that Spark actually launched)."""
    jvm: Any = spark.sparkContext._jvm
    return str(jvm.System.getProperty("java.version"))


def _version(dist: str) -> str:
    """An installed distribution's version."""
    from importlib.metadata import version

    return version(dist)


def table(results: dict[str, Any]) -> str:
    """A readable summary of the JSON."""
    rss = results["peak_rss_mb"]
    jvm = f"{rss['jvm']:.0f}" if rss["jvm"] is not None else "?"
    lines = [
        f"Tumult Analytics {results['versions']['tmlt.analytics']} on Spark "
        f"{results['versions']['pyspark']} {results['spark']['spark.master']}, size "
        f"{results['size']} {results['rows']}, {results['runs']} runs, peak RSS python "
        f"{rss['python']:.0f} MB, JVM {jvm} MB",
        f"{'spark start-up':28} {results['spark_startup_s']:9.3f} s",
        f"{'load pandas -> Spark (cached)':28} {results['load_to_spark_s']:9.3f} s",
        f"{'session build (median)':28} {results['session_build']['median_s']:9.3f} s",
        f"{'query':28} {'median s':>9} {'min s':>9} {'max s':>9}",
    ]
    for name, r in results["queries"].items():
        lines.append(f"{name:28} {r['median_s']:9.3f} {r['min_s']:9.3f} {r['max_s']:9.3f}")
    lines.append(f"{'total of medians':28} {results['total_of_query_medians_s']:9.3f}")
    return "\n".join(lines)


def main() -> None:
    """Run at a size; JSON on stdout (and --out), a table on stderr."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="S")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--shuffle-partitions", type=int, default=8)
    parser.add_argument("--input-partitions", type=int, default=4)
    parser.add_argument("--driver-memory", default="8g")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    results = run(
        args.size,
        args.runs,
        args.shuffle_partitions,
        args.input_partitions,
        args.driver_memory,
        args.out,
    )
    print(json.dumps(results, indent=2))
    print(table(results), file=sys.stderr)


if __name__ == "__main__":
    main()
