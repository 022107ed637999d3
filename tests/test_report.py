"""The compliance report a person opens: plot, tables, consent coverage, Art. 30 record."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from entremise.cli.report import build_report
from entremise.partners import aggregate, query
from tests.conftest import Scenario


def test_report_has_budget_plot_releases_coverage_and_record(
    scenario: Scenario, tmp_path: Path
) -> None:
    s = scenario
    s.analyst.run(query(s.agreement_id, "0.5", [aggregate("count")], group_by=["bank.segment"]))
    s.analyst.run(query(s.agreement_id, "0.25", [aggregate("mean", "panel.amount")]))
    files = build_report(s.officer, tmp_path / "report")
    assert files.plot_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert files.plot_svg.read_text().lstrip().startswith("<?xml")
    markdown = files.markdown.read_text()
    html = files.html.read_text()
    for section in (
        "Budget consumption",
        "Releases",
        "Consent coverage",
        "Record of processing (GDPR Art. 30)",
    ):
        assert section in markdown and section in html
    assert s.agreement_id in html and "<table>" in html and "budget.svg" in html
    assert "| 5 | 0.75 | 4.25 |" in markdown  # total, spent, remaining
    assert markdown.count("| rel_") == 2
    coverage = {(c.dataset_name, c.purpose): c for c in s.officer.consent_coverage()}
    bank = coverage[("bank", "audience_insights")]
    assert (bank.rows, bank.consenting_rows, bank.expired_rows) == (
        len(s.bank),
        int(s.bank["consent_analytics"].sum()),
        0,
    )
    until = pd.to_datetime(s.panel["consent_until"].replace("", None), utc=True)
    expired = int((s.panel["consent_analytics"] & (until <= pd.Timestamp.now(tz="UTC"))).sum())
    panel = coverage[("panel", "audience_insights")]
    assert expired > 0
    assert (panel.rows, panel.expired_rows, panel.consenting_rows) == (
        len(s.panel),
        expired,
        int(s.panel["consent_analytics"].sum()) - expired,
    )
    assert f"| {panel.consenting_rows} | {expired} |" in markdown
    assert "@" not in markdown
