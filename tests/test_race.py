"""No double spend: 64 concurrent releases on a budget for exactly 10 (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

from bench.race import run_race


def test_concurrent_releases_never_overspend(db_url: str, tmp_path: Path) -> None:
    result = run_race(db_url, tmp_path / "race", clients=64, k=10)
    assert result["attempts"] == 64
    assert result["successes"] == 10
    assert result["refused_resource_exhausted"] == 54 and result["other_errors"] == 0
    assert result["overspend"] in ("0", "0.0")
    assert result["ledger_releases"] == 10 and result["ledger_matches_spent"] is True
