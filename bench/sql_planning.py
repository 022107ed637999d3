"""What DP SQL adds before a query runs: parsing with sqlglot, then the same planner.

For each query the benchmark times, interleaved over `--runs` rounds on the demo's schemas:
- `sql`: `entremise.sdk.sql.translate` (sqlglot parse + translation), the hub's conversion of
  the message and `plan_query`;
- `mini_language` (the baseline): the same query written in the CLI's mini-language
  (`parse_aggregate`, `parse_filter`), converted and planned the same way.
It prints JSON: per query the median and the 10th/90th percentiles of each path in
milliseconds, and `added_ms` = median(sql) - median(mini_language), against the 5 ms target.
Planning reads public inputs only, so no hub or data is needed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from entremise.partners.synthetic import BANK_SCHEMA, PANEL_SCHEMA, PURPOSE
from entremise.privacy.budget import Epsilon
from entremise.sdk.query import parse_aggregate, parse_filter, query
from entremise.sdk.sql import translate
from entremise.server.api.serde import query_from_proto, schema_from_proto
from entremise.server.domain.models import (
    Agreement,
    AgreementStatus,
    Dataset,
    DatasetSlot,
)
from entremise.server.domain.planner import plan_query
from entremise.v1 import query_service_pb2

TARGET_MS = 5.0
NOW = "2026-11-27T00:00:00+00:00"

#: (name, SQL, mini-language: aggregates, group-bys, filters); the two forms mean the same.
QUERIES: list[tuple[str, str, list[str], list[str], list[str]]] = [
    ("people", "SELECT COUNT(DISTINCT PERSON) AS count FROM bank JOIN panel", ["count"], [], []),
    (
        "people_per_segment",
        "SELECT bank.segment, COUNT(DISTINCT PERSON) AS count FROM bank JOIN panel "
        "GROUP BY bank.segment",
        ["count"],
        ["bank.segment"],
        [],
    ),
    (
        "mean_by_category_affluent",
        "SELECT panel.category, AVG(panel.amount) FROM bank JOIN panel "
        "WHERE bank.segment = 'affluent' GROUP BY panel.category",
        ["mean:panel.amount"],
        ["panel.category"],
        ["bank.segment=affluent"],
    ),
    (
        "sum_by_segment_category",
        "SELECT bank.segment, panel.category, SUM(panel.amount) FROM bank JOIN panel "
        "GROUP BY bank.segment, panel.category",
        ["sum:panel.amount"],
        ["bank.segment", "panel.category"],
        [],
    ),
    (
        "five_aggregates",
        "SELECT COUNT(*) AS n_rows, COUNT(DISTINCT PERSON) AS people, SUM(panel.amount), "
        "AVG(panel.amount), VARIANCE(panel.amount) FROM bank JOIN panel WHERE panel.amount >= 10 "
        "AND panel.amount <= 400",
        ["count_rows", "count", "sum:panel.amount", "mean:panel.amount", "variance:panel.amount"],
        [],
        ["panel.amount>=10", "panel.amount<=400"],
    ),
    (
        "median_by_segment",
        "SELECT bank.segment, MEDIAN(panel.amount) FROM bank JOIN panel GROUP BY bank.segment",
        ["median:panel.amount"],
        ["bank.segment"],
        [],
    ),
    (
        "weekly_per_category",
        "SELECT panel.week, panel.category, SUM(panel.amount) FROM bank JOIN panel "
        "GROUP BY panel.week, panel.category",
        ["sum:panel.amount"],
        ["panel.week", "panel.category"],
        [],
    ),
    (
        "categories_but_grocery",
        "SELECT panel.category, COUNT(*) FROM bank JOIN panel "
        "WHERE panel.category NOT IN ('grocery') GROUP BY panel.category",
        ["count_rows"],
        ["panel.category"],
        ["panel.category!=grocery"],
    ),
]


def _datasets() -> tuple[Agreement, tuple[Dataset, ...]]:
    """The demo's agreement and schemas, as the planner receives them."""
    datasets = tuple(
        Dataset(
            f"ds{i}",
            name,
            f"p{i}",
            "ag",
            schema_from_proto(schema.to_proto()),
            0,
            0,
            1,
            "",
            NOW,
            "",
        )
        for i, (name, schema) in enumerate((("bank", BANK_SCHEMA), ("panel", PANEL_SCHEMA)))
    )
    agreement = Agreement(
        "ag",
        "bench",
        PURPOSE,
        (DatasetSlot("p0", "bank"), DatasetSlot("p1", "panel")),
        ("analyst",),
        Epsilon.parse("10"),
        max_rows_per_person=10,
        max_groups_per_person=0,
        created_at=NOW,
        status=AgreementStatus.ACTIVE,
    )
    return agreement, datasets


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def _stats(samples: list[float]) -> dict[str, float]:
    deciles = statistics.quantiles(samples, n=10)
    return {
        "median_ms": round(statistics.median(samples), 4),
        "p10_ms": round(deciles[0], 4),
        "p90_ms": round(deciles[-1], 4),
    }


def run(runs: int) -> dict[str, Any]:
    """Time both paths for every query, interleaved, and compare their medians."""
    agreement, datasets = _datasets()

    def plan(msg: query_service_pb2.Query) -> Any:
        return plan_query(query_from_proto(msg), agreement, datasets)

    results = []
    for name, sql, aggregates, group_by, filters in QUERIES:

        def with_sql(text: str = sql) -> Any:
            return plan(translate(text).message("ag", epsilon="1"))

        def with_mini_language(
            a: list[str] = aggregates, g: list[str] = group_by, f: list[str] = filters
        ) -> Any:
            msg = query(
                "ag",
                "1",
                [parse_aggregate(x) for x in a],
                group_by=g,
                filters=[parse_filter(x) for x in f],
            )
            return plan(msg)

        # Both forms must plan the same query, or the comparison means nothing.
        sql_plan, mini_plan = with_sql(), with_mini_language()
        same = [(p.spec.kind, p.ref) for p in sql_plan.aggregates] == [
            (p.spec.kind, p.ref) for p in mini_plan.aggregates
        ] and sql_plan.group_keys == mini_plan.group_keys
        timings: dict[str, list[float]] = {"sql": [], "mini_language": []}
        for _ in range(runs):
            timings["sql"].append(_timed(with_sql))
            timings["mini_language"].append(_timed(with_mini_language))
        sql_stats, mini_stats = _stats(timings["sql"]), _stats(timings["mini_language"])
        added = sql_stats["median_ms"] - mini_stats["median_ms"]
        results.append(
            {
                "query": name,
                "same_plan": same,
                "sql": sql_stats,
                "mini_language": mini_stats,
                "added_ms": round(added, 4),
                "within_target": added < TARGET_MS,
            }
        )
    return {
        "benchmark": "sql_planning",
        "runs": runs,
        "target_added_ms": TARGET_MS,
        "queries": results,
        "worst_added_ms": max(r["added_ms"] for r in results),
        "all_within_target": all(r["within_target"] and r["same_plan"] for r in results),
    }


def main() -> None:  # noqa: D103
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    result = run(args.runs)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            out.write(text + "\n")
    sys.exit(0 if result["all_within_target"] else 1)


if __name__ == "__main__":
    main()
