"""The compliance report a person opens, built from a real hub's compliance API.

The world behind it: two partners, two analysts and a compliance officer with names; an active
agreement with releases by both analysts, a query refused for lack of budget and one refused
for leaving the agreement's scope; a suspended zCDP agreement and a revoked one.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from entremise.cli.report import Names, budget_figure, build_report, check_audit
from entremise.partners import Client, aggregate, query
from entremise.partners.synthetic import BANK_SCHEMA, PANEL_SCHEMA, PURPOSE, generate
from entremise.sdk import EntremiseRPCError, Status
from entremise.v1 import query_service_pb2
from tests.conftest import Hub, partner_with_key

AUDIT_PUBLIC_KEY = "audit_signing.pub"


@dataclass
class World:
    """A hub with named principals, three agreements in three states, releases and refusals."""

    hub: Hub
    officer: Client
    names: dict[str, str]
    ids: dict[str, str]  # short label -> principal id
    active: str
    suspended: str
    revoked: str
    releases: list[query_service_pb2.Release]

    @property
    def audit_key(self) -> Path:
        return self.hub.data_dir / AUDIT_PUBLIC_KEY


def build_world(hub: Hub, *, uploads: bool = True) -> World:
    """The whole scenario through gRPC; without uploads, only agreements change state."""
    bank_id, bank, bank_key = partner_with_key(hub, "Banque Exemple")
    panel_id, panel, panel_key = partner_with_key(hub, "Panel Conso Exemple")
    alice_id, alice = hub.principal("Alice Martin", "analyst")
    bruno_id, bruno = hub.principal("Bruno Keller", "analyst")
    officer_id, officer = hub.principal("Olga Officer", "compliance")
    slots = [(bank_id, "bank"), (panel_id, "panel")]
    active = hub.admin.create_agreement(
        name="Audience insights 2026",
        purpose=PURPOSE,
        datasets=slots,
        analyst_ids=[alice_id, bruno_id],
        total_epsilon="1",
        max_rows_per_person=12,
        allowed_columns=["bank.segment", "panel.category", "panel.amount"],
        max_shared_identifiers=2,
    ).agreement_id
    releases: list[query_service_pb2.Release] = []
    if uploads:
        data = generate(1200, 700, 400, seed=11)
        bank.upload_dataset(active, "bank", data.bank, BANK_SCHEMA, keys=bank_key)
        panel.upload_dataset(active, "panel", data.panel, PANEL_SCHEMA, keys=panel_key)
        count = query(active, "0.3", [aggregate("count", name="people")], group_by=["bank.segment"])
        mean = query(
            active,
            "0.3",
            [aggregate("mean", "panel.amount", name="avg_amount")],
            group_by=["panel.category"],
        )
        total = query(active, "0.2", [aggregate("sum", "panel.amount", name="spend")])
        releases = [alice.run(count).release, bruno.run(mean).release, alice.run(total).release]
        with pytest.raises(EntremiseRPCError) as over:
            alice.run(query(active, "0.5", [aggregate("count")]))
        assert over.value.status is Status.RESOURCE_EXHAUSTED
        with pytest.raises(EntremiseRPCError) as outside:
            bruno.run(query(active, "0.1", [aggregate("sum", "bank.investable_assets")]))
        assert outside.value.status is Status.PERMISSION_DENIED
    suspended = hub.admin.create_agreement(
        name="Marketing pilot",
        purpose=PURPOSE,
        datasets=slots,
        analyst_ids=[bruno_id],
        total_epsilon="0.5",
        budget_kind="zcdp",
    ).agreement_id
    bank.approve_agreement(suspended)
    panel.approve_agreement(suspended)
    bank.suspend_agreement(suspended, "legal review")
    revoked = hub.admin.create_agreement(
        name="Churn study",
        purpose=PURPOSE,
        datasets=slots,
        analyst_ids=[alice_id],
        total_epsilon="2",
    ).agreement_id
    panel.revoke_agreement(revoked, "project stopped")
    ids = {
        "bank": bank_id,
        "panel": panel_id,
        "alice": alice_id,
        "bruno": bruno_id,
        "officer": officer_id,
    }
    names = {
        bank_id: "Banque Exemple",
        panel_id: "Panel Conso Exemple",
        alice_id: "Alice Martin",
        bruno_id: "Bruno Keller",
    }
    return World(hub, officer, names, ids, active, suspended, revoked, releases)


class _Text(HTMLParser):
    """The text a reader sees, without tags, style or title."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._skip += tag in ("style", "title")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("style", "title")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def visible_text(html: str) -> str:
    parser = _Text()
    parser.feed(html)
    return "".join(parser.parts)


def section(markdown: str, title: str) -> str:
    """One `## title` section of the Markdown report."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", markdown, re.S | re.M)
    assert match, f"no section {title!r}"
    return match.group(1)


def test_report_names_status_budget_accuracy_refusals_and_audit(hub: Hub, tmp_path: Path) -> None:
    w = build_world(hub)
    files = build_report(w.officer, tmp_path / "report", names=w.names, audit_key=w.audit_key)
    assert files.plot_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert files.plot_svg.read_text().lstrip().startswith("<?xml")
    md = files.markdown.read_text()
    text = visible_text(files.html.read_text())
    assert "budget.svg" in files.html.read_text()

    # Names beside ids, everywhere an id appears; the officer's own name comes from WhoAmI.
    for pid, name in {**w.names, w.ids["officer"]: "Olga Officer"}.items():
        assert md.count(pid) > 0
        assert md.count(pid) == md.count(f"{name} (`{pid}`)"), name
        assert f"{name} ({pid})" in text
    for agreement in (w.active, w.suspended, w.revoked):
        assert md.count(agreement) == md.count(f"`{agreement}`")

    # Agreements: status words, privacy relation, budget with its (epsilon, delta) reading.
    agreements = section(md, "Agreements")
    budgets = {b.agreement_id: b for b in w.officer.budgets()}
    row = next(line for line in agreements.splitlines() if "Audience insights 2026" in line)
    assert "**active**" in row and "shares up to 2 identifiers" in row
    assert f"ε 1 in total; {budgets[w.active].spent_epsilon} spent" in row
    implied = budgets[w.active]
    assert f"(ε = {implied.implied_epsilon}, δ = {implied.implied_delta or '0'})" in row
    row = next(line for line in agreements.splitlines() if "Marketing pilot" in line)
    assert "**suspended**" in row and "ρ 0.5 in total" in row
    assert "suspended at " in row and "by Banque Exemple" in row
    assert "shares up to 1 identifier " in row
    row = next(line for line in agreements.splitlines() if "Churn study" in line)
    assert "**revoked**" in row and "by Panel Conso Exemple" in row

    # Releases: one row each, accuracy in words from the plan the analyst was given.
    releases = section(md, "Releases")
    assert releases.count("| rel") == 0 and releases.count("`rel_") == 3
    count_plan = w.releases[0].plan
    ci = count_plan.aggregates[0].ci95_halfwidth
    assert (
        f"people: each of the {count_plan.cell_count} group values is within "
        f"±{int(-(-ci // 1)):,} people of the truth in 95% of releases"
    ) in releases
    mean_widths = [c.ci95_halfwidth or 0.0 for c in w.releases[1].results[0].cells]
    assert "avg_amount: each of the 6 group values is within ±" in releases
    # The widest interval closes the sentence (alone when all are within 5% of one another).
    widest = re.search(r"±([\d,.]+) of the true mean in 95% of releases", releases)
    assert widest is not None
    assert float(widest.group(1).replace(",", "")) == pytest.approx(max(mean_widths), rel=0.05)
    assert "spend: the released value is within ±" in releases
    assert "of the true sum" in releases
    assert "discrete Laplace noise" in releases and "discrete_laplace" not in releases

    # Refused queries: who, on which agreement, why.
    refused = section(md, "Refused and failed queries")
    lines = [line for line in refused.splitlines() if "**refused**" in line]
    assert len(lines) == 2
    over = next(line for line in lines if "not enough budget left" in line)
    assert "Alice Martin" in over and "Audience insights 2026" in over
    assert "ε 0.5 asked, nothing spent" in over
    scope = next(line for line in lines if "outside the agreement's scope" in line)
    assert "Bruno Keller" in scope and "bank.investable_assets" in scope

    # The audit log as received is intact, signatures included.
    assert files.audit is not None and files.audit.intact and files.audit.signatures_checked
    assert "**Audit log: intact.**" in md
    assert "Audit log: intact." in text and "Ed25519 signature" in text

    # No Markdown reaches the reader of the HTML.
    assert "`" not in text and "**" not in text and "|" not in text
    assert not re.search(r"(^|\s)#{1,3} ", text)

    # The same hub without a names file.
    bare = build_report(w.officer, tmp_path / "bare").markdown.read_text()
    assert f"Olga Officer (`{w.ids['officer']}`)" in bare
    # Without a names file, names come from the audit log (recorded at creation).
    assert f"Alice Martin (`{w.ids['alice']}`)" in bare
    assert f"Banque Exemple (`{w.ids['bank']}`)" in bare
    assert "signatures not checked" in bare and "**Audit log: intact.**" in bare


def test_budget_plot_is_against_time_and_its_legend_covers_no_line(
    sqlite_hub: Hub, tmp_path: Path
) -> None:
    w = build_world(sqlite_hub)
    agreements = w.officer.list_agreements()
    ledger: dict[str, list[query_service_pb2.Release]] = {}
    for r in w.officer.ledger():
        ledger.setdefault(r.agreement_id, []).append(r)
    refused = {
        w.active: [e for e in w.officer.audit_events() if e.kind == "release_refused"],
    }
    now = datetime.now(UTC)
    fig = budget_figure(agreements, ledger, refused, Names(w.names), now)
    try:
        fig.canvas.draw()
        ax = fig.axes[0]
        # x is time: the axis spans the releases' created_at (as matplotlib date numbers).
        low, high = ax.get_xlim()
        times = [mdates.date2num(datetime.fromisoformat(r.created_at)) for r in w.releases]
        assert all(low < t < high for t in times)
        assert isinstance(ax.xaxis.get_major_formatter(), mdates.ConciseDateFormatter)
        # Every total budget line is inside the y range, above the spent line.
        assert ax.get_ylim()[1] > 2.0
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert "Audience insights 2026: total budget ε = 1" in labels
        assert "Audience insights 2026: ε spent by Alice Martin" in labels
        assert "Audience insights 2026: refused query" in labels
        # The legend is outside the axes: it cannot hide any line.
        renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
        legend = fig.legends[0].get_window_extent(renderer)
        axes = ax.get_window_extent(renderer)
        assert legend.y1 <= axes.y0 or legend.x0 >= axes.x1
    finally:
        plt.close(fig)


def test_report_says_where_the_audit_chain_breaks(sqlite_hub: Hub, tmp_path: Path) -> None:
    w = build_world(sqlite_hub, uploads=False)
    events = w.officer.audit_events()
    assert check_audit(events, None).intact
    # A signature from another key: the first entry already fails.
    other = tmp_path / "other.pub"
    other.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    wrong = build_report(w.officer, tmp_path / "wrong", audit_key=other)
    assert wrong.audit is not None and wrong.audit.headline == "broken at seq 1"
    assert "**Audit log: broken at seq 1.**" in wrong.markdown.read_text()
    assert "entry 1 has an invalid signature" in wrong.markdown.read_text()

    # Someone edits an entry in the database: the report names it.
    engine = sa.create_engine(f"sqlite:///{sqlite_hub.data_dir.parent / 'hub.db'}")
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE audit_events SET detail_json = :d WHERE seq = 4"),
            {"d": json.dumps({"role": "admin"})},
        )
    engine.dispose()
    tampered = build_report(w.officer, tmp_path / "tampered", audit_key=w.audit_key)
    md = tampered.markdown.read_text()
    assert "**Audit log: broken at seq 4.**" in md
    assert "entry 4 was modified" in md and "3 of " in md
    assert "Audit log: broken at seq 4." in visible_text(tampered.html.read_text())

    # And an entry removed from the middle of what the API returns is a gap at its seq.
    gap = [e for e in events if e.seq != 6]
    assert check_audit(gap, None).headline == "broken at seq 6"


def test_report_command_takes_names_and_the_audit_key(sqlite_hub: Hub, tmp_path: Path) -> None:
    w = build_world(sqlite_hub, uploads=False)
    names = tmp_path / "names.json"
    names.write_text(json.dumps(w.names))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "entremise.cli",
            "report",
            "--out",
            str(tmp_path / "cli"),
            "--names",
            str(names),
            "--audit-key",
            str(w.audit_key),
            "--target",
            w.hub.target,
            "--token",
            w.officer.token or "",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["audit"] == "intact"
    md = Path(out["markdown"]).read_text()
    assert "Banque Exemple" in md and "every entry's Ed25519 signature" in md
    assert "**suspended**" in md and "**revoked**" in md

    names.write_text("[1, 2]")
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "entremise.cli",
            "report",
            "--out",
            str(tmp_path / "bad"),
            "--names",
            str(names),
            "--target",
            w.hub.target,
            "--token",
            w.officer.token or "",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 1 and "expected one JSON object" in bad.stderr
    assert "Traceback" not in bad.stderr
