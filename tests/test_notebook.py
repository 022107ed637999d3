"""docs/notebook.py, the analyst's notebook session, runs end to end against a real hub.

It is executed as a script (`runpy`) with the hub's address, an analyst's token and the
agreement in its environment variables; the DataFrames it leaves in its globals and the plot
it saves are checked.
"""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import pandas as pd
import pytest

import entremise
from entremise.sdk import Hub
from tests.conftest import Hub as RunningTestHub
from tests.conftest import build_scenario

NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "notebook.py"


def test_the_notebook_session_runs_and_leaves_its_answers(
    sqlite_hub: RunningTestHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scenario = build_scenario(sqlite_hub, total_epsilon="10")
    token = scenario.analyst.token
    assert token
    plot = tmp_path / "spend.png"
    monkeypatch.setenv("ENTREMISE_TARGET", scenario.hub.target)
    monkeypatch.setenv("ENTREMISE_TOKEN", token)
    monkeypatch.setenv("ENTREMISE_AGREEMENT", scenario.agreement_id)
    monkeypatch.setenv("ENTREMISE_PLOT", str(plot))
    monkeypatch.chdir(tmp_path)

    names = runpy.run_path(str(NOTEBOOK), run_name="__main__")

    assert plot.is_file() and plot.stat().st_size > 1000
    agreements: pd.DataFrame = names["agreements"]
    assert list(agreements["agreement_id"]) == [scenario.agreement_id]
    assert agreements.loc[0, "datasets"] == "bank, panel"

    plan: pd.DataFrame = names["plan"]
    assert list(plan["name"]) == ["people", "spend"]
    assert plan.attrs["cells"] == 3 and plan.attrs["cost"] == "0.5"
    assert names["people_ci95"] > 0
    # A mean's half-width before release: a bound at 1,000 rows; a count's is exact.
    spend_plan = plan.set_index("name").loc["spend"]
    assert spend_plan["ci95_at_1000_rows"] > 0 and pd.isna(spend_plan["ci95"])

    spend: pd.DataFrame = names["spend"]
    assert list(spend.columns) == [
        "segment",
        "people",
        "people_low",
        "people_high",
        "spend",
        "spend_low",
        "spend_high",
    ]
    assert sorted(spend["segment"]) == ["affluent", "mass", "private"]
    row = spend.iloc[0]
    assert row["people_low"] < row["people"] < row["people_high"]
    assert spend.attrs["agreement_id"] == scenario.agreement_id
    assert spend.attrs["epsilon"] == "0.5" and spend.attrs["replayed"] is False
    assert set(spend.attrs["mechanisms"]) == {"people", "spend"}

    top: pd.DataFrame = names["top"]
    assert len(top) == 3  # LIMIT 3 of the 6 categories
    totals = list(top["total"])
    assert totals == sorted(totals, reverse=True)
    assert all(math.isfinite(v) for v in top["total_high"])

    assert names["refused"].startswith("panel.amount: must appear in GROUP BY")
    budget: pd.DataFrame = names["budget"]
    assert float(budget.loc[0, "spent"]) == pytest.approx(1.5)


def test_connect_is_the_sdks_and_import_of_the_api_stays_cheap() -> None:
    import subprocess
    import sys

    assert entremise.connect is entremise.sdk.notebook.connect  # type: ignore[attr-defined]
    assert entremise.Hub is Hub
    code = "import sys, entremise.v1; print('entremise.sdk' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
