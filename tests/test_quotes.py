"""Quoted workloads through real gRPC (SQLite and PostgreSQL): price, then one debit or none."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal
from itertools import product
from pathlib import Path

import pytest
from google.protobuf.json_format import MessageToDict

from entremise.partners import aggregate, query
from entremise.partners.synthetic import BANK_SCHEMA
from entremise.privacy.budget import Measure
from entremise.privacy.mechanisms import mechanism_for
from entremise.sdk import RPCError, Status
from entremise.server import testing
from entremise.server.domain.codec import spec_from_dict
from entremise.server.domain.models import AggregateKind, NumericColumn, QuerySpec
from entremise.server.domain.planner import square_divisor
from entremise.server.domain.releasing import (
    ALPHA,
    _mean_cell,
    _root,
    _variance_cell,
    ratio_halfwidth_bound,
    rows_for,
)
from entremise.v1 import query_service_pb2
from tests.conftest import Scenario
from tests.test_cli import _clean_env, ok_json, one_line_error, run_cli


def _workload(ag: str) -> list[query_service_pb2.Query]:
    """Three queries costing 0.5 + 1 + 0.5 = 2."""
    return [
        query(ag, "0.5", [aggregate("count")]),
        query(ag, "1", [aggregate("mean", "panel.amount")], group_by=["panel.category"]),
        query(ag, "0.5", [aggregate("sum", "panel.amount")]),
    ]


def _spent(s: Scenario) -> Decimal:
    return Decimal(s.officer.budgets(s.agreement_id)[0].spent_epsilon)


def test_a_quote_is_free_and_its_run_debits_the_quoted_total_once(scenario: Scenario) -> None:
    s = scenario
    quoted = s.analyst.quote(_workload(s.agreement_id))
    assert quoted.costs == ("0.5", "1", "0.5") and quoted.total == "2"
    assert (quoted.remaining_before, quoted.remaining_after) == ("5", "3")
    assert quoted.replayed == (False, False, False) and len(quoted.plans) == 3
    assert quoted.expires_at > quoted.created_at
    assert _spent(s) == 0
    results = s.analyst.run_quote(quoted.quote_id)
    assert [r.release.status for r in results] == ["released"] * 3
    assert [r.release.epsilon_spent for r in results] == ["0.5", "1", "0.5"]
    assert _spent(s) == 2 and results[-1].remaining_epsilon == "3"
    ledger = s.officer.ledger(s.agreement_id)
    assert [r.release_id for r in ledger] == [r.release.release_id for r in results]
    kinds = [e.kind for e in s.officer.audit_log().events]
    assert kinds.count("quote") == 1 and kinds.count("quote_run") == 1
    assert kinds.count("release") == 3
    # The agreement's partners see the quote and its run in their own view of the log.
    seen = [e.kind for e in s.bank_client.audit_log().events if e.subject_id == s.agreement_id]
    assert {"quote", "quote_run", "release"} <= set(seen)
    # Cells come as a single run gives them: a mean per category, with its interval.
    mean = results[1].release.results[0]
    assert len(mean.cells) == 6 and all(c.ci95_halfwidth for c in mean.cells if c.value)


def test_a_quote_runs_once(scenario: Scenario) -> None:
    s = scenario
    quoted = s.analyst.quote(_workload(s.agreement_id))
    s.analyst.run_quote(quoted.quote_id)
    with pytest.raises(RPCError) as again:
        s.analyst.run_quote(quoted.quote_id)
    assert again.value.status is Status.FAILED_PRECONDITION
    assert "was already run" in again.value.message
    assert _spent(s) == 2


def test_a_short_budget_refuses_the_whole_workload(scenario: Scenario) -> None:
    s = scenario
    quoted = s.analyst.quote(_workload(s.agreement_id))
    s.analyst.run(query(s.agreement_id, "4", [aggregate("count_rows")]))
    with pytest.raises(RPCError) as short:
        s.analyst.run_quote(quoted.quote_id)
    assert short.value.status is Status.RESOURCE_EXHAUSTED
    assert "short by 1" in short.value.message and "nothing was spent" in short.value.message
    assert _spent(s) == 4
    assert len(s.officer.ledger(s.agreement_id)) == 1


@pytest.mark.parametrize("change", ["withdrawal", "upload"])
def test_a_change_of_the_data_after_the_quote_refuses_its_run(
    scenario: Scenario, change: str
) -> None:
    s = scenario
    quoted = s.analyst.quote(_workload(s.agreement_id))
    if change == "withdrawal":
        emails = sorted(set(s.panel["email"]))[:5]
        s.panel_client.withdraw_consent(s.agreement_id, emails, "email", keys=s.panel_key)
        expected = "consent was withdrawn since the quote"
    else:
        s.bank_client.upload_dataset(
            s.agreement_id, "bank", s.bank.iloc[:-10], BANK_SCHEMA, keys=s.bank_key
        )
        expected = "dataset 'bank' is at version 2, the quote priced version 1"
    with pytest.raises(RPCError) as refused:
        s.analyst.run_quote(quoted.quote_id)
    assert refused.value.status is Status.FAILED_PRECONDITION
    assert expected in refused.value.message and "\n" not in refused.value.message
    assert _spent(s) == 0 and s.officer.ledger(s.agreement_id) == []
    # A new quote on the new state runs.
    requoted = s.analyst.quote(_workload(s.agreement_id))
    assert len(s.analyst.run_quote(requoted.quote_id)) == 3
    assert _spent(s) == 2


def test_another_analysts_quote_is_not_found_like_an_unknown_one(scenario: Scenario) -> None:
    s = scenario
    quoted = s.analyst.quote(_workload(s.agreement_id))
    _, other = s.hub.principal("other analyst", "analyst")
    with pytest.raises(RPCError) as hidden:
        other.run_quote(quoted.quote_id)
    with pytest.raises(RPCError) as unknown:
        other.run_quote("qt_0123456789abcdef")
    assert hidden.value.status is unknown.value.status is Status.NOT_FOUND
    assert hidden.value.message.replace(quoted.quote_id, "?") == unknown.value.message.replace(
        "qt_0123456789abcdef", "?"
    )
    with pytest.raises(RPCError) as partner:
        s.bank_client.run_quote(quoted.quote_id)
    assert partner.value.status is Status.PERMISSION_DENIED
    assert _spent(s) == 0
    assert len(s.analyst.run_quote(quoted.quote_id)) == 3  # still hers to run


def test_an_expired_quote_is_refused(scenario: Scenario) -> None:
    s = scenario
    s.hub.running.hub.quotes.lifetime = timedelta(seconds=-1)
    quoted = s.analyst.quote(_workload(s.agreement_id))
    with pytest.raises(RPCError) as expired:
        s.analyst.run_quote(quoted.quote_id)
    assert expired.value.status is Status.FAILED_PRECONDITION
    assert f"expired at {quoted.expires_at}" in expired.value.message
    assert _spent(s) == 0


def test_a_workload_spans_one_agreement(scenario: Scenario) -> None:
    s = scenario
    with pytest.raises(RPCError) as mixed:
        s.analyst.quote(
            [*_workload(s.agreement_id), query("ag_other", "0.1", [aggregate("count")])]
        )
    assert mixed.value.status is Status.INVALID_ARGUMENT
    assert "one agreement" in mixed.value.message
    # Queries may leave the agreement to the request.
    quoted = s.analyst.quote(_workload(""), agreement_id=s.agreement_id)
    assert quoted.agreement_id == s.agreement_id and quoted.total == "2"


def test_the_cli_quotes_a_json_workload_and_runs_it(scenario: Scenario, tmp_path: Path) -> None:
    s = scenario
    workload = tmp_path / "workload.json"
    workload.write_text(
        json.dumps([MessageToDict(q, preserving_proto_field_name=True) for q in _workload("")])
    )
    token, target = s.analyst.token or "", s.hub.target
    quoted = ok_json(
        run_cli(
            "query",
            "quote",
            str(workload),
            "--agreement",
            s.agreement_id,
            "--json",
            token=token,
            target=target,
        )
    )
    assert (quoted["costs"], quoted["total"]) == (["0.5", "1", "0.5"], "2")
    assert len(quoted["plans"]) == 3 and quoted["agreement_id"] == s.agreement_id
    human = run_cli(
        "query", "quote", str(workload), "--agreement", s.agreement_id, token=token, target=target
    )
    assert human.returncode == 0, human.stderr
    assert "budget: 5 -> 3" in human.stdout and "query run --quote qt_" in human.stdout
    ran = ok_json(
        run_cli("query", "run", "--quote", quoted["quote_id"], "--json", token=token, target=target)
    )
    assert [r["release"]["epsilon_spent"] for r in ran["results"]] == ["0.5", "1", "0.5"]
    assert ran["remaining_epsilon"] == "3" and _spent(s) == 2
    again = run_cli("query", "run", "--quote", quoted["quote_id"], token=token, target=target)
    assert "was already run" in one_line_error(again, 2)
    # The other quote, in human form, then a single query still runs as before.
    other = ok_json(
        run_cli(
            "query",
            "quote",
            str(workload),
            "--agreement",
            s.agreement_id,
            "--json",
            token=token,
            target=target,
        )
    )
    assert other["replayed"] == [True, True, True] and other["total"] == "0"
    shown = run_cli("query", "run", "--quote", other["quote_id"], token=token, target=target)
    assert shown.returncode == 0, shown.stderr
    assert "3 queries released with one debit" in shown.stdout
    single = ok_json(
        run_cli(
            "query",
            "run",
            "--agreement",
            s.agreement_id,
            "--agg",
            "count",
            "--epsilon",
            "0.5",
            "--json",
            token=token,
            target=target,
        )
    )
    assert single["release"]["epsilon_spent"] == "0.5"


def test_the_cli_refuses_bad_workload_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    assert "expected a JSON list" in one_line_error(run_cli("query", "quote", str(bad)), 1)
    sql = tmp_path / "w.sql"
    sql.write_text("SELECT COUNT(*) FROM bank JOIN panel;")
    assert "needs --epsilon (or --rho)" in one_line_error(run_cli("query", "quote", str(sql)), 1)
    good = tmp_path / "good.json"
    good.write_text('[{"aggregates": [{"kind": "AGGREGATE_KIND_COUNT"}], "epsilon": "1"}]')
    assert "apply to .sql workloads only" in one_line_error(
        run_cli("query", "quote", str(good), "--epsilon", "1"), 1
    )
    neither = run_cli("query", "run")
    assert "needs --agreement and --agg (or --quote ID)" in one_line_error(neither, 1)


# -- half-widths of means and variances before release -----------------------------------------


@pytest.mark.parametrize("measure", [Measure.PURE, Measure.ZCDP])
def test_the_preview_bound_holds_for_every_cell_the_release_could_give(measure: Measure) -> None:
    """Within the release's own 95% event, no data within the bounds exceeds the bound.

    Every noisy total is pushed to the edges of its union-bound interval (and the middle), for
    cells of all-lower, all-upper and mixed values at each previewed row count.
    """
    column = NumericColumn("amount", -50.0, 300.0, 0.01)
    share = measure.loss_type.parse("0.3")
    rows_l1 = 12
    mean_mechs = [
        mechanism_for(
            measure, rows_l1 * column.max_units, float(rows_l1 * column.max_units), share
        ),
        mechanism_for(measure, rows_l1, float(rows_l1), share),
    ]
    q = square_divisor(column)
    sq_units = column.max_units**2 // q
    var_mechs = [
        mean_mechs[0],
        mechanism_for(measure, rows_l1 * sq_units, float(rows_l1 * sq_units), share),
        mean_mechs[1],
    ]
    mean_bound = ratio_halfwidth_bound(AggregateKind.MEAN, mean_mechs, column)
    var_bound = ratio_halfwidth_bound(AggregateKind.VARIANCE, var_mechs, column)
    sd_bound = ratio_halfwidth_bound(AggregateKind.STDDEV, var_mechs, column)
    a_mean = [m.ci_halfwidth(ALPHA / 2) for m in mean_mechs]
    a_var = [m.ci_halfwidth(ALPHA / 3) for m in var_mechs]
    res = column.resolution
    for rows in (100, 1_000, 10_000, 100_000):
        assert mean_bound(rows) >= mean_bound(rows * 10)  # decreasing in the row count
        for upper_share in (0.0, 0.3, 0.5, 1.0):
            uppers = round(rows * upper_share)
            values = [column.upper] * uppers + [column.lower] * (rows - uppers)
            total = round(sum(values) / res)
            squares = round(sum(v * v for v in values) / (res * res * q))
            for e_sum, e_rows in product((-1, 0, 1), repeat=2):
                _, width = _mean_cell(
                    total + int(e_sum * a_mean[0]),
                    rows + int(e_rows * a_mean[1]),
                    mean_mechs[0],
                    mean_mechs[1],
                    column,
                )
                assert width is None or width <= mean_bound(rows), (rows, upper_share)
            for e_sum, e_sq, e_rows in product((-1, 0, 1), repeat=3):
                variance, width = _variance_cell(
                    (
                        total + int(e_sum * a_var[0]),
                        squares + int(e_sq * a_var[1]),
                        rows + int(e_rows * a_var[2]),
                    ),
                    var_mechs,
                    column,
                )
                assert width is None or width <= var_bound(rows), (rows, upper_share)
                _, root_width = _root(variance, width)
                assert root_width is None or root_width <= sd_bound(rows), (rows, upper_share)
    target = mean_bound(1_000)
    needed = rows_for(mean_bound, target)
    assert needed <= 1_000 and mean_bound(needed) <= target < mean_bound(needed - 1)


def test_a_quote_states_the_half_width_of_a_mean_at_each_row_count(scenario: Scenario) -> None:
    """The quote's figure at r rows bounds the released half-width of every cell of >= 2r rows.

    The bound decreases with the rows (it roughly halves when they double), so a cell of n >= 2r
    rows can exceed the figure at r only if its noise falls far outside the release's 95% event.
    """
    s = scenario
    mean = query(
        s.agreement_id,
        "1",
        [aggregate("mean", "panel.amount")],
        group_by=["panel.category"],
    )
    quoted = s.analyst.quote([mean])
    plan = quoted.plans[0].aggregates[0]
    at_rows = dict(plan.ci95_at_rows)
    assert sorted(at_rows) == [100, 1_000, 10_000, 100_000]
    assert at_rows[100] > at_rows[1_000] > at_rows[10_000] > at_rows[100_000] > 0
    assert plan.ci95_halfwidth is None and "at most" in plan.accuracy_note
    domain = s.hub.running.hub
    spec = domain.quotes.store.find_quote(quoted.quote_id)
    assert spec is not None
    [released] = s.analyst.run_quote(quoted.quote_id)
    exact_plan = testing.plan(domain, _domain_spec(spec.document))
    value_rows = testing.exact_aggregates(domain, exact_plan).value_rows["panel.amount"]
    cells = released.release.results[0].cells
    checked = 0
    for cell, rows in zip(cells, value_rows, strict=True):
        grid = [r for r in at_rows if 2 * r <= rows]
        if cell.ci95_halfwidth is None or not grid:
            continue
        assert cell.ci95_halfwidth <= at_rows[max(grid)], (rows, cell)
        checked += 1
    assert checked >= 3


def _domain_spec(document: str) -> QuerySpec:
    return spec_from_dict(json.loads(document)["queries"][0])


def test_the_readme_quote_block_runs_as_written(scenario: Scenario, tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("\n### Quoted workloads\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    env = {
        "AG": scenario.agreement_id,
        "ANALYST": scenario.analyst.token or "",
        "ENTREMISE_TARGET": scenario.hub.target,
        "ENTREMISE_WITNESS_DIR": str(tmp_path / "witness"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=tmp_path,
        env={**_clean_env(), **env},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    flat = " ".join(done.stdout.split())
    assert "total: epsilon 1" in flat and "budget: 5 -> 4" in flat, flat
    assert "at 1,000 rows" in flat, flat
    assert "3 queries released with one debit; remaining 4" in flat, flat
    assert _spent(scenario) == 1


def test_the_cli_quotes_a_sql_workload(scenario: Scenario, tmp_path: Path) -> None:
    s = scenario
    workload = tmp_path / "workload.sql"
    workload.write_text(
        "SELECT bank.segment, COUNT(DISTINCT person) AS people FROM bank JOIN panel\n"
        "GROUP BY bank.segment;\n"
        "SELECT panel.category, AVG(panel.amount) AS spend FROM bank JOIN panel GROUP BY 1;\n"
    )
    token, target = s.analyst.token or "", s.hub.target
    quoted = ok_json(
        run_cli(
            "query", "quote", str(workload), "--epsilon", "0.5", "--json",
            token=token, target=target,
        )
    )  # fmt: skip
    assert (quoted["costs"], quoted["total"]) == (["0.5", "0.5"], "1")
    assert quoted["agreement_id"] == s.agreement_id  # the one agreement joining bank and panel
    mean = quoted["plans"][1]["aggregates"][0]
    assert [int(h["rows"]) for h in mean["ci95_at_rows"]] == [100, 1000, 10000, 100000]
    ran = ok_json(
        run_cli("query", "run", "--quote", quoted["quote_id"], "--json", token=token, target=target)
    )
    assert [r["release"]["status"] for r in ran["results"]] == ["released", "released"]
    assert _spent(s) == 1
    broken = tmp_path / "broken.sql"
    broken.write_text("SELECT COUNT(*) FROM bank JOIN panel; SELECT * FROM bank JOIN panel")
    refused = run_cli("query", "quote", str(broken), "--epsilon", "0.5", token=token, target=target)
    assert "statement 2: SELECT *" in one_line_error(refused, 1)
