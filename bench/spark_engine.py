"""DuckDBEngine vs SparkEngine (local[2]) on the same plans over the same sealed versions (JSON).

A hub in a temporary directory receives the benchmark's bank and panel (`bench.data`) through
gRPC; each query is planned by the hub, computed once by both engines (their exact aggregates
must be equal), then timed: median, min and max wall seconds over `--runs` after a warm-up,
and the ratio Spark / DuckDB. DuckDB reads the hub's table cache when the data fits it (its
normal path); Spark's executors decrypt the segments on every query (its only path).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from entremise.privacy.budget import Epsilon
from entremise.server import testing
from entremise.server.domain.models import AggregateKind, AggregateSpec, QuerySpec
from entremise.server.engine import DuckDBEngine
from entremise.server.spark import SparkEngine

from .data import MAX_ROWS_PER_PERSON, generate
from .pipeline import BANK, PANEL, Bench, measure

NOW = "2026-01-01T00:00:00+00:00"
#: name -> (aggregate kind, column, group by, quantile)
QUERIES: dict[str, tuple[AggregateKind, str, tuple[str, ...], float | None]] = {
    "people": (AggregateKind.COUNT, "", (), None),
    "rows": (AggregateKind.COUNT_ROWS, "", (), None),
    "sum_amount": (AggregateKind.SUM, "panel.amount", (), None),
    "mean_amount": (AggregateKind.MEAN, "panel.amount", (), None),
    "median_amount": (AggregateKind.QUANTILE, "panel.amount", (), 0.5),
    "sum_by_category": (AggregateKind.SUM, "panel.amount", ("panel.category",), None),
    "rows_by_segment": (AggregateKind.COUNT_ROWS, "", ("bank.segment",), None),
    "rows_by_segment_category": (
        AggregateKind.COUNT_ROWS,
        "",
        ("bank.segment", "panel.category"),
        None,
    ),
}


def run(
    size: str,
    runs: int,
    master: str,
    partitions: int | None = None,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """Upload at `size`, then time every query (or `only` these) on both engines."""
    bank, panel = generate(size)
    results: dict[str, Any] = {
        "size": size,
        "rows": {"bank": len(bank), "panel": len(panel)},
        "runs": runs,
        "cpus": os.cpu_count(),
        "spark_master": master,
        "load_average_before": os.getloadavg(),
        "queries": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp) / "hub")
        options = {} if partitions is None else {"partitions": partitions}
        spark = SparkEngine(master, spill_dir=str(Path(tmp) / "spark"), **options)
        try:
            for who, frame, schema in (("bank", bank, BANK), ("panel", panel, PANEL)):
                client, key, _ = bench.partners[who]
                client.upload_dataset(bench.agreement_id, who, frame, schema, keys=key)
            hub = bench.running.hub
            duck = DuckDBEngine()
            for name, (kind, column, group_by, quantile) in QUERIES.items():
                if only and name not in only:
                    continue
                spec = QuerySpec(
                    bench.agreement_id,
                    (AggregateSpec(name, kind, column, quantile=quantile),),
                    Epsilon.parse("1"),
                    group_by=group_by,
                    max_rows_per_person=MAX_ROWS_PER_PERSON,
                    max_groups_per_person=MAX_ROWS_PER_PERSON,
                )
                plan = testing.plan(hub, spec)
                sources = [hub.files.source(d.dataset_id, d.version) for d in plan.datasets]

                def on_duckdb(plan: Any = plan, sources: Any = sources) -> Any:
                    return duck.compute(plan, sources, set(), NOW)

                def on_spark(plan: Any = plan, sources: Any = sources) -> Any:
                    return spark.compute(plan, sources, set(), NOW)

                equal = on_duckdb() == on_spark()
                timed = {"duckdb": measure(on_duckdb, runs), "spark": measure(on_spark, runs)}
                results["queries"].append(
                    {
                        "query": name,
                        "equal": equal,
                        "duckdb": timed["duckdb"],
                        "spark": timed["spark"],
                        "ratio_spark_over_duckdb": timed["spark"]["median_s"]
                        / timed["duckdb"]["median_s"],
                    }
                )
                print(json.dumps(results["queries"][-1]), file=sys.stderr, flush=True)
        finally:
            spark.close()
            bench.close()
    results["load_average_after"] = os.getloadavg()
    return results


def main() -> None:
    """Parse arguments, run, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="S", choices=["S", "M", "L"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--partitions", type=int, help="the Spark engine's (default: its own)")
    parser.add_argument("--only", nargs="*", choices=list(QUERIES), help="these queries alone")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = run(args.size, args.runs, args.master, args.partitions, args.only)
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
