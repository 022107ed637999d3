"""Quoted workloads: `query quote FILE` prices several queries, `query run --quote ID` runs them.

The quote is free; the run is one all-or-nothing debit of the quoted total.

FILE is a JSON list of queries in the API's JSON form (the `Query` message of
proto/entremise/v1/query_service.proto), or a `.sql` file of SELECTs separated by `;`, each
translated by `entremise.sdk.sql` and given `--epsilon` (or `--rho`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from google.protobuf import json_format
from rich.table import Table
from rich.text import Text

from entremise.cli import analyst
from entremise.cli._common import (
    DEFAULT_TARGET,
    JsonOption,
    QuietOption,
    TargetOption,
    TokenOption,
    connect,
    fail,
    friendly_errors,
    print_json,
    quiet_or_json,
    to_dict,
)
from entremise.cli.output import console, print_table, table, text_column
from entremise.sdk import Client, QueryPlan, QueryResult, Quote
from entremise.sdk.query import QueryError
from entremise.v1 import query_service_pb2


def load_workload(path: Path) -> list[query_service_pb2.Query] | list[str]:
    """A workload file: queries from JSON (a list, or {"queries": [...]}), or SQL statements."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".sql":
        statements = [s.strip() for s in text.split(";") if s.strip()]
        if not statements:
            raise ValueError(f"{path}: holds no SQL statement")
        return statements
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None
    if isinstance(data, dict) and "queries" in data:
        data = data["queries"]
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a JSON list of queries")
    queries = []
    for i, item in enumerate(data, 1):
        try:
            queries.append(json_format.ParseDict(item, query_service_pb2.Query()))
        except json_format.ParseError as exc:
            raise ValueError(f"{path}: query {i}: {exc}") from None
    return queries


def _sql_queries(
    client: Client, statements: list[str], agreement: str, epsilon: str, rho: str, delta: str
) -> list[query_service_pb2.Query]:
    """Each SELECT translated (entremise.sdk.sql) and bound to the agreement and its budget."""
    try:
        import entremise.sdk.sql  # noqa: F401  (the translator: sqlglot, loaded only for SQL)
    except ImportError:
        raise ValueError("SQL workloads need entremise.sdk.sql") from None
    queries = []
    for i, statement in enumerate(statements, 1):
        try:
            request = client.sql_request(
                statement,
                epsilon=epsilon or None,
                rho=rho or None,
                delta=delta or None,
                agreement_id=agreement,
            )
        except QueryError as exc:
            raise ValueError(f"statement {i}: {exc}") from None
        queries.append(request.message)
    return queries


def _quote_table(i: int, plan: QueryPlan, cost: str, replayed: bool, unit: str) -> Table:
    title = f"query {i}: {unit} {cost} over {plan.cell_count:,} cell(s)"
    if replayed:
        title += " (replayed from the ledger: free)"
    out = table(
        text_column("aggregate"),
        text_column(unit),
        text_column("mechanism"),
        text_column("95% +/-"),
        title=title,
    )
    for a in plan.aggregates:
        words = f"{a.kind.name.lower()} of {a.column}" if a.column else a.kind.name.lower()
        out.add_row(
            Text(words),
            Text(a.epsilon),
            Text(a.mechanism.replace("_", " ")),
            analyst.planned_halfwidth(a),
        )
    return out


def quote(
    file: Annotated[Path, typer.Argument(help="JSON list of queries, or a .sql file.")],
    agreement: Annotated[
        str, typer.Option("--agreement", help="Agreement id, for queries that name none.")
    ] = "",
    epsilon: Annotated[
        str, typer.Option(help="Epsilon of each SQL statement (a .sql workload only).")
    ] = "",
    rho: Annotated[str, typer.Option(help="Rho of each SQL statement (zCDP agreements).")] = "",
    delta: analyst.DeltaOpt = "",
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Price a workload of several queries (cost, 95% half-widths); spends nothing.

    FILE is a JSON list of queries in the API's form, or a .sql file of SELECTs separated by
    `;` (each given --epsilon, or --rho). With --quiet, prints only the quote's id, for scripts:
    QUOTE=$(entremise query quote workload.json --agreement AG -q)
    """
    quiet_or_json(quiet, json_out)
    with friendly_errors():
        workload = load_workload(file)
        sql = all(isinstance(w, str) for w in workload)
        if (epsilon or rho or delta) and not sql:
            raise ValueError("--epsilon, --rho and --delta apply to .sql workloads only")
        if sql and not epsilon and not rho:
            raise ValueError("a .sql workload needs --epsilon (or --rho): each statement's budget")
    with connect(target, token) as client, friendly_errors():
        if sql:
            statements = [w for w in workload if isinstance(w, str)]
            queries = _sql_queries(client, statements, agreement, epsilon, rho, delta)
        else:
            queries = [w for w in workload if not isinstance(w, str)]
        quoted = client.quote(queries, agreement_id=agreement)
    if json_out:
        print_json(to_dict(quoted.raw))
        return
    if quiet:
        print(quoted.quote_id)
        return
    _print_quote(quoted)


def _print_quote(quoted: Quote) -> None:
    unit = quoted.measure.unit
    for i, (plan, cost, replayed) in enumerate(
        zip(quoted.plans, quoted.costs, quoted.replayed, strict=True), 1
    ):
        print_table(_quote_table(i, plan, cost, replayed, unit))
    lines = [
        f"total: {unit} {quoted.total}"
        + (f", delta {quoted.total_delta}" if quoted.total_delta not in ("", "0") else ""),
        f"budget: {quoted.remaining_before} -> {quoted.remaining_after}",
        f"quote {quoted.quote_id}, valid until {quoted.expires_at}: "
        f"entremise query run --quote {quoted.quote_id}",
    ]
    for line in lines:
        console.print(line, markup=False, highlight=False)


def run(
    agreement: Annotated[str, typer.Option("--agreement", help="Agreement id.")] = "",
    agg: Annotated[
        list[str] | None,
        typer.Option(
            "--agg",
            help="KIND[:COLUMN][@EPSILON|~TARGET]; KIND is count (people), count_rows, sum, "
            "mean, variance, quantile or median; ~TARGET asks for a 95% half-width. Repeat.",
        ),
    ] = None,
    epsilon: analyst.EpsilonOpt = "",
    rho: analyst.RhoOpt = "",
    delta: analyst.DeltaOpt = "",
    quantile: analyst.QuantileOpt = 0.5,
    group_by: analyst.GroupOpt = None,
    where: analyst.WhereOpt = None,
    max_rows: analyst.MaxRowsOpt = 0,
    max_groups: analyst.MaxGroupsOpt = 0,
    quote_id: Annotated[
        str,
        typer.Option(
            "--quote", help="Run a quoted workload instead (from `query quote`), all or nothing."
        ),
    ] = "",
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """Spend budget and release the differentially private answer (or a quoted workload)."""
    if not quote_id:
        if not agreement or not agg:
            fail("query run needs --agreement and --agg (or --quote ID)")
        analyst.run(
            agreement=agreement,
            agg=agg or [],
            epsilon=epsilon,
            rho=rho,
            delta=delta,
            quantile=quantile,
            group_by=group_by,
            where=where,
            max_rows=max_rows,
            max_groups=max_groups,
            target=target,
            token=token,
            json_out=json_out,
        )
        return
    if agreement or agg:
        fail("--quote runs the quoted queries: give no --agreement or --agg with it")
    with connect(target, token) as client, friendly_errors():
        results = client.run_quote(quote_id)
    if json_out:
        print_json(
            {
                "quote_id": quote_id,
                "results": [to_dict(r.raw) for r in results],
                "remaining_epsilon": results[-1].remaining_epsilon if results else "",
            }
        )
        return
    _print_run(quote_id, results)


def _print_run(quote_id: str, results: list[QueryResult]) -> None:
    for i, response in enumerate(results, 1):
        release = response.release
        unit = release.plan.measure.unit
        note = " (replayed: free)" if response.replayed else ""
        console.print(
            f"query {i}: release {release.release_id}, {release.status}, "
            f"{unit} {release.epsilon_spent}{note}",
            markup=False,
            highlight=False,
        )
        for result in release.results:
            print_table(analyst._result_table(result, {}))
    remaining = results[-1].remaining_epsilon if results else ""
    console.print(
        f"quote {quote_id}: {len(results)} queries released with one debit; remaining {remaining}",
        markup=False,
        highlight=False,
    )
