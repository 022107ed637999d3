"""The compliance report as a reader sees it: rendered by headless Chromium, text and screenshot.

Playwright drives Debian's chromium (`make chromium` installs it; Playwright's own browser
download is not used). The full-page screenshot is kept as a CI artefact.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import pytest

from entremise.cli.report import build_report
from tests.conftest import Hub
from tests.test_report import build_world

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path(__file__).resolve().parents[1] / ".build" / "report-screenshot.png"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _require_chromium() -> None:
    """Skip only where chromium cannot be installed at all; elsewhere its absence is a failure."""
    if CHROMIUM.exists():
        return
    if shutil.which("apt-get") is None:
        pytest.skip(f"{CHROMIUM} missing and no apt-get to install it: report not rendered")
    pytest.fail(f"{CHROMIUM} missing: run `make chromium` (apt-get install -y chromium)")


def test_rendered_report_reads_as_plain_text_with_names_status_refusals_and_audit(
    sqlite_hub: Hub, tmp_path: Path
) -> None:
    _require_chromium()
    from playwright.sync_api import sync_playwright

    w = build_world(sqlite_hub)
    files = build_report(w.officer, tmp_path / "report", names=w.names, audit_key=w.audit_key)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile,
        sync_playwright() as pw,
    ):
        browser = pw.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            page = browser.new_page()
            page.goto(files.html.resolve().as_uri())
            page.wait_for_load_state("load")
            text = page.inner_text("body")
            plot_width = page.evaluate("document.querySelector('figure img').naturalWidth")
            status = {
                name: page.locator("h2:text-is('Agreements') + table tr", has_text=name)
                .locator("td")
                .nth(1)
                .inner_text()
                for name in ("Audience insights 2026", "Marketing pilot", "Churn study")
            }
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()

    # No Markdown left for the reader.
    assert "`" not in text and "**" not in text
    assert not re.search(r"^#+ |^\|", text, re.M)
    # Names beside ids.
    assert f"Alice Martin ({w.ids['alice']})" in text
    assert f"Bruno Keller ({w.ids['bruno']})" in text
    assert f"Banque Exemple ({w.ids['bank']})" in text
    assert f"Audience insights 2026 ({w.active})" in text
    # Agreement status words, in each agreement's row.
    assert status["Audience insights 2026"].splitlines()[0] == "active"
    assert status["Marketing pilot"].splitlines()[0] == "suspended"
    assert "by Banque Exemple" in status["Marketing pilot"]
    assert status["Churn study"].splitlines()[0] == "revoked"
    # The refused queries with analyst, agreement and reason.
    refusals = text.split("Refused and failed queries", 1)[1].split("Audit log", 1)[0]
    assert "refused" in refusals and "Alice Martin" in refusals
    assert "not enough budget left" in refusals and "Audience insights 2026" in refusals
    assert "outside the agreement's scope" in refusals and "Bruno Keller" in refusals
    # The audit status line and the accuracy in words.
    assert "Audit log: intact." in text
    assert re.search(r"within ±[\d,]+ people of the truth in 95% of releases", text)
    # The budget plot loaded.
    assert plot_width > 0
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
