"""Compliance report a person can read: Markdown and HTML built from the compliance API.

It states whether the audit log it received is intact, each agreement's status, privacy
relation and budget, the budget consumed over time (plot and table), every release with its
accuracy in plain words, refused and failed queries, consent coverage, and a GDPR Art. 30
style record of processing.

Principals appear by name beside their id wherever a name is known: the caller's own
(WhoAmI), those the audit log recorded when each principal was created, and any `names` given;
without one, a principal is shown by id and by the role the audit log recorded.

The HTML is generated from the same document blocks as the Markdown, not converted from it,
so no Markdown syntax can leak into what a browser shows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from entremise.cli.report.audit_check import AuditCheck, check_audit
from entremise.cli.report.document import Block, Heading, Para, to_html, to_markdown
from entremise.cli.report.figure import budget_figure, save_figure
from entremise.cli.report.names import Names, read_names
from entremise.cli.report.sections import (
    ReportFiles,
    _agreements,
    _audit,
    _budget,
    _coverage,
    _Facts,
    _record,
    _refusals,
    _releases,
    _summary,
)
from entremise.cli.report.words import ROLE_NAMES, _when
from entremise.sdk import (
    AuditEvent,
    Client,
    Release,
)
from entremise.server.domain.audit import load_public_key


def _read(
    client: Client,
    agreement_id: str,
    names: Mapping[str, str] | None,
    audit_key: Path | None,
    now: datetime,
) -> _Facts:
    me = client.whoami()
    all_agreements = {a.agreement_id: a for a in client.list_agreements()}
    ledger: dict[str, list[Release]] = defaultdict(list)
    for release in client.ledger(agreement_id):
        ledger[release.agreement_id].append(release)
    events = client.audit_events()
    view_of = me.view_of
    directory = Names(dict(names or {}))
    directory.names.setdefault(me.principal_id, me.name)
    directory.roles[me.principal_id] = ROLE_NAMES.get(me.role, "")
    directory.learn(events)
    return _Facts(
        me=me,
        scoped=bool(agreement_id),
        names_given=len(directory.names),
        all_agreements=all_agreements,
        agreements=[
            a for aid, a in all_agreements.items() if not agreement_id or aid == agreement_id
        ],
        datasets={d.dataset_id: d for d in client.list_datasets()},
        budgets={b.agreement_id: b for b in client.budgets()},
        coverage=client.consent_coverage(agreement_id),
        ledger=ledger,
        events=events,
        audit=check_audit(
            events, load_public_key(audit_key) if audit_key else None, partial=bool(view_of)
        ),
        names=directory,
        now=now,
    )


def build_report(
    client: Client,
    out_dir: Path,
    agreement_id: str = "",
    *,
    names: Mapping[str, str] | None = None,
    audit_key: Path | None = None,
) -> ReportFiles:
    """Write report.md, report.html, budget.png and budget.svg into `out_dir`.

    `names` maps principal ids to names (the hub's API gives none but the caller's own);
    `audit_key` is the hub's audit public key (audit_signing.pub in its data dir): with it the
    report verifies every entry's signature, without it the hash chain only.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    f = _read(client, agreement_id, names, audit_key, datetime.now(UTC).replace(microsecond=0))
    refused: dict[str, list[AuditEvent]] = defaultdict(list)
    for e in f.refusals:
        if e.kind == "release_refused":
            refused[e.subject_id].append(e)
    png, svg = out_dir / "budget.png", out_dir / "budget.svg"
    save_figure(budget_figure(f.agreements, f.ledger, refused, f.names, f.now), png, svg)

    view_of = f.me.view_of
    if view_of:
        scope = "one of its agreements" if f.scoped else "every agreement it is party to"
        title = f"Entremise compliance report: the view of {f.names.text(view_of)}"
        whose: list[Block] = [
            Heading(1, title),
            Para(
                (
                    "This is the view of the partner ",
                    *f.names.rich(view_of),
                    f", covering {scope}: their budgets and releases, the audit entries "
                    "that concern its data, and consent coverage of its own datasets. Other "
                    "partners' datasets, consent and withdrawals are not part of it.",
                )
            ),
        ]
    else:
        scope = "one agreement" if f.scoped else "every agreement"
        title = "Entremise compliance report"
        whose = [Heading(1, title)]
    blocks: list[Block] = [
        *whose,
        Para(
            (
                f"Generated {_when(f.now.isoformat())} for ",
                *f.names.rich(f.me.principal_id),
                f", from the hub's compliance API, covering {scope}.",
            )
        ),
        *_summary(f),
        *_agreements(f),
        *_budget(f),
        *_releases(f),
        *_refusals(f),
        *_audit(f),
        *_coverage(f),
        Heading(2, "Record of processing (GDPR Art. 30)"),
    ]
    for a in f.agreements:
        blocks += _record(f, a)

    md_path = out_dir / "report.md"
    md_path.write_text(to_markdown(blocks))
    html_path = out_dir / "report.html"
    html_path.write_text(to_html(blocks, title))
    return ReportFiles(md_path, html_path, png, svg, f.audit)


__all__ = [
    "AuditCheck",
    "Names",
    "ReportFiles",
    "budget_figure",
    "build_report",
    "check_audit",
    "read_names",
    "to_html",
    "to_markdown",
]
