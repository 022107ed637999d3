"""The compliance officer's commands: budgets, the ledger of releases, the audit log, a report.

A partner, and an officer scoped to a partner (its DPO), run the same commands on its own
view. `audit verify` needs no hub: it reads the hub's data dir and database offline, through
`entremise.server.operations`; `compliance verify` checks an exported view offline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from entremise.cli._common import (
    DEFAULT_TARGET,
    JsonOption,
    KeysDirOption,
    TargetOption,
    TokenOption,
    connect,
    fail,
    friendly_errors,
    print_json,
    to_dict,
)
from entremise.cli.output import (
    console,
    id_column,
    number_column,
    print_table,
    status_text,
    table,
    text_column,
    when,
    whole,
)
from entremise.sdk import Agreement, Budget, Measure


def budget_show(
    agreement: Annotated[
        str, typer.Option("--agreement", help="Agreement id (default: all).")
    ] = "",
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """Budget per agreement (total, spent, remaining), its status, and what spent implies.

    zCDP budgets count rho; what was spent is also stated as one (epsilon, delta)-DP guarantee
    (OpenDP's conversion at the hub's conversion delta, plus any key-discovery delta).
    """
    with connect(target, token) as client, friendly_errors():
        budgets = client.budgets(agreement)
        agreements = {a.agreement_id: a for a in client.list_agreements()}
    if json_out:
        print_json([_budget_json(b, agreements.get(b.agreement_id)) for b in budgets])
        return
    out = table(
        id_column("agreement"),
        text_column("name"),
        text_column("status"),
        text_column("measure"),
        number_column("total"),
        number_column("spent"),
        number_column("remaining"),
        number_column("releases"),
        text_column("spent as (epsilon, delta)"),
        title="privacy budgets",
    )
    for b in budgets:
        a = agreements.get(b.agreement_id)
        out.add_row(
            b.agreement_id,
            Text(a.name if a else "?"),
            status_text(a.status) if a else Text("unknown"),
            "rho (zCDP)" if b.measure is Measure.ZCDP else "epsilon",
            b.total_epsilon,
            b.spent_epsilon,
            b.remaining_epsilon,
            whole(b.release_count),
            f"({b.implied_epsilon}, {b.implied_delta})",
        )
    print_table(out)


def _budget_json(b: Budget, a: Agreement | None) -> dict[str, Any]:
    """A budget's JSON, with its agreement's name and status ("active", "revoked", ...)."""
    return {
        "agreement_id": b.agreement_id,
        "name": a.name if a else "",
        "status": a.status.word if a else "unknown",
        **{k: v for k, v in to_dict(b.raw).items() if k != "agreement_id"},
    }


def ledger_list(
    agreement: Annotated[
        str, typer.Option("--agreement", help="Agreement id (default: all).")
    ] = "",
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """Every release with its cost, bounds and data versions."""
    with connect(target, token) as client, friendly_errors():
        releases = client.ledger(agreement)
    if json_out:
        print_json([to_dict(r.raw) for r in releases])
        return
    out = table(
        id_column("release"),
        id_column("agreement / analyst"),
        text_column("spent"),
        text_column("aggregates"),
        text_column("bounds per person"),
        title="ledger",
    )
    for r in releases:
        measure = r.plan.measure.unit
        status = r.status or "released"  # failed and running releases keep their cost
        release = Text(r.release_id)
        release.append(f"\n{status}", style="" if status == "released" else "red")
        release.append(f"\n{when(r.created_at)}")
        bounding = r.plan.bounding
        groups = bounding.max_groups_per_person
        out.add_row(
            release,
            f"{r.agreement_id}\n{r.analyst_id}",
            Text(f"{measure} {r.epsilon_spent}"),
            Text("\n".join(f"{a.name} ({a.epsilon})" for a in r.plan.aggregates)),
            Text(
                f"{bounding.max_rows_per_person:,} rows, {groups:,} "
                f"{'group' if groups == 1 else 'groups'}, {bounding.shared_identifiers} shared "
                f"identifier{'' if bounding.shared_identifiers == 1 else 's'}"
            ),
        )
    print_table(out)


def report(
    out: Annotated[Path, typer.Option(help="Directory for report.md/.html and budget plots.")],
    agreement: Annotated[str, typer.Option(help="One agreement (default: all).")] = "",
    names: Annotated[
        Path | None,
        typer.Option(
            help="JSON object {principal id: name}: the hub's API gives no other principal's name."
        ),
    ] = None,
    audit_key: Annotated[
        Path | None,
        typer.Option(help="The hub's audit public key (audit_signing.pub): verify signatures."),
    ] = None,
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """Compliance report: audit status, agreements, budget over time, releases, refusals.

    Run with a partner's token, or a scoped officer's, it covers that partner's view only and
    says so in its heading.
    """
    from entremise.cli.report import build_report, read_names

    with connect(target, token) as client, friendly_errors():
        directory = read_names(names) if names else None
        files = build_report(client, out, agreement, names=directory, audit_key=audit_key)
    if json_out:
        print_json(
            {
                "markdown": str(files.markdown),
                "html": str(files.html),
                "plot_png": str(files.plot_png),
                "plot_svg": str(files.plot_svg),
                "audit": files.audit.headline if files.audit else None,
            }
        )
    else:
        console.print(
            f"report written: {files.html} (and {files.markdown.name}, "
            f"{files.plot_png.name}, {files.plot_svg.name}); audit log "
            f"{files.audit.headline if files.audit else 'not checked'}",
            markup=False,
        )


def audit_list(
    target: TargetOption = DEFAULT_TARGET, token: TokenOption = "", json_out: JsonOption = False
) -> None:
    """Audit events (state changes and releases, with counts only)."""
    with connect(target, token) as client, friendly_errors():
        events = client.audit_events()
    if json_out:
        print_json([to_dict(e.raw) for e in events])
        return
    out = table(
        number_column("seq"),
        text_column("event"),
        id_column("actor"),
        id_column("subject"),
        text_column("detail"),
        title="audit log",
    )
    for e in events:
        out.add_row(
            str(e.seq),
            Text(f"{e.kind.replace('_', ' ')}\n{when(e.created_at)}"),
            e.actor_id or "-",
            e.subject_id or "-",
            Text(_detail(e.detail_json)),
        )
    print_table(out)


def _detail(detail_json: str) -> str:
    """An audit event's detail as "key: value" lines (the JSON as given if it is not an object)."""
    try:
        detail = json.loads(detail_json) if detail_json else {}
    except json.JSONDecodeError:
        return detail_json
    if not isinstance(detail, dict):
        return detail_json
    return "\n".join(
        f"{k}: {v if isinstance(v, str) else json.dumps(v)}" for k, v in detail.items()
    )


def audit_verify(
    data_dir: Annotated[Path, typer.Option(help="The hub's data dir (public key, head file).")],
    db: Annotated[str, typer.Option(help="SQLAlchemy URL (default: SQLite in the data dir).")] = "",
    keys_dir: KeysDirOption = None,
    witness: Annotated[
        list[Path] | None,
        typer.Option(
            help="A head witnessed by a partner's or officer's client (its witness JSON file); "
            "repeatable. Catches a history rewritten and re-signed with the hub's own key.",
        ),
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Recompute the audit chain offline; report the first tampered entry (exit 1 if any).

    Without --witness this cannot tell a log rewritten and re-signed by whoever holds the
    hub's signing key; each --witness file pins an entry the hub cannot change unnoticed.
    """
    from entremise.server.operations import verify_audit_log

    with friendly_errors():
        result = verify_audit_log(data_dir, db, keys_dir=keys_dir, witnesses=witness or [])
    if json_out:
        print_json(
            {
                "ok": result.ok,
                "checked": result.checked,
                "first_bad_seq": result.first_bad_seq,
                "reason": result.reason,
            }
        )
    elif result.ok:
        checked = f" and {len(witness)} witnessed heads" if witness else ""
        console.print(f"audit log intact: {result.checked} entries{checked} verified")
    if not result.ok:
        fail(f"audit log tampered at entry {result.first_bad_seq}: {result.reason}")


def export(
    out: Annotated[Path, typer.Option(help="Directory for the JSON files (created if needed).")],
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    json_out: JsonOption = False,
) -> None:
    """Save your compliance view as JSON files, to check offline with `compliance verify`.

    Agreements, budgets, the ledger of releases, consent coverage, the audit entries and the
    hub's audit public key, with the time of export. A partner (or an officer scoped to one)
    gets its own view; admins and hub-wide officers the whole hub.
    """
    from entremise.sdk.view import export_view

    with connect(target, token) as client, friendly_errors():
        directory = export_view(client, out)
    view = json.loads((directory / "view.json").read_text())
    if json_out:
        print_json({"directory": str(directory), **view})
        return
    counts = view["counts"]
    whose = f"the view of partner {view['view_of']}" if view["view_of"] else "the whole hub"
    console.print(
        f"exported {whose} to {directory}: {counts['agreements']} agreements, "
        f"{counts['releases']} releases, {counts['audit_entries']} audit entries",
        markup=False,
    )


def verify(
    directory: Annotated[Path, typer.Argument(help="A directory written by `compliance export`.")],
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            help="The hub's audit public key obtained out of band (PEM, as audit_signing.pub, "
            "or 64 hex digits); default: the key the hub served with the export.",
        ),
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Check an exported view offline: hashes, signatures, links, ledger against audit entries.

    Prints one line per problem (exit 1 if any), then what a partial view cannot prove.
    """
    from entremise.sdk.view import read_public_key, verify_view

    with friendly_errors():
        key = read_public_key(public_key) if public_key is not None else None
        result = verify_view(directory, key)
    if json_out:
        print_json(result.to_json())
        if not result.ok:
            raise typer.Exit(1)
        return
    for problem in result.problems:
        console.print(f"problem: {problem.line()}", markup=False, soft_wrap=True)
    verdict = "no problem found" if result.ok else f"{len(result.problems)} problem(s)"
    console.print(
        f"{verdict}: {result.entries} audit entries and {result.releases} releases checked; "
        f"public key {result.key_source}",
        markup=False,
        soft_wrap=True,
    )
    for note in result.cannot_prove:
        console.print(f"cannot prove: {note}", markup=False, soft_wrap=True)
    if not result.ok:
        raise typer.Exit(1)


def audit_witness(
    target: TargetOption = DEFAULT_TARGET,
    token: TokenOption = "",
    witness_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="ENTREMISE_WITNESS_DIR",
            help="Where witnessed heads and the witness key are kept (default: "
            "~/.entremise/witness).",
        ),
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Witness the hub's signed audit head: check it against the last one, countersign, save.

    Exit 1 if the hub's history changed since the head witnessed last, or its audit key did.
    The saved file (printed) is what `entremise audit verify --witness FILE` checks.
    """
    from entremise.sdk import WitnessError
    from entremise.sdk.witness import default_witness_dir, witness_file

    directory = witness_dir or default_witness_dir()
    with connect(target, token) as client, friendly_errors():
        client.witness_dir = directory
        try:
            head = client.witness_head()
        except WitnessError as exc:
            fail(exc.message)
    path = witness_file(directory, target)
    if json_out:
        print_json({**head.to_json(), "file": str(path)})
    else:
        console.print(
            f"witnessed audit head: entry {head.seq} ({head.hash[:16]}...) saved in {path}",
            markup=False,
        )
