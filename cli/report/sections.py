"""The report's sections, each a list of blocks built from facts read over the API."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from entremise.cli.report.audit_check import AuditCheck
from entremise.cli.report.document import (
    Badge,
    Block,
    Bullets,
    Callout,
    Cell,
    Code,
    Heading,
    Image,
    Para,
    Rich,
    Strong,
    Table,
)
from entremise.cli.report.names import Names
from entremise.cli.report.words import (
    REFUSAL_REASONS,
    STATUS,
    STATUS_TONE,
    _dec,
    _plural,
    _symbol,
    _technical,
    _what,
    _when,
    accuracy_in_words,
)
from entremise.sdk import (
    Agreement,
    AuditEvent,
    Budget,
    ConsentCoverage,
    Dataset,
    Measure,
    Principal,
    Release,
)
from entremise.v1 import common_pb2

# -- the report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportFiles:
    """Where the report was written, and the audit status it states."""

    markdown: Path
    html: Path
    plot_png: Path
    plot_svg: Path
    audit: AuditCheck | None = None


@dataclass
class _Facts:
    """Everything the report states, read once from the hub."""

    me: Principal
    scoped: bool
    names_given: int
    all_agreements: dict[str, Agreement]
    agreements: list[Agreement]
    datasets: dict[str, Dataset]
    budgets: dict[str, Budget]
    coverage: list[ConsentCoverage]
    ledger: dict[str, list[Release]]
    events: list[AuditEvent]
    audit: AuditCheck
    names: Names
    now: datetime

    @property
    def refusals(self) -> list[AuditEvent]:
        """Refused queries and failed releases of the agreements in scope."""
        wanted = {a.agreement_id for a in self.agreements}
        return [
            e
            for e in self.events
            if e.kind in ("release_refused", "release_failed") and e.subject_id in wanted
        ]

    def agreement(self, agreement_id: str) -> Rich:
        """An agreement as "Name (id)"."""
        a = self.all_agreements.get(agreement_id)
        return (a.name, " (", Code(agreement_id), ")") if a is not None else (Code(agreement_id),)

    def audit_line(self) -> Callout:
        """The audit status, stated plainly."""
        a = self.audit
        signatures = (
            "and every entry's Ed25519 signature against the hub's public key"
            if a.signatures_checked
            else "(signatures not checked: no hub audit public key was given)"
        )
        broken = f" {a.reason}; the entries before it are intact." if not a.intact else ""
        if a.gaps:
            broken += (
                f" This view leaves out other partners' entries: the links across its {a.gaps} "
                "gap(s) cannot be checked, nor that no entry concerning it was withheld."
            )
        return Callout(
            (
                Strong(f"Audit log: {a.headline}."),
                f" {a.entries} of {len(self.events)} entries checked: sequence numbers, links "
                f"between entries and entry hashes {signatures}.{broken}",
            ),
            "ok" if a.intact else "bad",
        )


def _budget_words(b: Budget) -> Cell:
    symbol = _symbol(b.measure)
    total, spent = _dec(b.total_epsilon), _dec(b.spent_epsilon)
    share = f" ({spent / total:.0%})" if total else ""
    lines: Cell = [
        (
            f"{symbol} {b.total_epsilon} in total; {b.spent_epsilon} spent{share}, "
            f"{b.remaining_epsilon} left",
        )
    ]
    if b.implied_epsilon:
        zcdp = b.measure is Measure.ZCDP and b.conversion_delta
        lines.append(
            (
                "spent so far as one guarantee: ",
                Strong(f"(ε = {b.implied_epsilon}, δ = {b.implied_delta or '0'})"),
                f"-DP{f', converting ρ at δ = {b.conversion_delta}' if zcdp else ''}",
            )
        )
    if _dec(b.total_delta):
        lines.append((f"δ for key discovery: {b.spent_delta} of {b.total_delta} spent",))
    return lines


def _relation(a: Agreement) -> str:
    ids = _plural(a.max_shared_identifiers or 1, "identifier")
    return (
        f"one person, including someone who shares up to {ids} (a phone, an email) with "
        "other people's records"
    )


def _status(a: Agreement) -> Badge:
    status = STATUS.get(a.status, "unknown")
    return Badge(status, STATUS_TONE.get(status, "muted"))


def _status_note(f: _Facts, a: Agreement) -> Cell:
    status = STATUS.get(a.status, "unknown")
    lines: Cell = [(_status(a),)]
    if status == "proposed":
        waiting = sorted({s.partner_id for s in a.datasets} - set(a.approved_by))
        lines.append(("waiting for approval by ", *f.names.join(waiting)))
    elif status == "suspended":
        lines.append(("no query runs until every partner approves again",))
    elif status == "revoked":
        lines.append(("ended for good: no query runs on it any more",))
    elif status == "expired":
        lines.append((f"expired at {_when(a.expires_at)}: queries are refused",))
    changes = [
        e for e in f.events if e.kind == f"agreement_{status}" and e.subject_id == a.agreement_id
    ]
    if changes and status in ("suspended", "revoked"):
        last = changes[-1]
        lines.append((f"{status} at {_when(last.created_at)} by ", *f.names.rich(last.actor_id)))
    return lines


def _summary(f: _Facts) -> list[Block]:
    statuses = Counter(STATUS.get(a.status, "unknown") for a in f.agreements)
    releases = [r for rs in f.ledger.values() for r in rs]
    failed = sum(1 for r in releases if r.status == "failed")
    refused = sum(1 for e in f.refusals if e.kind == "release_refused")
    names = (
        f"{_plural(f.names_given, 'principal')} named, from the audit log (which records each "
        "principal's name at creation) and any names supplied; others appear by id and role."
    )
    return [
        Heading(2, "Summary"),
        f.audit_line(),
        Bullets(
            [
                (
                    f"{_plural(len(f.agreements), 'agreement')}: "
                    + ", ".join(f"{c} {s}" for s, c in sorted(statuses.items()))
                    + ".",
                ),
                (
                    f"{_plural(len(releases) - failed, 'release')}, {failed} failed after being "
                    f"charged; {_plural(refused, 'refused query', 'refused queries')} (refused "
                    "before any data was read, nothing spent).",
                ),
                (f"Names: {names}",),
            ]
        ),
    ]


def _agreements(f: _Facts) -> list[Block]:
    rows: list[list[Cell]] = [
        [
            [(a.name,), (Code(a.agreement_id),)],
            _status_note(f, a),
            [(Code(a.purpose),)],
            [f.names.rich(p) for p in sorted({s.partner_id for s in a.datasets})],
            [f.names.rich(x) for x in a.analyst_ids],
            [(_relation(a),)],
            _budget_words(f.budgets[a.agreement_id]) if a.agreement_id in f.budgets else [],
            [(_when(a.expires_at) if a.expires_at else "no expiry",)],
        ]
        for a in f.agreements
    ]
    header = ["Agreement", "Status", "Purpose", "Partners", "Analysts"]
    header += ["Protects (privacy unit)", "Budget", "Expires"]
    return [Heading(2, "Agreements"), Table(header, rows)]


def _budget(f: _Facts) -> list[Block]:
    rows: list[list[Cell]] = []
    for a in f.agreements:
        b = f.budgets.get(a.agreement_id)
        if b is None:
            continue
        analysts: Cell = [
            (*f.names.rich(x.analyst_id), f": {x.spent} spent of {x.cap} ({x.remaining} left)")
            for x in b.analysts
        ]
        rows.append(
            [
                [(a.name,), (Code(a.agreement_id),)],
                [("zCDP (ρ)" if b.measure is Measure.ZCDP else "pure DP (ε)",)],
                [(b.total_epsilon,)],
                [(b.spent_epsilon,)],
                [(b.remaining_epsilon,)],
                [(f"ε = {b.implied_epsilon or '-'}, δ = {b.implied_delta or '0'}",)],
                [(str(b.release_count),)],
                analysts,
            ]
        )
    header = ["Agreement", "Measure", "Total", "Spent", "Remaining", "Spent as (ε, δ)-DP"]
    header += ["Releases", "Per analyst"]
    return [
        Heading(2, "Budget consumption over time"),
        Image("budget.png", "budget.svg", "privacy budget consumed over time"),
        Para(
            (
                "Solid lines: budget spent so far; dashed: the agreement's total; dotted: each "
                "analyst's share when there are several; crosses: refused queries.",
            )
        ),
        Table(header, rows),
    ]


def _releases(f: _Facts) -> list[Block]:
    rows: list[list[Cell]] = []
    for a in f.agreements:
        for r in f.ledger.get(a.agreement_id, ()):
            aggs = r.plan.aggregates
            by = f" by {', '.join(r.plan.group_by)}" if r.plan.group_by else ""
            bounding = r.plan.bounding
            status = r.status or "released"
            rows.append(
                [
                    [(_when(r.created_at),), (Code(r.release_id),)],
                    [f.agreement(a.agreement_id)],
                    [f.names.rich(r.analyst_id)],
                    [(f"{_symbol(a.measure)} {r.epsilon_spent}",)],
                    [(f"{x.name}: {_what(x)}{by}",) for x in aggs],
                    [(f"{x.name}: {accuracy_in_words(x, r)}",) for x in aggs],
                    [
                        *((_technical(x, _symbol(a.measure)),) for x in aggs),
                        (
                            f"at most {bounding.max_rows_per_person} rows and "
                            f"{bounding.max_groups_per_person} groups per person; data versions "
                            + ", ".join(str(v) for v in r.data_versions),
                        ),
                    ],
                    [(Badge(status, "ok" if status == "released" else "bad"),)],
                ]
            )
    if not rows:
        return [Heading(2, "Releases"), Para(("No release yet.",))]
    header = ["When", "Agreement", "Analyst", "Cost", "What was released"]
    header += ["Accuracy, in plain words", "Technical details", "Status"]
    return [Heading(2, "Releases"), Table(header, rows)]


def _refusal_row(f: _Facts, e: AuditEvent) -> list[Cell]:
    detail = json.loads(e.detail_json)
    agreement = f.all_agreements.get(e.subject_id)
    symbol = _symbol(agreement.measure) if agreement is not None else "ε"
    if e.kind == "release_failed":
        release_id = str(detail.get("release_id", ""))
        outcome = Badge("failed", "bad")
        why: Rich = (
            "the computation failed after the budget was charged; nothing was released (",
            Code(release_id),
            ")",
        )
        charged = [r for r in f.ledger.get(e.subject_id, ()) if r.release_id == release_id]
        cost = f"{symbol} {charged[0].epsilon_spent} charged" if charged else "-"
    else:
        outcome = Badge("refused", "warn")
        reason = str(detail.get("reason", ""))
        extra = str(detail.get("detail", ""))
        why = (REFUSAL_REASONS.get(reason, reason or "refused") + (f": {extra}" if extra else ""),)
        asked = str(detail.get("epsilon", ""))
        symbol = "ρ" if detail.get("measure") == "rho" else symbol
        cost = f"{symbol} {asked} asked, nothing spent" if asked else "nothing spent"
    return [
        [(_when(e.created_at),)],
        [f.names.rich(e.actor_id)],
        [f.agreement(e.subject_id)],
        [(outcome,)],
        [why],
        [(cost,)],
    ]


def _refusals(f: _Facts) -> list[Block]:
    rows = [_refusal_row(f, e) for e in f.refusals]
    header = ["When", "Analyst", "Agreement", "Outcome", "Why, in plain words", "Budget"]
    return [
        Heading(2, "Refused and failed queries"),
        Table(header, rows)
        if rows
        else Para(("None: no query was refused and no release failed.",)),
    ]


def _audit(f: _Facts) -> list[Block]:
    kinds = Counter(e.kind for e in f.events)
    latest = {e.kind: e.created_at for e in f.events}
    return [
        Heading(2, "Audit log"),
        f.audit_line(),
        Para(
            (
                "Every state change, release and refusal is an entry holding the hash of the "
                "previous one, signed by the hub. Entries cut off the end show only against the "
                "hub's signed head file: ",
                Code("entremise audit verify --data-dir DIR"),
                " on the hub checks that too.",
            )
        ),
        Table(
            ["Event", "Entries", "Latest"],
            [
                [[(Code(kind),)], [(str(count),)], [(_when(latest[kind]),)]]
                for kind, count in sorted(kinds.items())
            ],
        ),
    ]


def _coverage(f: _Facts) -> list[Block]:
    rows: list[list[Cell]] = [
        [
            [f.agreement(c.agreement_id)],
            [(c.dataset_name,)],
            [f.names.rich(c.partner_id)],
            [(Code(c.purpose),)],
            [(str(c.rows),)],
            [
                (
                    f"{c.consenting_rows}"
                    + (f" ({c.consenting_rows / c.rows:.0%})" if c.rows else ""),
                )
            ],
            [(str(c.expired_rows),)],
            [(str(c.withdrawn_people),)],
        ]
        for c in f.coverage
    ]
    header = ["Agreement", "Dataset", "Partner", "Purpose", "Rows", "Consenting", "Expired"]
    return [Heading(2, "Consent coverage"), Table([*header, "People withdrawn"], rows)]


def _record(f: _Facts, a: Agreement) -> list[Block]:
    n = f.names
    partners = sorted({s.partner_id for s in a.datasets})
    approved = n.join(list(a.approved_by)) if a.approved_by else ("nobody yet",)
    expiry = _when(a.expires_at) if a.expires_at else "no expiry set"
    items: list[Rich] = [
        (
            Strong("Joint controllers:"),
            " ",
            *n.join(partners),
            " (proposed by ",
            *n.rich(a.proposer_id),
            ", approved by ",
            *approved,
            "); the hub acts as trusted third party.",
        ),
        (Strong("Status:"), " ", _status(a)),
        (Strong("Purpose:"), " ", Code(a.purpose), "; only records whose consent covers it."),
        (
            Strong("Legal basis:"),
            " consent (GDPR Art. 6(1)(a)), per record and per purpose, withdrawable through the "
            "partner at any time.",
        ),
        (
            Strong("Recipients:"),
            " analysts ",
            *n.join(list(a.analyst_ids)),
            ", who receive only differentially private aggregates (budget "
            f"{_symbol(a.measure)} {a.total_epsilon}; privacy unit: {_relation(a)}).",
        ),
        (
            Strong("Retention:"),
            f" until the agreement is revoked or expires ({expiry}); erasure on request, with "
            "crypto-shredding.",
        ),
        (
            Strong("Security:"),
            " keyed pseudonymisation by the partners (the hub cannot compute pseudonyms), "
            "AES-256-GCM encryption at rest, hash-chained signed audit log, per-principal "
            "tokens and roles.",
        ),
        (Strong("Transfers outside the EU:"), " none by the hub."),
    ]
    rows: list[list[Cell]] = []
    for slot in a.datasets:
        dataset = f.datasets.get(slot.dataset_id)
        if dataset is None:
            # Uploaded by another partner: outside this partner's view (its schema included).
            state = "another partner's dataset" if slot.dataset_id else "not uploaded yet"
            rows.append([[(slot.name,)], [n.rich(slot.partner_id)], [(state,)]])
            rows[-1] += [[], []]
            continue
        keys = ", ".join(
            f"{k.column} ({common_pb2.IdentifierKind.Name(k.kind)[16:].lower()})"
            for k in dataset.schema.keys
        )
        rows.append(
            [
                [(slot.name,)],
                [n.rich(slot.partner_id)],
                [(f"{keys}, pseudonymised",)],
                [(", ".join(c.name for c in dataset.schema.columns),)],
                [(", ".join(c.purpose for c in dataset.schema.consents),)],
            ]
        )
    header = ["Dataset", "Partner", "Identifiers", "Attributes", "Consent recorded for"]
    return [
        Heading(3, a.name),
        Bullets([(Strong("Agreement:"), " ", *f.agreement(a.agreement_id)), *items]),
        Para((Strong("Categories of data:"),)),
        Table(header, rows),
    ]
