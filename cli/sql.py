"""`entremise query sql "SELECT ..."`: preview or run one PostgreSQL SELECT (see entremise.sdk.sql).

The agreement is the caller's one active agreement whose datasets FROM names (or --agreement);
HAVING, ORDER BY and LIMIT/OFFSET act on the released (noisy) cells. `--json` prints the
document `query run --json` prints (`query preview --json` with --preview), post-processed.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from entremise.cli._common import (
    DEFAULT_TARGET,
    JsonOption,
    TargetOption,
    TokenOption,
    connect,
    fail,
    friendly_errors,
    print_json,
    to_dict,
)
from entremise.cli.analyst import (
    DeltaOpt,
    EpsilonOpt,
    RhoOpt,
    _levels,
    _plan_table,
    _print_bounds,
    _result_table,
)
from entremise.cli.output import console, print_table
from entremise.sdk.results import AggregateResult
from entremise.sdk.sql import SqlRequest, describe, post_process_response

SqlArg = Annotated[
    str, typer.Argument(metavar="SQL", help="One SELECT, in quotes.", show_default=False)
]
AgreementOpt = Annotated[
    str,
    typer.Option(
        "--agreement",
        help="Agreement id (default: your one active agreement joining the FROM datasets).",
    ),
]
PreviewOpt = Annotated[
    bool,
    typer.Option(
        "--preview", help="Show how the SQL is read, its cost and accuracy; spend nothing."
    ),
]
AccuracyOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--accuracy",
        help="NAME=HALFWIDTH: the 95% half-width wanted for the aggregate NAME (its alias). "
        "Repeat.",
    ),
]


def _accuracy(texts: list[str]) -> dict[str, float]:
    """--accuracy NAME=HW options as a mapping; ValueError names the malformed one."""
    out: dict[str, float] = {}
    for text in texts:
        name, sep, value = text.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--accuracy {text!r}: expected NAME=HALFWIDTH, e.g. n=20") from None
    return out


def sql(
    text: SqlArg,
    agreement: AgreementOpt = "",
    epsilon: EpsilonOpt = "",
    rho: RhoOpt = "",
    delta: DeltaOpt = "",
    preview: PreviewOpt = False,
    accuracy: AccuracyOpt = None,
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """Preview (--preview) or run one SQL SELECT of aggregates over an agreement's join."""
    if not epsilon and not rho:
        fail("give --epsilon (or --rho on a zCDP agreement)")
    with friendly_errors():
        targets = _accuracy(accuracy or [])
    with connect(target, token) as client, friendly_errors():
        request = client.sql_request(
            text,
            epsilon=epsilon or None,
            rho=rho or None,
            delta=delta or None,
            agreement_id=agreement,
            accuracy=targets,
        )
        if preview:
            plan = client.preview(request.message)
        else:
            response = client.run(request.message)
    if preview:
        if json_out:
            print_json(to_dict(plan.raw))
            return
        _print_reading(request)
        print_table(_plan_table(plan, _levels(request.message, plan)))
        _print_bounds(plan)
        return
    processed = post_process_response(request.sql, response.raw)
    if json_out:
        print_json(to_dict(processed))
        return
    release = response.release
    levels = _levels(request.message, release.plan)
    for result in processed.release.results:
        shown = _result_table(AggregateResult.from_proto(result), levels)
        shown.title = Text(f"{result.name}: {shown.title}")  # the SQL's alias first
        print_table(shown)
    _print_bounds(release.plan)
    measure = release.plan.measure.unit
    if response.replayed:
        line = (
            f"replayed release {release.release_id} (same query, same data): "
            f"nothing spent, remaining {measure} {response.remaining_epsilon}"
        )
    else:
        line = (
            f"release {release.release_id}: spent {measure} {release.epsilon_spent}, "
            f"remaining {response.remaining_epsilon}"
        )
    console.print(line, markup=False, highlight=False)


def _print_reading(request: SqlRequest) -> None:
    """How the SQL was read: agreement, aggregates, groupings, filters, post-processing."""
    console.print(Text("The SQL reads as:", style="bold"))
    for line in describe(request.sql, request.agreement):
        console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
