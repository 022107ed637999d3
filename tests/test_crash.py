"""SIGKILL the hub mid-upload and mid-release: nothing is lost, nothing shows half-done."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.kill import run_kill


@pytest.mark.slow
def test_kills_leave_no_partial_dataset_and_no_release_without_debit(tmp_path: Path) -> None:
    result = run_kill(tmp_path / "hub", rounds=4, seed=7)
    assert result["kills"] == 4
    assert result["uploads_confirmed"] + result["releases_confirmed"] > 4  # work was under way
    assert result["partial_datasets"] == 0
    assert result["releases_without_debit"] == 0 and result["debits_without_release"] == 0
    assert result["confirmed_releases_lost"] == 0
    assert result["retries_ok"] == result["interrupted_uploads_retried"]
    assert result["final_check"] == {
        "partial_datasets": 0,
        "releases_without_debit": 0,
        "debits_without_release": 0,
        "confirmed_releases_lost": 0,
    }
