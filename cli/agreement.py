"""Agreement commands, for every party to one: propose, approve, suspend, revoke, read.

Admins and partners propose; partners approve, suspend and revoke; everyone lists and reads
the agreements they are party to.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Column, Table
from rich.text import Text

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
from entremise.cli.output import (
    console,
    err_console,
    id_column,
    measure_words,
    print_table,
    status_text,
    table,
    text_column,
    when,
    who,
)
from entremise.sdk import Agreement, Client, Principal, Role


def create_agreement(
    name: Annotated[str, typer.Option(help="Human-readable name.")],
    purpose: Annotated[str, typer.Option(help="Purpose every joined record must consent to.")],
    dataset: Annotated[
        list[str], typer.Option(help="PARTNER_ID:DATASET_NAME slot (repeat: at least two).")
    ],
    analyst: Annotated[list[str], typer.Option(help="Analyst principal id (repeat).")],
    epsilon: Annotated[
        str, typer.Option(help="Total budget: epsilon, or rho with --measure zcdp.")
    ],
    max_rows: Annotated[int, typer.Option(help="Default max joined rows per person.")] = 10,
    max_groups: Annotated[
        int,
        typer.Option(
            help="Default max group cells per person; 0 (auto): every cell of a query's "
            "public grouping, up to --max-rows, so no count is cut."
        ),
    ] = 0,
    measure: Annotated[str, typer.Option(help="pure (epsilon) or zcdp (rho).")] = "pure",
    delta: Annotated[str, typer.Option(help="Delta budget for key discovery.")] = "",
    analyst_budget: Annotated[str, typer.Option(help="Cap per analyst (default: total).")] = "",
    expires_at: Annotated[str, typer.Option(help="ISO 8601 expiry (default: none).")] = "",
    allow_column: Annotated[
        list[str] | None, typer.Option(help="dataset.column analysts may use (repeat).")
    ] = None,
    allow_aggregation: Annotated[
        list[str] | None, typer.Option(help="Aggregation kind allowed (repeat).")
    ] = None,
    min_group_size: Annotated[int, typer.Option(help="Suppress smaller noisy groups.")] = 0,
    shared_identifiers: Annotated[
        int,
        typer.Option(
            help="DP holds for every person up to this many of whose identifiers other people's "
            "records also carry (a shared phone, a placeholder); noise grows with it."
        ),
    ] = 1,
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Propose an agreement (admin, or a partner in it); active once every partner approved.

    With --quiet, prints only the agreement's id, for scripts:

    \b
    AG=$(entremise agreement create --name ... --quiet)
    """  # noqa: D301 (\b: click keeps the next line as written)
    quiet_or_json(quiet, json_out)
    if not 1 <= max_rows <= 1000:
        fail(f"--max-rows {max_rows}: each person's rows after the join, from 1 to 1000")
    if max_groups < 0:
        fail(f"--max-groups {max_groups}: group cells per person, 0 (auto) or more")
    if not 1 <= shared_identifiers <= 64:
        fail(f"--shared-identifiers {shared_identifiers}: from 1 to 64")
    _warn_questionable_budget(epsilon, measure)
    with connect(target, token) as client, friendly_errors():
        slots = []
        for text in dataset:
            partner_id, _, dataset_name = text.partition(":")
            if not partner_id or not dataset_name:
                fail(f"--dataset {text!r}: expected PARTNER_ID:DATASET_NAME")
            slots.append((partner_id, dataset_name))
        agreement = client.create_agreement(
            name=name,
            purpose=purpose,
            datasets=slots,
            analyst_ids=analyst,
            total_epsilon=epsilon,
            max_rows_per_person=max_rows,
            max_groups_per_person=max_groups,
            budget_kind=measure,
            total_delta=delta,
            analyst_budget=analyst_budget,
            expires_at=expires_at,
            allowed_columns=allow_column or [],
            allowed_aggregations=allow_aggregation or [],
            min_group_size=min_group_size,
            max_shared_identifiers=shared_identifiers,
        )
    if json_out:
        print_json(to_dict(agreement.raw))
    elif quiet:
        sys.stdout.write(f"{agreement.agreement_id}\n")
    else:
        console.print(
            f"agreement [bold]{agreement.agreement_id}[/] created ({agreement.status.word}), "
            f"budget {agreement.measure.unit} {escape(epsilon)}; protects each person "
            f"sharing up to {agreement.max_shared_identifiers} identifier(s) with others"
        )


def _warn_questionable_budget(total: str, measure: str) -> None:
    """Warn (stderr) about a budget that protects nobody in practice; the hub accepts it."""
    try:
        value = float(total)
    except ValueError:
        return  # the hub refuses it with its own message
    limit, name = (1.0, "rho") if measure == "zcdp" else (10.0, "epsilon")
    if value > limit:
        err_console.print(
            f"warning: a total {name} of {total} gives little protection (an epsilon of 10 "
            "already lets a release be e^10 = 22,000 times likelier with a person than "
            "without); budgets are usually 0.1 to 5",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


def _lifecycle(action: str, agreement_id: str, target: str, token: str, json_out: bool) -> None:
    with connect(target, token) as client, friendly_errors():
        call = {
            "approve": client.approve_agreement,
            "suspend": client.suspend_agreement,
            "revoke": client.revoke_agreement,
        }[action]
        agreement = call(agreement_id)
    if json_out:
        print_json(to_dict(agreement.raw))
    else:
        console.print(f"agreement {agreement.agreement_id}: {agreement.status.word}", markup=False)


def approve_agreement(
    agreement_id: str,
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """Approve an agreement as one of its partners (uploading into it also approves)."""
    _lifecycle("approve", agreement_id, target, token, json_out)


def suspend_agreement(
    agreement_id: str,
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """Suspend an agreement (every partner must approve again to resume it)."""
    _lifecycle("suspend", agreement_id, target, token, json_out)


def revoke_agreement(
    agreement_id: str,
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """Revoke an agreement for good."""
    _lifecycle("revoke", agreement_id, target, token, json_out)


def list_agreements(
    target: TargetOption = DEFAULT_TARGET, token: TokenOption = "", json_out: JsonOption = False
) -> None:
    """Agreements you are party to, with their status and budgets."""
    with connect(target, token) as client, friendly_errors():
        agreements = client.list_agreements()
    if json_out:
        print_json([to_dict(a.raw) for a in agreements])
        return
    out = table(
        id_column("agreement"),
        text_column("name"),
        text_column("status"),
        text_column("purpose"),
        text_column("datasets"),
        text_column("budget left"),
    )
    for a in agreements:
        out.add_row(
            a.agreement_id,
            Text(a.name),
            status_text(a.status),
            Text(a.purpose),
            Text("\n".join(f"{d.name}: {d.dataset_id or 'not uploaded'}" for d in a.datasets)),
            Text(f"{a.measure.unit} {a.budget.remaining_epsilon} of {a.budget.total_epsilon}"),
        )
    print_table(out)


NamesOption = Annotated[
    Path | None,
    typer.Option(
        envvar="ENTREMISE_NAMES",
        help="JSON object {principal id: name} (or ENTREMISE_NAMES), for names the audit log "
        "does not hold or the caller may not read (partners and analysts see their own name).",
        show_default=False,
    ),
]


def _known_names(client: Client, me: Principal, names: Path | None) -> dict[str, str]:
    """Principal names: a --names file, the caller's own, and the audit log's.

    Admins, compliance officers and partners may read the log (a partner, and an officer
    scoped to one, the entries of its own view), which records each principal's name when it
    is created; analysts see their own name and those of the file.
    """
    from entremise.cli.report import Names, read_names

    known = Names(read_names(names) if names else {})
    known.names.setdefault(me.principal_id, me.name)
    if me.role in (Role.ADMIN, Role.COMPLIANCE, Role.PARTNER):
        known.learn(client.audit_events())
    return known.names


def _agreement_fields(a: Agreement, names: dict[str, str]) -> list[tuple[str, Text]]:
    """The agreement as (field, value) lines a person can read."""
    b = a.budget
    measure = a.measure.unit
    status = status_text(a.status)
    word = a.status.word
    waiting = [p for p in dict.fromkeys(d.partner_id for d in a.datasets) if p not in a.approved_by]
    if word == "proposed" and waiting:
        status.append(" - waiting for approval by " + ", ".join(who(p, names) for p in waiting))
    elif word == "suspended":
        status.append(" - every partner must approve again before any query")
    elif word in ("revoked", "expired"):
        status.append(" - no query can run any more")
    slots = []
    for d in a.datasets:
        uploaded = f"dataset {d.dataset_id}" if d.dataset_id else "not uploaded yet"
        slots.append(f"{d.name} from {who(d.partner_id, names)}: {uploaded}")
    spent = [
        f"{who(x.analyst_id, names)}: {x.spent} spent of {x.cap} ({x.remaining} left)"
        for x in b.analysts
    ]
    delta = (
        f"{b.total_delta} for discovering group keys of text columns, {b.spent_delta or '0'} spent"
        if a.total_delta not in ("", "0")
        else "none (text columns cannot be grouped by)"
    )
    groups = a.max_groups_per_person
    fields = [
        ("name", Text(a.name)),
        ("id", Text(a.agreement_id)),
        ("status", status),
        ("approved by", Text(", ".join(who(p, names) for p in a.approved_by) or "nobody yet")),
        ("proposed by", Text(f"{who(a.proposer_id, names)} on {when(a.created_at)}")),
        ("purpose", Text(a.purpose)),
        ("datasets", Text("\n".join(slots) or "-")),
        ("analysts", Text("\n".join(who(x, names) for x in a.analyst_ids) or "-")),
        ("measure", Text(measure_words(a.measure))),
        (
            "budget",
            Text(
                f"{measure} {b.total_epsilon} in total, {b.spent_epsilon} spent, "
                f"{b.remaining_epsilon} remaining; {b.release_count:,} release(s)"
            ),
        ),
        (
            "per analyst",
            Text(
                "\n".join(
                    [
                        f"each may spend up to {a.analyst_budget}"
                        if a.analyst_budget
                        else "no cap beyond the total",
                        *spent,
                    ]
                )
            ),
        ),
        ("delta", Text(delta)),
        ("max rows per person", Text(f"{a.max_rows_per_person:,} joined rows")),
        (
            "max groups per person",
            Text(
                f"{groups:,}"
                if groups
                else "auto: every cell of the query's public grouping, up to max rows"
            ),
        ),
        (
            "shared identifiers",
            Text(
                f"{a.max_shared_identifiers}: privacy holds for each person up to "
                f"{a.max_shared_identifiers} of whose identifiers other people's records also "
                "carry"
            ),
        ),
        (
            "columns",
            Text(", ".join(a.allowed_columns) or "all declared columns"),
        ),
        ("aggregations", Text(", ".join(a.allowed_aggregations) or "all")),
        (
            "min group size",
            Text(
                f"groups whose noisy count of people is under {a.min_group_size:,} are suppressed"
                if a.min_group_size
                else "none (no group is suppressed)"
            ),
        ),
        ("expires", Text(when(a.expires_at) if a.expires_at else "never")),
    ]
    return fields


def show_agreement(
    agreement_id: str,
    names: NamesOption = None,
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """One agreement: status, parties, datasets, budget, bounds, scope and expiry."""
    with connect(target, token) as client, friendly_errors():
        agreement = client.get_agreement(agreement_id)
        if json_out:
            print_json(to_dict(agreement.raw))
            return
        known = _known_names(client, client.whoami(), names)
    out = Table(
        Column("field", no_wrap=True, style="bold"),
        text_column("value"),
        show_header=False,
        title=Text(f"agreement {agreement.name}", style="bold"),
        title_justify="left",
    )
    for field, value in _agreement_fields(agreement, known):
        out.add_row(field, value)
    print_table(out)
