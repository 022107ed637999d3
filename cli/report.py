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

import bisect
import html
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server
import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from matplotlib.figure import Figure as MplFigure

from entremise.sdk import (
    AggregateKind,
    AggregatePlan,
    Agreement,
    AgreementStatus,
    AuditEvent,
    Budget,
    Client,
    ConsentCoverage,
    Dataset,
    Measure,
    Principal,
    Release,
    Role,
)
from entremise.server.domain.audit import GENESIS, entry_hash, load_public_key
from entremise.v1 import common_pb2

STATUS = {status: status.name.lower() for status in AgreementStatus}
STATUS_TONE = {
    "active": "ok",
    "proposed": "info",
    "suspended": "warn",
    "revoked": "bad",
    "expired": "muted",
}
ROLE_NAMES = {
    Role.ADMIN: "admin",
    Role.PARTNER: "partner",
    Role.ANALYST: "analyst",
    Role.COMPLIANCE: "compliance officer",
}
MECHANISMS = {
    "discrete_laplace": "discrete Laplace noise",
    "discrete_gaussian": "discrete Gaussian noise",
    "report_noisy_min": "report-noisy-min selection",
}
ROLES_IN_AUDIT = {"compliance": "compliance officer"}
REFUSAL_REASONS = {
    "budget_exhausted": "not enough budget left: the agreement's or the analyst's remaining "
    "budget was smaller than what the query asked",
    "outside_agreement_scope": "outside the agreement's scope",
}


# -- document blocks, rendered to Markdown and to HTML -----------------------------------------


@dataclass(frozen=True)
class Code:
    """An identifier or a technical name (monospace)."""

    text: str


@dataclass(frozen=True)
class Strong:
    """Emphasised text."""

    text: str


@dataclass(frozen=True)
class Badge:
    """A status word, coloured by `tone` in HTML (ok, info, warn, bad, muted)."""

    text: str
    tone: str


Inline = str | Code | Strong | Badge
Rich = tuple[Inline, ...]
Cell = list[Rich]  # one or more lines


@dataclass(frozen=True)
class Heading:
    """A section title."""

    level: int
    text: str


@dataclass(frozen=True)
class Para:
    """A paragraph."""

    content: Rich


@dataclass(frozen=True)
class Callout:
    """A statement that must not be missed (the audit status)."""

    content: Rich
    tone: str


@dataclass(frozen=True)
class Bullets:
    """A list."""

    items: list[Rich]


@dataclass(frozen=True)
class Table:
    """A table whose cells may hold several lines."""

    header: list[str]
    rows: list[list[Cell]]


@dataclass(frozen=True)
class Image:
    """The budget plot: PNG for Markdown viewers, SVG in the HTML."""

    markdown_src: str
    html_src: str
    alt: str


Block = Heading | Para | Callout | Bullets | Table | Image

_MD_ALWAYS = re.compile(r"([\\`*\[\]<>|])")
_MD_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def _md_inline(part: Inline) -> str:
    if isinstance(part, Code):
        fence = "``" if "`" in part.text else "`"
        return f"{fence}{part.text.replace('|', '&#124;')}{fence}"
    text = part if isinstance(part, str) else part.text
    text = _MD_UNDERSCORE.sub(r"\\_", _MD_ALWAYS.sub(r"\\\1", text))
    return text if isinstance(part, str) else f"**{text}**"


def _md(content: Rich) -> str:
    return "".join(_md_inline(p) for p in content)


def to_markdown(blocks: Sequence[Block]) -> str:
    """The report as GitHub-flavoured Markdown."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append("#" * block.level + " " + _md((block.text,)))
        elif isinstance(block, Para):
            out.append(_md(block.content))
        elif isinstance(block, Callout):
            out.append("> " + _md(block.content))
        elif isinstance(block, Bullets):
            out.append("\n".join("- " + _md(item) for item in block.items))
        elif isinstance(block, Table):
            lines = ["| " + " | ".join(_md((h,)) for h in block.header) + " |"]
            lines.append("|" + "---|" * len(block.header))
            for row in block.rows:
                cells = ["; ".join(_md(line) for line in cell) or "-" for cell in row]
                lines.append("| " + " | ".join(cells) + " |")
            out.append("\n".join(lines))
        else:
            out.append(f"![{_md((block.alt,))}]({block.markdown_src})")
    return "\n\n".join(out) + "\n"


def _html_inline(part: Inline) -> str:
    if isinstance(part, str):
        return html.escape(part)
    text = html.escape(part.text)
    if isinstance(part, Code):
        return f"<code>{text}</code>"
    if isinstance(part, Strong):
        return f"<strong>{text}</strong>"
    return f'<span class="badge {part.tone}">{text}</span>'


def _html(content: Rich) -> str:
    return "".join(_html_inline(p) for p in content)


STYLE = """
body{font-family:"DejaVu Sans","Liberation Sans",Arial,sans-serif;max-width:1400px;
  margin:2em auto;padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}
h2{font-size:1.3em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{font-size:1.1em;margin-top:1.4em}
table{border-collapse:collapse;font-size:13px;margin:.8em 0;width:100%}
td,th{border:1px solid #ccc;padding:5px 7px;text-align:left;vertical-align:top}
th{background:#f0f0f2}
tr:nth-child(even) td{background:#fafafb}
code{font-family:"DejaVu Sans Mono",monospace;font-size:.86em;color:#555;
  overflow-wrap:anywhere}
.badge{display:inline-block;padding:0 .45em;border-radius:.6em;font-weight:bold;
  font-size:.92em}
.badge.ok{background:#dcf3e0;color:#17602a}
.badge.info{background:#dde9fb;color:#1d4f91}
.badge.warn{background:#fdecc8;color:#7a4b00}
.badge.bad{background:#fbdcdc;color:#8d1c1c}
.badge.muted{background:#e8e8ea;color:#444}
.callout{padding:.7em 1em;border-radius:6px;border-left:6px solid}
.callout.ok{background:#eef9f0;border-color:#2e9b4a}
.callout.bad{background:#fdeeee;border-color:#c62828}
.callout.warn{background:#fff6e0;border-color:#d89400}
img{max-width:100%;height:auto;border:1px solid #eee}
"""


def to_html(blocks: Sequence[Block], title: str) -> str:
    """The report as one standalone HTML page (the plot is referenced next to it)."""
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            body.append(f"<p>{_html(block.content)}</p>")
        elif isinstance(block, Callout):
            body.append(f'<p class="callout {block.tone}">{_html(block.content)}</p>')
        elif isinstance(block, Bullets):
            items = "".join(f"<li>{_html(item)}</li>" for item in block.items)
            body.append(f"<ul>{items}</ul>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
            rows = "".join(
                "<tr>"
                + "".join(
                    "<td>" + ("<br>".join(_html(line) for line in cell) or "-") + "</td>"
                    for cell in row
                )
                + "</tr>"
                for row in block.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        else:
            body.append(
                f'<figure><img src="{html.escape(block.html_src)}" '
                f'alt="{html.escape(block.alt)}"></figure>'
            )
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


# -- audit log verification ----------------------------------------------------------------------


@dataclass(frozen=True)
class AuditCheck:
    """What the report found when re-checking the audit log it received."""

    intact: bool
    entries: int
    broken_at: int | None = None
    reason: str = ""
    signatures_checked: bool = False

    @property
    def headline(self) -> str:
        """The plain status: "intact" or "broken at seq N"."""
        return "intact" if self.intact else f"broken at seq {self.broken_at}"


def check_audit(events: Sequence[AuditEvent], public_key: Ed25519PublicKey | None) -> AuditCheck:
    """Re-check the chain as received: consecutive seq, links, entry hashes, signatures.

    The same checks as `entremise audit verify`, on what the API returned rather than on the
    database; cutting entries off the end shows only against the hub's head file (that
    command).
    """
    signed = public_key is not None
    prev = GENESIS
    for expected, event in enumerate(events, start=1):

        def broken(seq: int, reason: str, checked: int = expected - 1) -> AuditCheck:
            return AuditCheck(False, checked, seq, reason, signed)

        if event.seq != expected:
            return broken(expected, f"entry {expected} is missing or out of order")
        if event.prev_hash != prev:
            return broken(event.seq, f"entry {event.seq} does not follow entry {event.seq - 1}")
        try:
            detail = json.loads(event.detail_json)
        except ValueError:
            return broken(event.seq, f"entry {event.seq} has an unreadable detail")
        if not isinstance(detail, dict):
            return broken(event.seq, f"entry {event.seq} has an unreadable detail")
        recomputed = entry_hash(
            event.seq,
            event.prev_hash,
            event.kind,
            event.actor_id,
            event.subject_id,
            detail,
            event.created_at,
        )
        if recomputed != event.hash:
            return broken(event.seq, f"entry {event.seq} was modified (its hash does not match)")
        if public_key is not None:
            try:
                public_key.verify(bytes.fromhex(event.signature), bytes.fromhex(event.hash))
            except (InvalidSignature, ValueError):
                return broken(event.seq, f"entry {event.seq} has an invalid signature")
        prev = event.hash
    return AuditCheck(True, len(events), signatures_checked=signed)


# -- names -----------------------------------------------------------------------------------------


@dataclass
class Names:
    """Principal names known to the report, and roles from the audit log for the others."""

    names: dict[str, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)

    def rich(self, principal_id: str) -> Rich:
        """The principal as "Name (id)", or "id (role)" when no name is known."""
        if not principal_id:
            return ("-",)
        name = self.names.get(principal_id)
        if name:
            return (name, " (", Code(principal_id), ")")
        role = self.roles.get(principal_id)
        return (Code(principal_id), f" ({role})") if role else (Code(principal_id),)

    def learn(self, events: Sequence[AuditEvent]) -> None:
        """Names and roles the audit log recorded when each principal was created."""
        for e in events:
            if e.kind == "principal_created":
                detail = json.loads(e.detail_json)
                role = str(detail.get("role", ""))
                self.roles.setdefault(e.subject_id, ROLES_IN_AUDIT.get(role, role))
                if detail.get("name"):
                    self.names.setdefault(e.subject_id, str(detail["name"]))
                self.roles.setdefault(e.actor_id, "admin")  # only admins create principals

    def text(self, principal_id: str) -> str:
        """A plain label for the plot's legend."""
        return self.names.get(principal_id) or principal_id

    def join(self, principal_ids: Sequence[str]) -> Rich:
        """Several principals on one line."""
        out: list[Inline] = []
        for i, pid in enumerate(principal_ids):
            out += [", "] if i else []
            out += self.rich(pid)
        return tuple(out) or ("-",)


# -- formatting helpers --------------------------------------------------------------------------


def _parse_time(value: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _when(value: str) -> str:
    parsed = _parse_time(value)
    return parsed.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if parsed else value or "-"


def _num(x: float) -> str:
    """Short human number: 24,000; 12.3; 0.0042."""
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.3g}"
    return f"{x:.2g}"


def _whole(x: float) -> str:
    """Counts of people or rows: whole units, rounded up (never understate the error)."""
    return f"{math.ceil(x - 1e-9):,}"


def _dec(value: str) -> Decimal:
    try:
        return Decimal(value or "0")
    except InvalidOperation:
        return Decimal(0)


def _symbol(measure: Measure) -> str:
    return "ρ" if measure is Measure.ZCDP else "ε"


def _kind(kind: AggregateKind) -> str:
    return kind.name.lower()


def _mechanism(name: str) -> str:
    for raw, words in MECHANISMS.items():
        name = name.replace(raw, words)
    return name.replace("value_rows", "row count").replace("_", " ")


def _plural(n: int, word: str, plural: str = "") -> str:
    return f"{n} {word}" if n == 1 else f"{n} {plural or word + 's'}"


# -- accuracy in plain words -----------------------------------------------------------------------


def _what(agg: AggregatePlan) -> str:
    kind = _kind(agg.kind)
    return {
        "count": "number of people",
        "count_rows": "number of rows",
        "sum": f"sum of {agg.column}",
        "mean": f"mean of {agg.column}",
        "variance": f"variance of {agg.column}",
        "quantile": f"quantile of {agg.column}",
    }.get(kind, f"{kind} of {agg.column}")


def accuracy_in_words(agg: AggregatePlan, release: Release) -> str:
    """How close the released numbers are to the truth, for someone who never met ε.

    Counts and sums have a data-independent 95% half-width in the plan; means and variances
    get theirs per cell after release; a quantile is a noisy choice with no fixed bound.
    """
    kind = _kind(agg.kind)
    cells = release.plan.cell_count
    each = f"each of the {cells} group values is" if cells > 1 else "the released value is"
    if agg.ci95_halfwidth is not None and kind in ("count", "count_rows"):
        unit = "people" if kind == "count" else "rows"
        return f"{each} within ±{_whole(agg.ci95_halfwidth)} {unit} of the truth in 95% of releases"
    if agg.ci95_halfwidth is not None:
        return (
            f"{each} within ±{_num(agg.ci95_halfwidth)} of the true {kind} "
            "(of values clamped to their declared bounds) in 95% of releases"
        )
    if kind in ("mean", "variance"):
        widths = sorted(
            c.ci95_halfwidth
            for r in release.results
            if r.name == agg.name
            for c in r.cells
            if c.ci95_halfwidth is not None
        )
        if not widths:
            return "no interval: every group was too small to release"
        if math.isclose(widths[0], widths[-1], rel_tol=0.05):
            return f"{each} within ±{_num(widths[-1])} of the true {kind} in 95% of releases"
        return (
            f"{each} within ±{_num(widths[0])} to ±{_num(widths[-1])} of the true {kind} in "
            "95% of releases (smaller groups are less precise)"
        )
    if kind == "quantile":
        return (
            "chosen among public candidate values by a randomised selection that favours "
            "values near the true quantile; no fixed error bound"
        )
    return agg.accuracy_note or "-"


def _technical(agg: AggregatePlan, measure: str) -> str:
    parts = [
        _mechanism(agg.mechanism),
        f"noise scale {_num(agg.noise_scale)}",
        f"sensitivity {_num(agg.sensitivity)}",
    ]
    if agg.count_noise_scale:
        parts.append(f"row-count noise scale {_num(agg.count_noise_scale)}")
    return f"{agg.name}: " + ", ".join(parts) + f"; {measure} {agg.epsilon}"


# -- the budget plot ----------------------------------------------------------------------------


def _x(times: Sequence[datetime]) -> npt.NDArray[np.datetime64]:
    """Times as UTC datetime64 for matplotlib's date axis."""
    return np.array([t.astimezone(UTC).replace(tzinfo=None) for t in times], dtype="datetime64[s]")


def budget_figure(
    agreements: Sequence[Agreement],
    ledger: Mapping[str, Sequence[Release]],
    refused: Mapping[str, Sequence[AuditEvent]],
    names: Names,
    now: datetime,
) -> MplFigure:
    """Cumulative budget spent against time, with each agreement's total as a dashed line.

    The legend sits below the axes, where it cannot cover a line; the y range always
    includes the totals. Refused queries are marked where they were tried.
    """
    fig, ax = plt.subplots(figsize=(10, 5.6), dpi=110, layout="constrained")
    top = 0.0
    starts: list[datetime] = []
    for i, a in enumerate(agreements):
        color = f"C{i % 10}"
        symbol = _symbol(a.measure)
        releases = [
            (t, r) for r in ledger.get(a.agreement_id, ()) if (t := _parse_time(r.created_at))
        ]
        start = _parse_time(a.created_at) or (releases[0][0] if releases else now)
        starts.append(start)
        times, values = [start], [0.0]
        spent = Decimal(0)
        per_analyst: dict[str, tuple[list[datetime], list[float]]] = {}
        analyst_spent: dict[str, Decimal] = defaultdict(Decimal)
        for t, r in releases:
            spent += _dec(r.epsilon_spent)
            times.append(t)
            values.append(float(spent))
            analyst_spent[r.analyst_id] += _dec(r.epsilon_spent)
            xs, ys = per_analyst.setdefault(r.analyst_id, ([start], [0.0]))
            xs.append(t)
            ys.append(float(analyst_spent[r.analyst_id]))
        times.append(now)
        values.append(float(spent))
        ax.step(
            _x(times),
            values,
            where="post",
            color=color,
            linewidth=2.2,
            zorder=3,
            label=f"{a.name}: {symbol} spent (all analysts)",
        )
        total = float(_dec(a.total_epsilon))
        ax.axhline(  # across the whole axis: visible even for an agreement made a second ago
            total,
            linestyle="--",
            color=color,
            linewidth=1.6,
            zorder=2,
            label=f"{a.name}: total budget {symbol} = {a.total_epsilon}",
        )
        if len(per_analyst) > 1:
            for analyst, (xs, ys) in per_analyst.items():
                ax.step(
                    _x([*xs, now]),
                    [*ys, ys[-1]],
                    where="post",
                    linestyle=":",
                    linewidth=1.3,
                    color=color,
                    alpha=0.8,
                    zorder=2,
                    label=f"{a.name}: {symbol} spent by {names.text(analyst)}",
                )
        tried = [t for e in refused.get(a.agreement_id, ()) if (t := _parse_time(e.created_at))]
        if tried:
            ys = [values[bisect.bisect_right(times[:-1], t) - 1] for t in tried]
            ax.scatter(
                _x(tried),
                ys,
                marker="X",
                s=70,
                color=color,
                edgecolors="black",
                linewidths=0.6,
                zorder=4,
                label=f"{a.name}: refused query",
            )
        top = max(top, total, float(spent))
    ax.set_ylim(0, top * 1.12 if top > 0 else 1.0)
    first = min(starts, default=now - timedelta(minutes=1))
    span = max(now - first, timedelta(minutes=1))
    ax.set_xlim(*_x([first - span * 0.03, now + span * 0.03]))
    locator = mdates.AutoDateLocator(tz=UTC)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    formatter = mdates.ConciseDateFormatter(locator, tz=UTC)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_formatter(formatter)
    ax.set_title("Privacy budget consumed over time")
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel("budget spent (ε, or ρ for zCDP)")
    ax.grid(alpha=0.3)
    if agreements:
        fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return fig


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
            rows.append([[(slot.name,)], [n.rich(slot.partner_id)], [("not uploaded yet",)]])
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
        audit=check_audit(events, load_public_key(audit_key) if audit_key else None),
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
    fig = budget_figure(f.agreements, f.ledger, refused, f.names, f.now)
    fig.savefig(png)
    fig.savefig(svg)
    plt.close(fig)

    scope = "one agreement" if f.scoped else "every agreement"
    blocks: list[Block] = [
        Heading(1, "Entremise compliance report"),
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
    html_path.write_text(to_html(blocks, "Entremise compliance report"))
    return ReportFiles(md_path, html_path, png, svg, f.audit)


def read_names(path: Path) -> dict[str, str]:
    """A names file: one JSON object mapping principal ids to names."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise ValueError(f'{path}: expected one JSON object {{"principal id": "name"}}')
    return data
