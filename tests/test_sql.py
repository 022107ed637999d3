"""DP SQL (entremise.sdk.sql): translation, post-processing, refusals, and end to end.

(a) Each supported SQL form translates to the query the SDK's builder makes (proto equality).
(b) Through real gRPC: a SQL preview plans what the equivalent builder query plans; a SQL run
    releases values and applies HAVING / ORDER BY / LIMIT; `query sql --json` prints the
    document `query run --json` prints. Tests marked "hub: ..." in their docstring use the
    query model's newer features (OR filters, < and >, STDDEV, bins): they pass once the hub's
    planner implements them.
(c) Every refused construct gives its one-line message.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from entremise.sdk import Client, Query, QueryError, RPCError, SqlRefusal, translate
from entremise.sdk.results import Agreement, AgreementStatus
from entremise.sdk.sql import (
    AllOf,
    AnyOf,
    Compare,
    Negate,
    OrderKey,
    PostProcessing,
    choose_agreement,
    describe,
    post_process,
)
from entremise.v1 import query_service_pb2 as q
from tests.conftest import Hub, Scenario, build_scenario, start_hub
from tests.test_cli import run_cli

AG = "ag_test"
JOIN = "FROM bank JOIN panel"


def message(sql: str, **budget: str) -> q.Query:
    return translate(sql).message(AG, epsilon=budget.get("epsilon", "1"))


# -- (a) the translation equals the builder's query ----------------------------------------------

BUILDER_FORMS = [
    (f"SELECT COUNT(*) AS n {JOIN}", Query(AG, "1").count_rows(name="n")),
    (f"SELECT COUNT(*) -- rows\n{JOIN}", Query(AG, "1").count_rows(name="count")),
    (
        "SELECT COUNT(DISTINCT person) AS people, AVG(panel.amount) AS spend "
        "FROM bank JOIN panel USING (person)",
        Query(AG, "1").count(name="people").mean("panel.amount", name="spend"),
    ),
    (
        "SELECT bank.segment, COUNT(DISTINCT person) AS people FROM bank INNER JOIN panel "
        "ON bank.person = panel.person GROUP BY bank.segment",
        Query(AG, "1").count(name="people").group_by("bank.segment"),
    ),
    (
        "SELECT b.segment AS seg, SUM(p.amount) FROM bank AS b JOIN panel p "
        "ON b.person = p.person GROUP BY seg",
        Query(AG, "1").sum("panel.amount", name="sum").group_by("bank.segment"),
    ),
    (
        f"SELECT panel.category, bank.segment, AVG(panel.amount) AS m {JOIN} GROUP BY 2, 1",
        Query(AG, "1").mean("panel.amount", name="m").group_by("bank.segment", "panel.category"),
    ),
    (
        "SELECT PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY panel.amount) AS p90, "
        f"MEDIAN(panel.amount) {JOIN}",
        Query(AG, "1")
        .quantile("panel.amount", 0.9, name="p90")
        .median("panel.amount", name="median"),
    ),
    (
        f"SELECT VAR_POP(panel.amount) AS v, VARIANCE(bank.investable_assets) {JOIN}",
        Query(AG, "1")
        .variance("panel.amount", name="v")
        .variance("bank.investable_assets", name="variance"),
    ),
    (
        f"SELECT COUNT(*) /* accuracy 20 */ AS n, AVG(panel.amount) AS m /* epsilon 0.2 */ {JOIN}",
        Query(AG, "1")
        .count_rows(name="n", target_ci95=20)
        .mean("panel.amount", name="m", epsilon="0.2"),
    ),
    (
        f"SELECT COUNT(*) AS n {JOIN} WHERE panel.category = 'travel'",
        Query(AG, "1").count_rows(name="n").where("panel.category", "travel"),
    ),
    (
        f"SELECT COUNT(*) AS n {JOIN} WHERE panel.category IN ('travel', 'fashion') "
        "AND bank.segment <> 'private' AND panel.week NOT IN ('w01', 'w02')",
        Query(AG, "1")
        .count_rows(name="n")
        .where("panel.category", "travel", "fashion")
        .where_not("bank.segment", "private")
        .where_not("panel.week", "w01", "w02"),
    ),
    (
        f"SELECT COUNT(*) AS n {JOIN} WHERE panel.amount >= 50 AND 200 >= panel.amount",
        Query(AG, "1")
        .count_rows(name="n")
        .at_least("panel.amount", 50)
        .at_most("panel.amount", 200),
    ),
    (
        f"SELECT COUNT(*) AS n {JOIN} WHERE panel.amount BETWEEN 10.5 AND 100",
        Query(AG, "1")
        .count_rows(name="n")
        .at_least("panel.amount", 10.5)
        .at_most("panel.amount", 100),
    ),
    (
        f"SELECT COUNT(*) AS n {JOIN} "
        "WHERE NOT (panel.category = 'travel' OR bank.segment != 'mass')",
        Query(AG, "1")
        .count_rows(name="n")
        .where_not("panel.category", "travel")
        .where("bank.segment", "mass"),
    ),
    (
        f"SELECT COUNT(*) AS n {JOIN} "
        "WHERE NOT panel.amount < 50 AND NOT panel.category NOT IN ('beauty')",
        Query(AG, "1")
        .count_rows(name="n")
        .at_least("panel.amount", 50)
        .where("panel.category", "beauty"),
    ),
    (
        f"SELECT bank.segment AS s, COUNT(*) AS n {JOIN} GROUP BY s HAVING COUNT(*) > 3 "
        "ORDER BY n DESC LIMIT 2",
        Query(AG, "1").count_rows(name="n").group_by("bank.segment"),
    ),
]


@pytest.mark.parametrize(("sql", "built"), BUILDER_FORMS, ids=[f[0][:60] for f in BUILDER_FORMS])
def test_each_form_translates_to_the_builders_query(sql: str, built: Query) -> None:
    assert message(sql) == built.build()


def _leaf(column: str, op: int, *values: str) -> q.Filter:
    return q.Filter(column=column, op=op, values=list(values))


NEW_FORMS = [
    (
        f"SELECT COUNT(*) AS n {JOIN} WHERE panel.category = 'travel' OR panel.amount > 100",
        q.Query(
            aggregates=[q.Aggregate(name="n", kind=q.AGGREGATE_KIND_COUNT_ROWS)],
            filters=[
                q.Filter(
                    any_of=[
                        _leaf("panel.category", q.FILTER_OP_IN, "travel"),
                        _leaf("panel.amount", q.FILTER_OP_GT, "100.0"),
                    ]
                )
            ],
        ),
    ),
    (
        f"SELECT COUNT(*) AS n {JOIN} "
        "WHERE panel.amount NOT BETWEEN 10 AND 20 AND 5 > panel.amount",
        q.Query(
            aggregates=[q.Aggregate(name="n", kind=q.AGGREGATE_KIND_COUNT_ROWS)],
            filters=[
                q.Filter(
                    any_of=[
                        _leaf("panel.amount", q.FILTER_OP_LT, "10.0"),
                        _leaf("panel.amount", q.FILTER_OP_GT, "20.0"),
                    ]
                ),
                _leaf("panel.amount", q.FILTER_OP_LT, "5.0"),
            ],
        ),
    ),
    (
        f"SELECT COUNT(*) AS n {JOIN} WHERE (panel.category = 'travel' AND panel.amount < 3) "
        "OR (panel.category = 'beauty' OR panel.category = 'fashion')",
        q.Query(
            aggregates=[q.Aggregate(name="n", kind=q.AGGREGATE_KIND_COUNT_ROWS)],
            filters=[
                q.Filter(
                    any_of=[
                        q.Filter(
                            all_of=[
                                _leaf("panel.category", q.FILTER_OP_IN, "travel"),
                                _leaf("panel.amount", q.FILTER_OP_LT, "3.0"),
                            ]
                        ),
                        _leaf("panel.category", q.FILTER_OP_IN, "beauty"),
                        _leaf("panel.category", q.FILTER_OP_IN, "fashion"),
                    ]
                )
            ],
        ),
    ),
    (
        f"SELECT STDDEV(panel.amount) AS sd, STDDEV_POP(panel.amount) AS sp {JOIN}",
        q.Query(
            aggregates=[
                q.Aggregate(name="sd", kind=q.AGGREGATE_KIND_STDDEV, column="panel.amount"),
                q.Aggregate(name="sp", kind=q.AGGREGATE_KIND_STDDEV, column="panel.amount"),
            ]
        ),
    ),
    (
        "SELECT DATE_TRUNC('month', panel.purchased_on) AS month, COUNT(*) AS n "
        f"{JOIN} WHERE panel.purchased_on >= DATE '2026-03-01' GROUP BY 1",
        q.Query(
            aggregates=[q.Aggregate(name="n", kind=q.AGGREGATE_KIND_COUNT_ROWS)],
            group_by=["month:panel.purchased_on"],
            filters=[_leaf("panel.purchased_on", q.FILTER_OP_GE, "2026-03-01")],
        ),
    ),
    (
        f"SELECT COUNT(*) AS n {JOIN} "
        "GROUP BY DATE_TRUNC('week', panel.purchased_on), date_trunc('day', panel.purchased_on)",
        q.Query(
            aggregates=[q.Aggregate(name="n", kind=q.AGGREGATE_KIND_COUNT_ROWS)],
            group_by=["week:panel.purchased_on", "day:panel.purchased_on"],
        ),
    ),
    (
        f"SELECT WIDTH_BUCKET(panel.amount, 0, 200, 4) AS b, COUNT(*) AS n {JOIN} GROUP BY b",
        q.Query(
            aggregates=[q.Aggregate(name="n", kind=q.AGGREGATE_KIND_COUNT_ROWS)],
            group_by=["bins:panel.amount:0,50,100,150,200"],
        ),
    ),
    (
        "SELECT CASE WHEN panel.amount < 50 THEN 'small' WHEN panel.amount < 200 THEN 'medium' "
        f"ELSE 'large' END AS size, COUNT(*) AS n {JOIN} GROUP BY 1",
        q.Query(
            aggregates=[q.Aggregate(name="n", kind=q.AGGREGATE_KIND_COUNT_ROWS)],
            group_by=["bins:panel.amount:50,200:small|medium|large"],
        ),
    ),
]


@pytest.mark.parametrize(("sql", "expected"), NEW_FORMS, ids=[f[0][:60] for f in NEW_FORMS])
def test_the_new_forms_translate_to_filter_trees_and_derived_groupings(
    sql: str, expected: q.Query
) -> None:
    expected.agreement_id, expected.epsilon = AG, "1"
    assert message(sql) == expected


def test_outputs_datasets_and_post_processing_are_kept() -> None:
    sql = translate(
        "SELECT b.segment AS seg, COUNT(DISTINCT person) AS people, AVG(p.amount) "
        "FROM bank b JOIN panel p USING (person) GROUP BY 1 "
        "HAVING COUNT(DISTINCT person) > 10 AND NOT avg BETWEEN 1 AND 2 OR seg IN ('mass') "
        "ORDER BY avg DESC, 1 LIMIT 5 OFFSET 1"
    )
    assert sql.datasets == ("bank", "panel")
    assert sql.columns == ("seg", "people", "avg")
    assert sql.post == PostProcessing(
        having=AnyOf(
            (
                AllOf(
                    (
                        Compare("people", ">", 10.0),
                        Negate(AllOf((Compare("avg", ">=", 1.0), Compare("avg", "<=", 2.0)))),
                    )
                ),
                AnyOf((Compare("seg", "=", "mass"),)),
            )
        ),
        order_by=(OrderKey("avg", descending=True), OrderKey("seg")),
        limit=5,
        offset=1,
    )
    assert any("HAVING" in line for line in describe(sql))


def test_post_processing_is_sql_on_the_released_rows() -> None:
    rows: list[dict[str, str | float | None]] = [
        {"g": "a", "n": 5.0},
        {"g": "b", "n": None},
        {"g": "c", "n": 9.0},
        {"g": "d", "n": 5.0},
        {"g": "e", "n": 1.0},
    ]
    assert PostProcessing().select(rows) == [0, 1, 2, 3, 4]
    # NULLs last ascending, first descending; ties keep the hub's order.
    assert PostProcessing(order_by=(OrderKey("n"),)).select(rows) == [4, 0, 3, 2, 1]
    assert PostProcessing(order_by=(OrderKey("n", True),)).select(rows) == [1, 2, 0, 3, 4]
    assert PostProcessing(order_by=(OrderKey("n", True), OrderKey("g", True))).select(rows) == [
        1,
        2,
        3,
        0,
        4,
    ]
    # A comparison with NULL is unknown: the row is not kept, nor under NOT.
    having = Compare("n", ">", 4.0)
    assert PostProcessing(having=having).select(rows) == [0, 2, 3]
    assert PostProcessing(having=Negate(having)).select(rows) == [4]
    assert PostProcessing(order_by=(OrderKey("g", True),), limit=2, offset=1).select(rows) == [3, 2]


def test_post_process_keeps_the_cells_of_the_kept_groups_in_order() -> None:
    sql = translate(
        f"SELECT bank.segment AS s, COUNT(*) AS n, AVG(panel.amount) AS m {JOIN} GROUP BY 1 "
        "HAVING n > 1 ORDER BY m LIMIT 2"
    )
    counts = q.AggregateResult(name="n", kind=q.AGGREGATE_KIND_COUNT_ROWS)
    means = q.AggregateResult(name="m", kind=q.AGGREGATE_KIND_MEAN, column="panel.amount")
    for group, n, m in (
        ("mass", 10, 30.0),
        ("affluent", 1, 10.0),
        ("private", 5, 20.0),
        ("x", 7, 50.0),
    ):
        counts.cells.add(group=[group], value=n, ci95_halfwidth=2)
        means.cells.add(group=[group], value=m)
    out = post_process(sql, [counts, means])
    assert [list(c.group) for c in out[0].cells] == [["private"], ["mass"]]
    assert [c.value for c in out[1].cells] == [20.0, 30.0]
    assert sql.rows([counts, means])[0] == {"s": "mass", "n": 10.0, "m": 30.0}


# -- agreement resolution (pure) ----------------------------------------------------------------


def _agreement(
    agreement_id: str, *names: str, status: AgreementStatus = AgreementStatus.ACTIVE
) -> Agreement:
    from entremise.v1 import agreement_service_pb2 as a

    msg = a.Agreement(
        agreement_id=agreement_id,
        name=agreement_id,
        status=int(status),  # type: ignore[arg-type]
        datasets=[a.DatasetSlot(partner_id="p", name=n) for n in names],
    )
    return Agreement.from_proto(msg)


def test_the_agreement_is_the_one_active_agreement_joining_the_from_datasets() -> None:
    sql = translate(f"SELECT COUNT(*) {JOIN}")
    one = _agreement("ag_1", "bank", "panel")
    other = _agreement("ag_2", "bank", "panel", "telco")
    old = _agreement("ag_3", "panel", "bank", status=AgreementStatus.REVOKED)
    assert choose_agreement(sql, [other, one, old]) is one
    with pytest.raises(
        SqlRefusal, match=r"^FROM bank, panel: several active agreements .*ag_1.*ag_4"
    ):
        choose_agreement(sql, [one, _agreement("ag_4", "panel", "bank")])
    with pytest.raises(
        SqlRefusal, match=r"none of your active agreements .*ag_2 \(bank, panel, telco\)"
    ):
        choose_agreement(sql, [other, old])


# -- (c) refusals ----------------------------------------------------------------------------

REFUSALS = [
    ("SELECT * FROM bank JOIN panel", "SELECT *: would release rows; select aggregates"),
    (f"SELECT panel.amount {JOIN}", "panel.amount: must appear in GROUP BY"),
    (f"SELECT bank.segment, COUNT(*) {JOIN}", "bank.segment: must appear in GROUP BY"),
    (f"SELECT bank.segment {JOIN} GROUP BY 1", "no aggregate in the select list"),
    (
        f"SELECT COUNT(*) {JOIN} WHERE panel.amount IN (SELECT 1)",
        "subqueries are not supported",
    ),
    ("SELECT COUNT(*) FROM (SELECT 1) AS t", "subqueries are not supported"),
    ("WITH t AS (SELECT 1) SELECT COUNT(*) FROM t", "WITH (a common table expression)"),
    (f"SELECT COUNT(*) {JOIN} UNION SELECT COUNT(*) {JOIN}", "UNION: one SELECT only"),
    (f"SELECT COUNT(*) {JOIN} INTERSECT SELECT COUNT(*) {JOIN}", "INTERSECT: one SELECT only"),
    (f"SELECT COUNT(*) {JOIN} EXCEPT SELECT COUNT(*) {JOIN}", "EXCEPT: one SELECT only"),
    (f"SELECT SUM(panel.amount) OVER () {JOIN}", "window functions are not supported"),
    (f"SELECT DISTINCT bank.segment {JOIN}", "SELECT DISTINCT: would release rows"),
    (
        "SELECT COUNT(*) FROM bank LEFT JOIN panel ON bank.person = panel.person",
        "LEFT JOIN: the hub joins on the person only: inner join",
    ),
    ("SELECT COUNT(*) FROM bank RIGHT JOIN panel USING (person)", "RIGHT JOIN: the hub joins"),
    ("SELECT COUNT(*) FROM bank FULL OUTER JOIN panel USING (person)", "FULL OUTER JOIN: the hub"),
    ("SELECT COUNT(*) FROM bank CROSS JOIN panel", "CROSS JOIN: the hub joins on the person only"),
    ("SELECT COUNT(*) FROM bank, panel", "write JOIN panel: the hub joins on the person only"),
    (
        "SELECT COUNT(*) FROM bank JOIN panel ON bank.segment = panel.category",
        "the hub joins on the person only: ON a.person = b.person",
    ),
    ("SELECT COUNT(*) FROM bank JOIN panel USING (email)", "USING (person)"),
    (f"SELECT SUM(panel.amount * 2) {JOIN}", "aggregates take a column, not an expression"),
    (f"SELECT SUM(panel.amount) / COUNT(*) {JOIN}", "arithmetic on aggregates is not supported"),
    (f"SELECT COUNT(panel.amount) {JOIN}", "COUNT of a column is not supported"),
    (f"SELECT COUNT(DISTINCT panel.category) {JOIN}", "COUNT of a column is not supported"),
    (f"SELECT COUNT(*) {JOIN} WHERE panel.category IS NULL", "IS NULL is not supported"),
    (
        f"SELECT COUNT(*) {JOIN} WHERE panel.category LIKE 'tr%'",
        "pattern matching is not supported",
    ),
    (f"SELECT MAX(panel.amount) {JOIN}", "MAX(panel.amount): not a supported aggregate"),
    (f"SELECT COUNT(*) {JOIN} GROUP BY LOWER(panel.category)", "not a supported grouping"),
    ("INSERT INTO bank VALUES (1)", "INSERT: the hub answers SELECT only"),
    ("UPDATE bank SET segment = 'x'", "UPDATE: the hub answers SELECT only"),
    ("DELETE FROM bank", "DELETE: the hub answers SELECT only"),
    (f"SELECT COUNT(*) {JOIN}; SELECT COUNT(*) {JOIN}", "2 statements: give one SELECT"),
    ("SELECT COUNT(* FROM bank", "SQL does not parse at line 1, column"),
    (f"SELECT COUNT(*) {JOIN} WHERE panel.category = panel.week", "compares with a literal"),
    (
        f"SELECT COUNT(*) {JOIN} WHERE panel.amount > 'abc'",
        "a range compares with a number or DATE",
    ),
    (f"SELECT COUNT(*) {JOIN} WHERE x.amount > 1", "x.amount: no dataset x in FROM"),
    (f"SELECT COUNT(*) {JOIN} GROUP BY DATE_TRUNC('year', panel.d)", "'month', 'week' or 'day'"),
    (
        f"SELECT COUNT(*) {JOIN} GROUP BY WIDTH_BUCKET(panel.amount, 10, 0, 2)",
        "low is below its high",
    ),
    (
        f"SELECT COUNT(*) {JOIN} GROUP BY CASE WHEN panel.amount < 5 THEN 'a' END",
        "CASE needs an ELSE",
    ),
    (
        f"SELECT COUNT(*) {JOIN} GROUP BY CASE WHEN panel.amount <= 5 THEN 'a' ELSE 'b' END",
        "CASE bins take WHEN column < number",
    ),
    (
        f"SELECT COUNT(*) {JOIN} GROUP BY CASE WHEN panel.amount < 9 THEN 'a' "
        "WHEN panel.amount < 5 THEN 'b' ELSE 'c' END",
        "CASE bins take increasing bounds",
    ),
    (
        f"SELECT COUNT(*) AS n {JOIN} HAVING SUM(panel.amount) > 1",
        "HAVING uses aggregates of the select list only",
    ),
    (
        f"SELECT COUNT(*) AS n {JOIN} ORDER BY panel.amount",
        "ORDER BY takes columns of the select list",
    ),
    (f"SELECT COUNT(*) AS n {JOIN} ORDER BY 3", "ORDER BY position 3 is not in the select list"),
    (f"SELECT COUNT(*), COUNT(DISTINCT person) {JOIN}", "two output columns named 'count'"),
    (f'SELECT COUNT(*) AS "Total" {JOIN}', "aggregate name 'Total'"),
    (f"SELECT COUNT(*) /* accuracy twenty */ AS n {JOIN}", "/* accuracy N */ or /* epsilon E */"),
    (f"SELECT VAR_SAMP(panel.amount) AS v, person {JOIN}", "would release the person"),
    (
        f"SELECT PERCENTILE_DISC(0.5) WITHIN GROUP (ORDER BY panel.amount) {JOIN}",
        "the only ordered-set aggregate is PERCENTILE_CONT",
    ),
    (
        f"SELECT PERCENTILE_CONT(1.5) WITHIN GROUP (ORDER BY panel.amount) {JOIN}",
        "level is between 0 and 1",
    ),
    (f"SELECT COUNT(*) {JOIN} WHERE panel.category = NULL", "comparisons with NULL are never true"),
    (f"SELECT COUNT(*) {JOIN} LIMIT 1.5", "LIMIT takes a whole number"),
    ("SELECT COUNT(*)", "name the agreement's datasets in FROM"),
]


@pytest.mark.parametrize(("sql", "says"), REFUSALS, ids=[r[1][:50] for r in REFUSALS])
def test_every_refusal_names_the_construct_in_one_line(sql: str, says: str) -> None:
    with pytest.raises(SqlRefusal) as caught:
        translate(sql)
    text = str(caught.value)
    assert says in text
    assert "\n" not in text
    assert isinstance(caught.value, QueryError)


# -- (b) end to end through gRPC -----------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """One SQLite hub with bank + panel uploaded and an analyst (the module's tests share it)."""
    tmp = tmp_path_factory.mktemp("sql")
    hub: Hub = start_hub(tmp / "hub", f"sqlite:///{tmp / 'hub.db'}")
    try:
        yield build_scenario(hub, total_epsilon="100")
    finally:
        hub.admin.close()
        hub.running.stop(grace=None)


E2E_FORMS = [f for f in BUILDER_FORMS if "accuracy" not in f[0]]


@pytest.mark.parametrize(("sql", "built"), E2E_FORMS, ids=[f[0][:60] for f in E2E_FORMS])
def test_a_sql_preview_plans_what_the_builders_query_plans(
    hub_data: Scenario, sql: str, built: Query
) -> None:
    analyst = hub_data.analyst
    plan = analyst.sql_preview(sql, epsilon="1")
    expected = analyst.preview(
        Query(
            hub_data.agreement_id,
            "1",
            aggregates=built.aggregates,
            grouped_by=built.grouped_by,
            filters=built.filters,
        )
    )
    assert plan.raw == expected.raw


def test_accuracy_comments_and_options_ask_the_hub_for_a_half_width(hub_data: Scenario) -> None:
    plan = hub_data.analyst.sql_preview(
        "SELECT COUNT(*) /* accuracy 40 */ AS n, COUNT(DISTINCT person) AS people, "
        f"AVG(panel.amount) AS spend {JOIN}",
        epsilon="1",
        accuracy={"people": 30},
    )
    by_name = {a.name: a for a in plan.aggregates}
    assert by_name["n"].ci95_halfwidth == pytest.approx(40, rel=0.05)
    assert by_name["people"].ci95_halfwidth == pytest.approx(30, rel=0.05)
    with pytest.raises(SqlRefusal, match="accuracy nobody: no aggregate of that name"):
        hub_data.analyst.sql_preview(
            f"SELECT COUNT(*) AS n {JOIN}", epsilon="1", accuracy={"nobody": 3}
        )


def test_a_sql_run_releases_and_post_processes_the_cells(hub_data: Scenario) -> None:
    result = hub_data.analyst.sql_run(
        "SELECT bank.segment AS segment, COUNT(DISTINCT person) AS people, "
        "AVG(panel.amount) AS spend FROM bank JOIN panel GROUP BY 1 "
        "HAVING COUNT(DISTINCT person) > -1000000 ORDER BY people DESC LIMIT 2",
        epsilon="1",
    )
    people, spend = result.release.results
    values = [c.value for c in people.cells]
    assert len(values) == 2 and all(v is not None for v in values)
    assert values == sorted(values, reverse=True)  # type: ignore[type-var]
    assert [c.group for c in spend.cells] == [c.group for c in people.cells]
    # The full release stays in raw: every segment.
    assert len(result.raw.release.results[0].cells) == 3
    assert float(result.release.epsilon_spent) == 1


def test_from_must_name_the_agreements_datasets(hub_data: Scenario) -> None:
    analyst = hub_data.analyst
    with pytest.raises(SqlRefusal, match=r"^FROM bank: none of your active agreements"):
        analyst.sql_preview("SELECT COUNT(*) FROM bank", epsilon="1")
    with pytest.raises(SqlRefusal, match="missing panel \\(the hub always joins them all\\)"):
        analyst.sql_preview(
            "SELECT COUNT(*) FROM bank", epsilon="1", agreement_id=hub_data.agreement_id
        )
    with pytest.raises(SqlRefusal, match="FROM telco: not a dataset of agreement"):
        analyst.sql_preview(
            "SELECT COUNT(*) FROM bank JOIN panel JOIN telco",
            epsilon="1",
            agreement_id=hub_data.agreement_id,
        )
    with pytest.raises(SqlRefusal, match="no budget"):
        analyst.sql_preview(f"SELECT COUNT(*) {JOIN}")
    with pytest.raises(RPCError):  # the hub's own checks still apply (an unknown column)
        analyst.sql_preview(f"SELECT SUM(panel.nothing) AS s {JOIN}", epsilon="1")


def _keys(document: object) -> object:
    """The shape of a JSON document: its keys, recursively (first element of each list)."""
    if isinstance(document, dict):
        return {k: _keys(v) for k, v in document.items()}
    if isinstance(document, list):
        return [_keys(document[0])] if document else []
    return type(document).__name__


def test_query_sql_json_is_query_runs_document(hub_data: Scenario) -> None:
    token, target = hub_data.analyst.token, hub_data.hub.target
    assert token
    sql = (
        "SELECT bank.segment, COUNT(DISTINCT person) AS people FROM bank JOIN panel "
        "GROUP BY bank.segment ORDER BY people LIMIT 2"
    )
    ran = run_cli("query", "sql", sql, "--epsilon", "0.5", "--json", token=token, target=target)
    assert ran.returncode == 0, ran.stderr
    document = json.loads(ran.stdout)
    cells = document["release"]["results"][0]["cells"]
    assert len(cells) == 2
    assert cells[0]["value"] <= cells[1]["value"]
    plain = run_cli(
        "query", "run", "--agreement", hub_data.agreement_id, "--epsilon", "0.5",
        "--agg", "count", "--group-by", "bank.segment", "--json",
        token=token, target=target,
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    assert _keys(document) == _keys(json.loads(plain.stdout))

    preview = run_cli(
        "query", "sql", sql, "--epsilon", "0.5", "--preview", "--json", token=token, target=target
    )
    plain_preview = run_cli(
        "query", "preview", "--agreement", hub_data.agreement_id, "--epsilon", "0.5",
        "--agg", "count", "--group-by", "bank.segment", "--json", token=token, target=target,
    )  # fmt: skip
    assert preview.returncode == 0, preview.stderr
    assert _keys(json.loads(preview.stdout)) == _keys(json.loads(plain_preview.stdout))


def test_query_sql_human_output_and_one_line_errors(hub_data: Scenario) -> None:
    token, target = hub_data.analyst.token, hub_data.hub.target
    assert token
    shown = run_cli(
        "query", "sql",
        "SELECT bank.segment, COUNT(*) /* accuracy 400 */ AS n, AVG(panel.amount) AS spend "
        "FROM bank JOIN panel WHERE panel.category IN ('travel', 'fashion') GROUP BY 1 "
        "HAVING n > 5 ORDER BY spend DESC",
        "--epsilon", "1", "--preview", token=token, target=target,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "The SQL reads as:" in out
    assert "n: count of joined rows; share: the share giving a 95% half-width of 400" in out
    assert "spend: mean of panel.amount; share: an even split of the rest" in out
    assert "where panel.category in (travel, fashion)" in out
    assert "HAVING n > 5; ORDER BY spend DESC" in out
    ran = run_cli(
        "query", "sql",
        "SELECT bank.segment, COUNT(*) AS n, COUNT(DISTINCT person) AS people "
        "FROM bank JOIN panel GROUP BY 1 ORDER BY n DESC",
        "--epsilon", "1", "--accuracy", "n=400", token=token, target=target,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "count of joined rows" in ran.stdout and "release " in ran.stdout
    refused = run_cli(
        "query", "sql", "SELECT * FROM bank", "--epsilon", "1", token=token, target=target
    )
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "error: SELECT *: would release rows; select aggregates"
    ]
    bad = run_cli("query", "sql", f"SELECT COUNT(*) {JOIN}", "--epsilon", "1", "--accuracy", "n:3",
                  token=token, target=target)  # fmt: skip
    assert bad.returncode == 1 and "--accuracy 'n:3': expected NAME=HALFWIDTH" in bad.stderr
    budget = run_cli("query", "sql", f"SELECT COUNT(*) {JOIN}", token=token, target=target)
    assert budget.returncode == 1 and "give --epsilon" in budget.stderr


# -- the hub's newer query model (pass once server/ implements it) -------------------------------

HUB_FORMS = [f for f in NEW_FORMS if "purchased_on" not in f[0]]


@pytest.mark.parametrize(("sql", "expected"), HUB_FORMS, ids=[f[0][:60] for f in HUB_FORMS])
def test_the_hub_plans_and_releases_the_new_forms(
    hub_data: Scenario, sql: str, expected: q.Query
) -> None:
    """hub: OR trees, < and >, NOT BETWEEN, STDDEV, WIDTH_BUCKET and CASE bins."""
    analyst = hub_data.analyst
    expected.agreement_id, expected.epsilon = hub_data.agreement_id, "0.5"
    assert analyst.sql_preview(sql, epsilon="0.5").raw == analyst.preview(expected).raw
    result = analyst.sql_run(sql, epsilon="0.5")
    cells = result.release.results[0].cells
    assert cells and all(c.value is not None and math.isfinite(c.value) for c in cells)


def test_labelled_bins_release_one_row_per_label(hub_data: Scenario) -> None:
    """hub: CASE bins with labels."""
    result = hub_data.analyst.sql_run(
        "SELECT CASE WHEN panel.amount < 50 THEN 'small' WHEN panel.amount < 200 THEN 'medium' "
        "ELSE 'large' END AS size, COUNT(*) AS n FROM bank JOIN panel GROUP BY size "
        "ORDER BY n DESC",
        epsilon="0.5",
    )
    groups = {c.group[0] for c in result.release.results[0].cells}
    assert groups == {"small", "medium", "large"}


def test_client_sql_works_with_a_fresh_client(hub_data: Scenario, tmp_path: Path) -> None:
    token = hub_data.analyst.token
    with Client.connect(hub_data.hub.target, token=token) as client:
        request = client.sql_request(f"SELECT COUNT(*) AS n {JOIN}", epsilon=0.25)
    assert request.agreement.agreement_id == hub_data.agreement_id
    assert request.message.epsilon == "0.25"
