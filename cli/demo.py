"""`entremise demo`: the whole job on the embedded default, as separate parties would run it.

A hub process on SQLite; a bank and a consumer panel that pseudonymise locally and upload
through gRPC; an analyst who previews then runs private aggregates; a compliance officer who
reads the budget. Raw files and the partners' matching key live in a partner-side temp dir,
never in the hub's workdir. True values are computed partner-side from the raw files (the hub
never reveals them) so that each release can be shown beside the truth and its 95% interval.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from entremise.cli.hub_process import HubProcess
from entremise.partners.identity import PartnerKeys, create_key_files
from entremise.partners.synthetic import (
    AMOUNT_UPPER,
    BANK_SCHEMA,
    PANEL_SCHEMA,
    PURPOSE,
    generate,
)
from entremise.sdk import Cell, Client, RPCError
from entremise.sdk.query import aggregate, query, where_in
from entremise.sdk.sql import translate
from entremise.v1 import query_service_pb2

SIZES = {"small": (20_000, 8_000, 5_000), "default": (200_000, 50_000, 30_000)}
TOTAL_EPSILON = "4"
MAX_ROWS_PER_PERSON = 12
MAX_PRINTED_CELLS = 12
#: The demo's SQL question: every month of the panel's declared year is a public cell.
MONTHLY_SQL = (
    "SELECT bank.segment, DATE_TRUNC('month', panel.purchased_on) AS month, "
    "SUM(panel.amount) AS total_amount FROM bank JOIN panel GROUP BY 1, 2"
)


@dataclass
class DemoQuery:
    """A named query and how to compute its true (bounded) value from the raw files."""

    name: str
    description: str
    query: query_service_pb2.Query
    truth: Callable[[pd.DataFrame], dict[tuple[str, ...], float]]
    sql: str = ""  # when the analyst asked in SQL


@dataclass
class DemoReport:
    """What the demo prints as JSON."""

    workdir: str
    values: list[dict[str, Any]] = field(default_factory=list)
    refused: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    report: str | None = None


def consented_join(bank: pd.DataFrame, panel: pd.DataFrame) -> pd.DataFrame:
    """Partner-side ground truth: the same consented join the hub computes, on raw emails."""
    b = bank.assign(email=bank["email"].str.strip().str.lower())
    p = panel.assign(email=panel["email"].str.strip().str.lower())
    b = b[b["consent_analytics"]][["email", "segment"]]
    until = pd.to_datetime(p["consent_until"].replace("", None), utc=True)
    valid = until.isna() | (until > pd.Timestamp.now(tz="UTC"))  # expired consent is no consent
    p = p[p["consent_analytics"] & valid][["email", "week", "category", "amount", "purchased_on"]]
    # DATE_TRUNC('month', ...) as the hub labels it: the period's first day.
    p = p.assign(month=p["purchased_on"].str[:7] + "-01")
    joined = p.merge(b, on="email", how="inner")
    # The hub clamps to the public bounds and counts in cents: the truth of the bounded query.
    joined["amount"] = joined["amount"].clip(0.0, AMOUNT_UPPER).round(2)
    return joined


def _by(
    frame: pd.DataFrame, keys: list[str], fn: Callable[[pd.DataFrame], float]
) -> dict[tuple[str, ...], float]:
    if not keys:
        return {(): float(fn(frame))}
    out: dict[tuple[str, ...], float] = {}
    for k, group in frame.groupby(keys if len(keys) > 1 else keys[0]):
        out[(str(k),) if isinstance(k, str) else tuple(str(x) for x in k)] = float(fn(group))  # type: ignore[union-attr]
    return out


def demo_queries(agreement_id: str) -> list[DemoQuery]:
    """The analyst's questions (3.6 epsilon in all), one of them asked in SQL."""
    monthly = translate(MONTHLY_SQL)
    return [
        DemoQuery(
            "joined_people",
            "people in both files who consented in both",
            query(agreement_id, "0.1", [aggregate("count", name="people")]),
            lambda j: _by(j, [], lambda g: g["email"].nunique()),
        ),
        DemoQuery(
            "people_per_segment",
            "joined consenting people per bank segment",
            query(
                agreement_id, "0.2", [aggregate("count", name="people")], group_by=["bank.segment"]
            ),
            lambda j: _by(j, ["segment"], lambda g: g["email"].nunique()),
        ),
        DemoQuery(
            "mean_weekly_spend_affluent",
            "mean purchase amount per category, affluent clients",
            query(
                agreement_id,
                "0.6",
                [aggregate("mean", "panel.amount", name="mean_amount")],
                group_by=["panel.category"],
                filters=[where_in("bank.segment", "affluent")],
            ),
            lambda j: _by(
                j[j["segment"] == "affluent"], ["category"], lambda g: g["amount"].mean()
            ),
        ),
        DemoQuery(
            "spend_per_segment",
            "total purchases per bank segment",
            query(
                agreement_id,
                "0.3",
                [aggregate("sum", "panel.amount", name="total_amount")],
                group_by=["bank.segment"],
            ),
            lambda j: _by(j, ["segment"], lambda g: g["amount"].sum()),
        ),
        DemoQuery(
            "buyers_per_category",
            "joined people buying in each category",
            query(
                agreement_id,
                "0.4",
                [aggregate("count", name="people")],
                group_by=["panel.category"],
                max_groups_per_person=6,
            ),
            lambda j: _by(j, ["category"], lambda g: g["email"].nunique()),
        ),
        DemoQuery(
            "mean_spend_segment_category",
            "mean purchase amount per segment and category",
            query(
                agreement_id,
                "0.6",
                [aggregate("mean", "panel.amount", name="mean_amount")],
                group_by=["bank.segment", "panel.category"],
            ),
            lambda j: _by(j, ["segment", "category"], lambda g: g["amount"].mean()),
        ),
        DemoQuery(
            "weekly_spend_per_category",
            "total purchases per week and category",
            query(
                agreement_id,
                "0.5",
                [aggregate("sum", "panel.amount", name="total_amount")],
                group_by=["panel.week", "panel.category"],
            ),
            lambda j: _by(j, ["week", "category"], lambda g: g["amount"].sum()),
        ),
        DemoQuery(
            "monthly_spend_per_segment",
            "total purchases per month and bank segment, asked in SQL",
            monthly.message(agreement_id, epsilon="0.5"),
            lambda j: _by(j, ["segment", "month"], lambda g: g["amount"].sum()),
            MONTHLY_SQL,
        ),
        DemoQuery(
            "shoppers_per_week",
            "joined people with a purchase in each week",
            query(
                agreement_id,
                "0.4",
                [aggregate("count", name="people")],
                group_by=["panel.week"],
                max_groups_per_person=12,
            ),
            lambda j: _by(j, ["week"], lambda g: g["email"].nunique()),
        ),
    ]


def _cell_key(cell: Cell) -> tuple[str, ...]:
    return tuple(cell.group)


def run_demo(
    workdir: Path | None = None, *, quiet: bool = False, size: str = "default"
) -> dict[str, Any]:
    """Run the whole scenario and return the JSON report."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}")
    console = Console(quiet=quiet, stderr=False)
    keep = workdir is not None
    root = workdir.resolve() if workdir else Path(tempfile.mkdtemp(prefix="entremise-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    # Partner-side space: raw files and the matching key. Never inside the hub's workdir.
    partner_dir = Path(tempfile.mkdtemp(prefix="entremise-partners-"))
    report = DemoReport(workdir=str(root))
    admin_token = "ent_" + secrets.token_urlsafe(32)
    started = time.perf_counter()
    hub = HubProcess(root / "hub", admin_token)
    try:
        console.rule("[bold]Entremise demo")
        console.print(f"hub on SQLite at {hub.target} (workdir {root})")
        console.print(
            "demo layout: the hub's audit signing key and master keyring sit in its data dir "
            "(production: serve --keys-dir elsewhere)",
            markup=False,
        )
        with Client.connect(hub.target, token=admin_token) as admin:
            bank_p, bank_token = admin.create_principal("Banque Exemple", "partner")
            panel_p, panel_token = admin.create_principal("Panel Conso Exemple", "partner")
            analyst_p, analyst_token = admin.create_principal("Analyst", "analyst")
            _, officer_token = admin.create_principal("Compliance officer", "compliance")
            console.print(
                "registered partners [bold]bank[/] and [bold]panel[/], an analyst and "
                "a compliance officer"
            )
            agreement = admin.create_agreement(
                name="Bank x panel audience insights",
                purpose=PURPOSE,
                datasets=[(bank_p.principal_id, "bank"), (panel_p.principal_id, "panel")],
                analyst_ids=[analyst_p.principal_id],
                total_epsilon=TOTAL_EPSILON,
                max_rows_per_person=MAX_ROWS_PER_PERSON,
                max_groups_per_person=1,
            )
            console.print(
                f"agreement {agreement.agreement_id}: purpose '{PURPOSE}', "
                f"budget epsilon {TOTAL_EPSILON}, <= {MAX_ROWS_PER_PERSON} rows per person"
            )

        t = time.perf_counter()
        n_bank, n_panel, overlap = SIZES[size]
        data = generate(n_bank, n_panel, overlap)
        data.bank.to_csv(partner_dir / "bank_clients.csv", index=False)
        data.panel.to_csv(partner_dir / "panel_purchases.csv", index=False)
        report.timings_s["generate"] = round(time.perf_counter() - t, 3)

        t = time.perf_counter()
        partners = (
            ("bank", bank_token, BANK_SCHEMA, partner_dir / "bank_clients.csv"),
            ("panel", panel_token, PANEL_SCHEMA, partner_dir / "panel_purchases.csv"),
        )
        for who, token, _, _ in partners:
            # Each partner's X25519 key pair and Ed25519 identity stay partner-side; only the
            # public halves are sent, the X25519 key signed by the identity key.
            create_key_files(partner_dir / f"{who}.key")
            with Client.connect(hub.target, token=token) as partner:
                partner.publish_public_key(PartnerKeys.load(partner_dir / f"{who}.key"))
        # Before any upload the partners compare the agreement's safety code out of band (a
        # phone call); equal codes mean the hub served everyone the same identity keys. The
        # demo plays both partners, so it reads both screens and confirms on each side.
        codes = {}
        for who, token, _, _ in partners:
            with Client.connect(hub.target, token=token) as partner:
                codes[who] = partner.safety_code(
                    agreement.agreement_id, PartnerKeys.load(partner_dir / f"{who}.key")
                )
        if len(set(codes.values())) != 1:
            raise RuntimeError(f"the partners' safety codes differ: {codes}")
        console.print(f"safety code, the same on both partners' screens: {codes['bank']}")
        for who, token, schema, source in partners:
            keys = PartnerKeys.load(partner_dir / f"{who}.key")
            # Each partner witnesses the signed audit head after its upload, into its own
            # witness dir (partner-side too; a real partner's default: ~/.entremise/witness).
            with Client.connect(
                hub.target, token=token, witness_dir=partner_dir / f"{who}-witness"
            ) as partner:
                partner.confirm_keys(agreement.agreement_id, codes[who], keys)
                up = partner.upload_dataset(agreement.agreement_id, who, source, schema, keys=keys)
            dups = sum(d.duplicated_pseudonyms for d in up.dataset.duplicates)
            console.print(
                f"{who}: uploaded {up.dataset.row_count:,} rows "
                f"({up.dataset.distinct_keys:,} pseudonyms, {dups:,} on several rows, "
                f"{up.bytes_sent:,} bytes); not sent: {', '.join(up.dropped_columns) or '-'}"
            )
        report.timings_s["pseudonymise_and_upload"] = round(time.perf_counter() - t, 3)
        joined = consented_join(data.bank, data.panel)

        t = time.perf_counter()
        with Client.connect(
            hub.target, token=analyst_token, witness_dir=partner_dir / "analyst-witness"
        ) as analyst:
            for dq in demo_queries(agreement.agreement_id):
                plan = analyst.preview(dq.query)
                response = analyst.run(dq.query)
                if dq.sql:
                    console.print(f"[dim]$ entremise query sql {escape(repr(dq.sql))}[/]")
                truth = dq.truth(joined)
                table = Table(
                    "cell",
                    "released",
                    "true",
                    "95% +/-",
                    "within",
                    title=f"{dq.name}: {dq.description} (epsilon {plan.epsilon})",
                )
                for result in response.release.results:
                    for cell in result.cells:
                        key_ = _cell_key(cell)
                        released = cell.value
                        ci = cell.ci95_halfwidth
                        true_value = truth.get(key_, 0.0)
                        within = (
                            released is not None
                            and ci is not None
                            and abs(released - true_value) <= ci
                        )
                        label = "/".join(key_) or "all"
                        report.values.append(
                            {
                                "name": f"{dq.name}[{label}]" if key_ else dq.name,
                                "query": dq.name,
                                "group": list(key_),
                                "aggregate": result.name,
                                "epsilon": plan.epsilon,
                                "released": released,
                                "true_value": true_value,
                                "ci95_halfwidth": ci,
                                "within_ci95": within,
                            }
                        )
                        if table.row_count < MAX_PRINTED_CELLS:
                            table.add_row(
                                label,
                                _fmt(released),
                                _fmt(true_value),
                                _fmt(ci),
                                "[green]yes[/]" if within else "[red]no[/]",
                            )
                cells = [v for v in report.values if v["query"] == dq.name]
                if len(cells) > MAX_PRINTED_CELLS:
                    table.caption = (
                        f"... {len(cells) - MAX_PRINTED_CELLS} more cells; "
                        f"{sum(v['within_ci95'] for v in cells)}/{len(cells)} within"
                    )
                console.print(table)

            over = query(
                agreement.agreement_id,
                "1.0",
                [aggregate("count", name="people")],
                group_by=["panel.week"],
            )
            try:
                analyst.run(over)
                report.refused = {"name": "over_budget_query", "refused": False}
            except RPCError as exc:
                report.refused = {
                    "name": "over_budget_query",
                    "epsilon": "1.0",
                    "refused": True,
                    "status": exc.status.name,
                    "message": exc.message,
                }
                console.print(
                    f"[bold]over-budget query refused[/]: {exc.status.name}: {escape(exc.message)}"
                )
        report.timings_s["queries"] = round(time.perf_counter() - t, 3)

        with Client.connect(hub.target, token=officer_token) as officer:
            budget = officer.budgets(agreement.agreement_id)[0]
            releases = officer.ledger(agreement.agreement_id)
        report.budget = {
            "agreement_id": budget.agreement_id,
            "total": budget.total_epsilon,
            "spent": budget.spent_epsilon,
            "remaining": budget.remaining_epsilon,
            "releases": budget.release_count,
            "ledger_epsilon_sum": str(
                sum((Decimal(r.epsilon_spent) for r in releases), Decimal(0))
            ),
        }
        table = Table("agreement", "total", "spent", "remaining", "releases", title="budget report")
        table.add_row(
            budget.agreement_id,
            budget.total_epsilon,
            budget.spent_epsilon,
            budget.remaining_epsilon,
            str(budget.release_count),
        )
        console.print(table)
        if keep:
            from entremise.cli.report import build_report

            with Client.connect(hub.target, token=officer_token) as officer:
                files = build_report(officer, root / "report")
            report.report = str(files.html)
            console.print(f"compliance report: {files.html}", markup=False)
        covered = sum(v["within_ci95"] for v in report.values)
        console.print(
            f"{covered}/{len(report.values)} released values lie within their stated "
            "95% interval of the true value"
        )
    finally:
        hub.stop()
        shutil.rmtree(partner_dir, ignore_errors=True)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    report.timings_s["total"] = round(time.perf_counter() - started, 3)
    return {
        "workdir": report.workdir if keep else None,
        "queries": report.values,
        "refused_query": report.refused,
        "budget": report.budget,
        "coverage": {
            "within_ci95": sum(v["within_ci95"] for v in report.values),
            "released_values": len(report.values),
        },
        "timings_s": report.timings_s,
        "report": report.report,
    }


def _fmt(value: float | None) -> str:
    """Whole numbers (counts, and what the hub released as integers) without decimals."""
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"
