"""Compliance report as Markdown and HTML a person can open, built from the compliance API.

It holds budget consumption over time (plot and table), releases with their parameters,
consent coverage per partner and purpose, and a GDPR Art. 30 style record of processing.
"""

from __future__ import annotations

import html
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server
import matplotlib.pyplot as plt

from entremise.partners.client import Client
from entremise.v1 import agreement_service_pb2, common_pb2

STATUS = {
    v: k.removeprefix("AGREEMENT_STATUS_").lower()
    for k, v in agreement_service_pb2.AgreementStatus.items()
}


@dataclass(frozen=True)
class ReportFiles:
    """Where the report was written."""

    markdown: Path
    html: Path
    plot_png: Path
    plot_svg: Path


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _plot(
    client: Client, agreements: list[agreement_service_pb2.Agreement], png: Path, svg: Path
) -> None:
    """Cumulative budget spent per agreement and per analyst, release after release."""
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    for agreement in agreements:
        releases = client.ledger(agreement.agreement_id)
        if not releases:
            continue
        measure = "rho" if agreement.budget_kind == common_pb2.BUDGET_KIND_ZCDP else "epsilon"
        spent = Decimal(0)
        per_analyst: dict[str, Decimal] = defaultdict(Decimal)
        totals = [0.0]
        series: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([0], [0.0]))
        for number, release in enumerate(releases, start=1):
            spent += Decimal(release.epsilon_spent)
            per_analyst[release.analyst_id] += Decimal(release.epsilon_spent)
            totals.append(float(spent))
            series[release.analyst_id][0].append(number)
            series[release.analyst_id][1].append(float(per_analyst[release.analyst_id]))
        line = ax.step(
            range(len(totals)),
            totals,
            where="post",
            linewidth=2,
            label=f"{agreement.name} ({measure}, all analysts)",
        )[0]
        ax.axhline(
            float(Decimal(agreement.total_epsilon)),
            color=line.get_color(),
            linestyle="--",
            linewidth=1,
        )
        if len(series) > 1:
            for analyst, (numbers, values) in series.items():
                ax.step(
                    numbers,
                    values,
                    where="post",
                    linewidth=1,
                    alpha=0.7,
                    label=f"{agreement.name}: {analyst}",
                )
    ax.set_title("Privacy budget consumed (dashed: agreement total)")
    ax.set_ylabel("budget spent")
    ax.set_xlabel("release number (commit order; times in the releases table)")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(png)
    fig.savefig(svg)
    plt.close(fig)


def build_report(client: Client, out_dir: Path, agreement_id: str = "") -> ReportFiles:
    """Write report.md, report.html, budget.png and budget.svg into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    agreements = [
        a for a in client.list_agreements() if not agreement_id or a.agreement_id == agreement_id
    ]
    datasets = {d.dataset_id: d for d in client.list_datasets()}
    budgets = {b.agreement_id: b for b in client.budgets()}
    coverage = client.consent_coverage(agreement_id)
    png, svg = out_dir / "budget.png", out_dir / "budget.svg"
    _plot(client, agreements, png, svg)

    now = datetime.now().astimezone().replace(microsecond=0).isoformat()
    parts = [
        f"# Entremise compliance report\n\nGenerated {now}. Every figure below comes from "
        "the hub's compliance API; the audit log can be checked offline with "
        "`entremise audit verify`.\n"
    ]
    parts.append("## Budget consumption\n\n![budget consumed over time](budget.png)\n")
    rows = []
    for a in agreements:
        b = budgets[a.agreement_id]
        measure = "rho (zCDP)" if b.kind == common_pb2.BUDGET_KIND_ZCDP else "epsilon (pure DP)"
        analysts = "; ".join(f"{x.analyst_id}: {x.spent}/{x.cap}" for x in b.analysts) or "-"
        rows.append(
            [
                a.agreement_id,
                a.name,
                STATUS[a.status],
                measure,
                b.total_epsilon,
                b.spent_epsilon,
                b.remaining_epsilon,
                f"{b.spent_delta}/{b.total_delta}",
                str(b.release_count),
                analysts,
            ]
        )
    parts.append(
        _table(
            [
                "agreement",
                "name",
                "status",
                "measure",
                "total",
                "spent",
                "remaining",
                "delta spent/total",
                "releases",
                "per analyst (spent/cap)",
            ],
            rows,
        )
        + "\n"
    )

    parts.append("## Releases\n")
    rows = []
    for a in agreements:
        for r in client.ledger(a.agreement_id):
            aggs = ", ".join(
                f"{x.name}[{x.mechanism}, scale {x.noise_scale:.3g}, {x.epsilon}]"
                for x in r.plan.aggregates
            )
            bounds = (
                f"{r.plan.bounding.max_rows_per_person} rows, "
                f"{r.plan.bounding.max_groups_per_person} groups/person"
            )
            rows.append(
                [
                    r.created_at,
                    r.release_id,
                    a.agreement_id,
                    r.analyst_id,
                    r.epsilon_spent,
                    aggs,
                    ", ".join(r.plan.group_by) or "-",
                    bounds,
                    ", ".join(str(v) for v in r.data_versions),
                ]
            )
    parts.append(
        _table(
            [
                "at",
                "release",
                "agreement",
                "analyst",
                "spent",
                "aggregates",
                "group by",
                "contribution bounds",
                "data versions",
            ],
            rows,
        )
        + "\n"
    )

    parts.append("## Consent coverage\n")
    parts.append(
        _table(
            [
                "agreement",
                "dataset",
                "partner",
                "purpose",
                "rows",
                "consenting",
                "expired",
                "people withdrawn",
            ],
            [
                [
                    c.agreement_id,
                    c.dataset_name,
                    c.partner_id,
                    c.purpose,
                    str(c.rows),
                    str(c.consenting_rows),
                    str(c.expired_rows),
                    str(c.withdrawn_people),
                ]
                for c in coverage
            ],
        )
        + "\n"
    )

    parts.append("## Record of processing (GDPR Art. 30)\n")
    for a in agreements:
        slots = [d for d in a.datasets]
        categories = []
        for slot in slots:
            dataset = datasets.get(slot.dataset_id)
            if dataset is None:
                categories.append(f"- {slot.name} ({slot.partner_id}): not uploaded yet")
                continue
            keys = ", ".join(
                f"{k.column} ({common_pb2.IdentifierKind.Name(k.kind)[16:].lower()}, pseudonymised)"
                for k in dataset.schema.keys
            )
            attrs = ", ".join(c.name for c in dataset.schema.columns)
            purposes = ", ".join(c.purpose for c in dataset.schema.consents)
            categories.append(
                f"- {slot.name} ({slot.partner_id}): identifiers {keys}; "
                f"attributes {attrs}; consent recorded for {purposes}"
            )
        parts.append(
            f"### {a.name} (`{a.agreement_id}`)\n\n"
            f"- **Joint controllers**: {', '.join(sorted({d.partner_id for d in slots}))} "
            f"(proposed by {a.proposer_id or '-'}, approved by "
            f"{', '.join(a.approved_by) or 'nobody yet'}); the hub acts as trusted third party.\n"
            f"- **Purpose**: `{a.purpose}`; only records whose consent covers it are joined.\n"
            f"- **Legal basis**: consent (GDPR Art. 6(1)(a)), per record and per purpose, "
            "withdrawable through the partner at any time.\n"
            f"- **Categories of data**:\n" + "\n".join(f"  {c}" for c in categories) + "\n"
            f"- **Recipients**: analysts {', '.join(a.analyst_ids)}, who receive only "
            f"differentially private aggregates (budget {a.total_epsilon}).\n"
            f"- **Retention**: until the agreement is revoked or expires "
            f"({a.expires_at or 'no expiry set'}); erasure on request, with crypto-shredding.\n"
            "- **Security**: keyed pseudonymisation by the partners (the hub cannot compute "
            "pseudonyms), AES-256-GCM encryption at rest, hash-chained signed audit log, "
            "per-principal tokens and roles.\n"
            "- **Transfers outside the EU**: none by the hub.\n"
        )

    markdown = "\n".join(parts)
    md_path = out_dir / "report.md"
    md_path.write_text(markdown)
    html_path = out_dir / "report.html"
    html_path.write_text(_html(markdown))
    return ReportFiles(md_path, html_path, png, svg)


def _html(markdown: str) -> str:
    """A small Markdown subset (headings, lists, tables, images) to standalone HTML."""
    body: list[str] = []
    table: list[list[str]] = []

    def flush() -> None:
        if not table:
            return
        head, rows = table[0], table[2:]
        body.append(
            "<table><thead><tr>"
            + "".join(f"<th>{c}</th>" for c in head)
            + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
            + "</tbody></table>"
        )
        table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(
                [html.escape(c.strip().replace("\\|", "|")) for c in line.strip("|").split(" | ")]
            )
            continue
        flush()
        text = html.escape(line)
        if line.startswith("### "):
            body.append(f"<h3>{text[4:]}</h3>")
        elif line.startswith("## "):
            body.append(f"<h2>{text[3:]}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{text[2:]}</h1>")
        elif line.startswith("!["):
            body.append('<img src="budget.svg" alt="budget consumed over time" width="900">')
        elif line.lstrip().startswith("- "):
            body.append(f"<li>{text.lstrip()[2:].replace('**', '')}</li>")
        elif line.strip():
            body.append(f"<p>{text}</p>")
    flush()
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:12px;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 6px;text-align:left}"
        "th{background:#f0f0f0}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Entremise compliance "
        f"report</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )
