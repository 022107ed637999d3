"""The analyst's commands: preview a query's cost and accuracy for free, then run it.

Both commands take the same options (`QueryOptions`), in the SDK's query mini-language
(`entremise.sdk.query`): `--agg KIND[:COLUMN][@EPSILON|~TARGET]`, `--where COLUMN=A,B`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from entremise.cli._common import (
    DEFAULT_TARGET,
    JsonOption,
    TargetOption,
    TokenOption,
    connect,
    friendly_errors,
    print_json,
    to_dict,
)
from entremise.cli.output import (
    approx,
    console,
    decimal_number,
    is_whole,
    number,
    number_column,
    print_table,
    table,
    text_column,
    whole,
)
from entremise.sdk import AggregateKind, AggregatePlan, AggregateResult, QueryPlan
from entremise.sdk.query import Query, QuerySyntaxError
from entremise.v1 import query_service_pb2

# -- words -------------------------------------------------------------------------------------

_AGG_WORDS = {
    AggregateKind.COUNT: "count of people",
    AggregateKind.COUNT_ROWS: "count of joined rows",
    AggregateKind.SUM: "sum",
    AggregateKind.MEAN: "mean",
    AggregateKind.VARIANCE: "variance",
    AggregateKind.STDDEV: "standard deviation",
}
_WHOLE_KINDS = (AggregateKind.COUNT, AggregateKind.COUNT_ROWS)
#: Averages and order statistics keep their decimals even when a released value is whole (a
#: mean clamped to its lower bound 0 is "0.00", like its neighbours, not "0").
_DECIMAL_KINDS = (
    AggregateKind.MEAN,
    AggregateKind.VARIANCE,
    AggregateKind.STDDEV,
    AggregateKind.QUANTILE,
)


def _level(msg: query_service_pb2.Aggregate) -> float | None:
    """The level of a quantile aggregate (None for other kinds)."""
    if msg.kind != query_service_pb2.AGGREGATE_KIND_QUANTILE:
        return None
    try:
        return float(msg.quantile) if msg.quantile else 0.5
    except ValueError:
        return None


def _agg_words(kind: AggregateKind, level: float | None) -> str:
    """What an aggregate computes: "median", "quantile 0.9", "mean", "count of people"."""
    if kind is AggregateKind.QUANTILE:
        level = 0.5 if level is None else level
        return "median" if level == 0.5 else f"quantile {level:g}"
    return _AGG_WORDS.get(kind, f"aggregate_kind_{kind.name.lower()}")


def _levels(q: query_service_pb2.Query, plan: QueryPlan) -> dict[str, float | None]:
    """Quantile levels by the names the hub gave the query's aggregates.

    The hub keeps the aggregates' order and echoes their names, not their levels.
    """
    return {
        given.name: _level(asked)
        for asked, given in zip(q.aggregates, plan.aggregates, strict=False)
    }


def _title(
    name: str,
    kind: AggregateKind,
    column: str,
    levels: dict[str, float | None],
) -> str:
    """Title of an aggregate: median of panel.amount, quantile 0.9 of ..., count of people."""
    words = _agg_words(kind, levels.get(name))
    return f"{words} of {column}" if column else words


def _plan_table(plan: QueryPlan, levels: dict[str, float | None]) -> Table:
    measure = plan.measure.unit
    out = table(
        text_column("aggregate"),
        text_column(measure),
        text_column("mechanism"),
        number_column("sensitivity"),
        number_column("noise scale"),
        number_column("95% +/-"),
        title=f"{measure} {plan.epsilon} over {whole(plan.cell_count)} cell(s); "
        f"budget {plan.remaining_epsilon_before} -> {plan.remaining_epsilon_after}",
    )
    for a in plan.aggregates:
        out.add_row(
            Text(_title(a.name, a.kind, a.column, levels)),
            Text(a.epsilon),
            Text(a.mechanism.replace("_", " ")),
            approx(a.sensitivity),
            approx(a.noise_scale),
            planned_halfwidth(a),
        )
    return out


#: The row count at which a mean's (or variance's) half-width bound is shown before release.
SHOWN_ROWS = 1000


def planned_halfwidth(a: AggregatePlan) -> str:
    """The 95% half-width before release: exact, or (ratios) its bound at SHOWN_ROWS rows."""
    if a.ci95_halfwidth is not None:
        return approx(a.ci95_halfwidth)
    at = dict(a.ci95_at_rows)
    if SHOWN_ROWS in at:
        return f"<= {approx(at[SHOWN_ROWS])} at {SHOWN_ROWS:,} rows"
    return "after release"


def _print_bounds(plan: QueryPlan) -> None:
    """The contribution bounds, and every note on where they can cut an answer (yellow)."""
    b = plan.bounding
    groups = "1 group" if b.max_groups_per_person == 1 else f"{b.max_groups_per_person:,} groups"
    console.print(
        f"Per person: at most {b.max_rows_per_person:,} joined rows, counted in at most {groups}; "
        f"privacy unit: {plan.privacy_unit}",
        markup=False,
        highlight=False,
    )
    if not plan.bounds_notes:
        console.print(
            "Bounds: no answer in this query can be cut by the contribution bounds.",
            markup=False,
            highlight=False,
        )
        return
    console.print(Text("Bounds:", style="bold yellow"))
    notes = Table.grid(padding=(0, 1))
    notes.add_column(no_wrap=True)
    notes.add_column(overflow="fold")
    for note in plan.bounds_notes:
        notes.add_row(Text("-", style="yellow"), Text(note, style="yellow"))
    console.print(notes)


# -- the commands ------------------------------------------------------------------------------

AgreementArg = Annotated[str, typer.Option("--agreement", help="Agreement id.")]
EpsilonOpt = Annotated[str, typer.Option(help="Total epsilon of the query, split over aggregates.")]
RhoOpt = Annotated[str, typer.Option(help="Total rho of the query (zCDP agreements).")]
DeltaOpt = Annotated[str, typer.Option(help="Delta for discovering keys of a text column.")]
QuantileOpt = Annotated[float, typer.Option(help="Quantile for quantile aggregates.")]
AggOpt = Annotated[
    list[str],
    typer.Option(
        "--agg",
        help="KIND[:COLUMN][@EPSILON|~TARGET]; KIND is count (people), count_rows, sum, mean, "
        "variance, quantile or median; ~TARGET asks for a 95% half-width. Repeat.",
    ),
]
GroupOpt = Annotated[
    list[str] | None, typer.Option("--group-by", help="Public categorical column. Repeat.")
]
WhereOpt = Annotated[
    list[str] | None,
    typer.Option("--where", help="COLUMN=A,B | COLUMN!=A | COLUMN>=N | COLUMN<=N. Repeat (AND)."),
]
MaxRowsOpt = Annotated[
    int, typer.Option(help="Max joined rows per person (0 = agreement default).")
]
MaxGroupsOpt = Annotated[
    int, typer.Option(help="Max group cells per person (0 = agreement default).")
]


@dataclass(frozen=True)
class QueryOptions:
    """What `query preview` and `query run` are given: a query, and the hub to send it to."""

    agreement: str
    aggregates: list[str]
    epsilon: str
    rho: str
    delta: str
    quantile: float
    group_by: list[str]
    where: list[str]
    max_rows: int
    max_groups: int
    target: str
    token: str
    json_out: bool

    def query(self) -> query_service_pb2.Query:
        """The query message; ValueError names the malformed option."""
        if not 0 < self.quantile < 1:
            raise ValueError(f"--quantile {self.quantile:g}: a level between 0 and 1, e.g. 0.9")
        q = Query(
            self.agreement,
            epsilon=self.epsilon,
            rho=self.rho,
            delta=self.delta,
            max_rows_per_person=self.max_rows,
            max_groups_per_person=self.max_groups,
        )
        try:
            for text in self.aggregates:
                q = q.aggregate(text, quantile=self.quantile)
        except QuerySyntaxError as exc:
            raise ValueError(f"--agg {exc}") from None
        q = q.group_by(*self.group_by)
        try:
            for text in self.where:
                q = q.filter(text)
        except QuerySyntaxError as exc:
            raise ValueError(f"--where {exc}") from None
        return q.build()


def query_command(action: Callable[[QueryOptions], None]) -> Callable[..., None]:
    """A command with the query options, handing them to `action` as one `QueryOptions`."""

    def command(
        agreement: AgreementArg,
        agg: AggOpt,
        epsilon: EpsilonOpt = "",
        rho: RhoOpt = "",
        delta: DeltaOpt = "",
        quantile: QuantileOpt = 0.5,
        group_by: GroupOpt = None,
        where: WhereOpt = None,
        max_rows: MaxRowsOpt = 0,
        max_groups: MaxGroupsOpt = 0,
        target: TargetOption = DEFAULT_TARGET,
        token: TokenOption = "",
        json_out: JsonOption = False,
    ) -> None:
        action(
            QueryOptions(
                agreement,
                agg,
                epsilon,
                rho,
                delta,
                quantile,
                group_by or [],
                where or [],
                max_rows,
                max_groups,
                target,
                token,
                json_out,
            )
        )

    command.__name__ = action.__name__
    command.__qualname__ = action.__qualname__
    command.__doc__ = action.__doc__  # the command's help
    return command


@query_command
def preview(options: QueryOptions) -> None:
    """Show cost, noise scale and 95% interval of a query without spending anything."""
    with friendly_errors():
        q = options.query()
    with connect(options.target, options.token) as client, friendly_errors():
        plan = client.preview(q)
    if options.json_out:
        print_json(to_dict(plan.raw))
        return
    print_table(_plan_table(plan, _levels(q, plan)))
    _print_bounds(plan)


@query_command
def run(options: QueryOptions) -> None:
    """Spend budget and release the differentially private answer."""
    with friendly_errors():
        q = options.query()
    with connect(options.target, options.token) as client, friendly_errors():
        response = client.run(q)
    if options.json_out:
        print_json(to_dict(response.raw))
        return
    release = response.release
    levels = _levels(q, release.plan)
    for result in release.results:
        print_table(_result_table(result, levels))
    _print_bounds(release.plan)
    measure = release.plan.measure.unit
    if response.replayed:
        console.print(
            f"replayed release {release.release_id} (same query, same data): "
            f"nothing spent, remaining {measure} {response.remaining_epsilon}",
            markup=False,
            highlight=False,
        )
        return
    console.print(
        f"release {release.release_id}: spent {measure} {release.epsilon_spent}, "
        f"remaining {response.remaining_epsilon}",
        markup=False,
        highlight=False,
    )


def _result_table(result: AggregateResult, levels: dict[str, float | None]) -> Table:
    """One released aggregate: a row per group; counts (and all-whole sums) as 1,851."""
    values = [c.value for c in result.cells if c.value is not None]
    whole_values = result.kind in _WHOLE_KINDS or (
        result.kind not in _DECIMAL_KINDS and all(is_whole(v) for v in values)
    )
    out = table(
        text_column("group"),
        number_column("released"),
        number_column("95% +/-"),
        title=_title(result.name, result.kind, result.column, levels),
    )
    for cell in result.cells:
        if cell.value is None:
            value = "n/a"
        else:
            value = whole(cell.value) if whole_values else decimal_number(cell.value)
        ci = "n/a" if cell.ci95_halfwidth is None else number(cell.ci95_halfwidth)
        out.add_row(Text(" / ".join(cell.group) or "(all)"), value, ci)
    return out
