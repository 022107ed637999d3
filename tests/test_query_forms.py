"""The query forms DP SQL needs, planned and computed exactly against a pandas ground truth.

Filters with OR, NOT (as the complementary comparison), strict comparisons and lists of
numbers or dates; groupings by a date's month, week or day and by numeric bins; standard
deviations. Each test builds two consented datasets as Arrow tables, plans the query with the
hub's planner and runs DuckDB's exact (pre-noise) aggregation, then recomputes the same numbers
with pandas. The caps are set so that no person is cut, so the two must agree exactly.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy.stats import binom

from entremise.privacy.budget import Epsilon
from entremise.server.domain import derived
from entremise.server.domain.errors import InvalidArgumentError
from entremise.server.domain.models import (
    AggregateKind,
    AggregateSpec,
    Agreement,
    AgreementStatus,
    CategoricalColumn,
    ConsentSpec,
    Dataset,
    DatasetSchema,
    DatasetSlot,
    DateColumn,
    Derivation,
    ExactAggregates,
    FilterOp,
    FilterSpec,
    IdentifierKind,
    KeyColumn,
    NumericColumn,
    QueryPlan,
    QuerySpec,
)
from entremise.server.domain.planner import plan_query
from entremise.server.domain.releasing import release
from entremise.server.engine import DuckDBEngine

PURPOSE = "research"
NOW = "2026-11-27T00:00:00+00:00"
SEGMENTS = ("mass", "affluent", "private")
CATEGORIES = ("food", "travel", "tech")
BOUGHT = DateColumn("bought_on", "2026-01-01", "2026-06-30")
AMOUNT = NumericColumn("amount", 0.0, 500.0, 0.01)


def _schema(*columns: object) -> DatasetSchema:
    return DatasetSchema(
        keys=(KeyColumn("email", IdentifierKind.EMAIL),),
        consents=(ConsentSpec(PURPOSE, f"consent_{PURPOSE}"),),
        columns=tuple(columns),  # type: ignore[arg-type]
    )


def _dataset(index: int, name: str, schema: DatasetSchema, rows: int) -> Dataset:
    return Dataset(f"ds{index}", name, f"p{index}", "ag", schema, rows, rows, 1, "", NOW, "", 0)


World = tuple[pd.DataFrame, pd.DataFrame]


@pytest.fixture(scope="module")
def world() -> World:
    """600 bank customers (one row each) and their purchases (0-6 each), some not consenting."""
    rng = np.random.default_rng(16)
    people = [f"{i:064x}" for i in range(600)]
    bank = pd.DataFrame(
        {
            "email": people,
            f"consent_{PURPOSE}": rng.random(600) < 0.9,
            "segment": rng.choice(SEGMENTS, 600),
            "income": rng.uniform(500, 9000, 600).round(2),
        }
    )
    counts = rng.integers(0, 7, 600)
    emails = np.repeat(people, counts)
    n = len(emails)
    days = rng.integers(-20, 200, n)  # some before and after the declared bounds
    bought = [dt.date(2026, 1, 1) + dt.timedelta(days=int(d)) for d in days]
    amounts = rng.uniform(-40, 640, n).round(2)  # some outside [0, 500]: clamped
    amounts[::37] = np.nan
    panel = pd.DataFrame(
        {
            "email": emails,
            f"consent_{PURPOSE}": rng.random(n) < 0.95,
            "category": rng.choice(CATEGORIES, n),
            "amount": amounts,
            "bought_on": bought,
        }
    )
    return bank, panel


def _run(
    world: World,
    aggregates: tuple[AggregateSpec, ...],
    *,
    group_by: tuple[str, ...] = (),
    filters: tuple[FilterSpec, ...] = (),
    epsilon: str = "1",
) -> tuple[QueryPlan, ExactAggregates]:
    bank, panel = world
    datasets = (
        _dataset(
            0,
            "bank",
            _schema(CategoricalColumn("segment", SEGMENTS), NumericColumn("income", 0, 10000)),
            len(bank),
        ),
        _dataset(
            1,
            "panel",
            _schema(CategoricalColumn("category", CATEGORIES), AMOUNT, BOUGHT),
            len(panel),
        ),
    )
    agreement = Agreement(
        "ag",
        "forms",
        PURPOSE,
        (DatasetSlot("p0", "bank"), DatasetSlot("p1", "panel")),
        ("analyst",),
        Epsilon.parse("10"),
        max_rows_per_person=8,  # no one has more: nothing is cut
        max_groups_per_person=0,
        created_at=NOW,
        status=AgreementStatus.ACTIVE,
    )
    spec = QuerySpec("ag", aggregates, Epsilon.parse(epsilon), group_by=group_by, filters=filters)
    plan = plan_query(spec, agreement, datasets)
    tables = [
        pa.Table.from_pandas(bank, preserve_index=False),
        pa.Table.from_pandas(panel, preserve_index=False),
    ]
    exact = DuckDBEngine(threads=1).compute(plan, tables, set(), NOW)
    return plan, exact


def _joined(world: World) -> pd.DataFrame:
    bank, panel = world
    consent = f"consent_{PURPOSE}"
    return (
        bank[bank[consent]]
        .drop(columns=consent)
        .merge(panel[panel[consent]].drop(columns=consent), on="email")
    )


def _count_rows() -> AggregateSpec:
    return AggregateSpec("n", AggregateKind.COUNT_ROWS)


def _people() -> AggregateSpec:
    return AggregateSpec("people", AggregateKind.COUNT)


def leaf(column: str, op: FilterOp, *values: str) -> FilterSpec:
    return FilterSpec(column, op, tuple(values))


def any_of(*terms: FilterSpec) -> FilterSpec:
    return FilterSpec("", FilterOp.IN, (), any_of=terms)


def all_of(*terms: FilterSpec) -> FilterSpec:
    return FilterSpec("", FilterOp.IN, (), all_of=terms)


FILTER_CASES = [
    (
        "or of a category and a strict amount",
        any_of(
            leaf("panel.category", FilterOp.IN, "travel"), leaf("panel.amount", FilterOp.GT, "400")
        ),
        lambda j: (j.category == "travel") | (j.amount > 400),
    ),
    (
        "not between, as < or >",
        any_of(leaf("panel.amount", FilterOp.LT, "100"), leaf("panel.amount", FilterOp.GT, "200")),
        lambda j: (j.amount < 100) | (j.amount > 200),
    ),
    (
        "and inside or",
        any_of(
            all_of(
                leaf("panel.category", FilterOp.IN, "food"), leaf("panel.amount", FilterOp.LE, "50")
            ),
            leaf("panel.category", FilterOp.NOT_IN, "food", "tech"),
        ),
        lambda j: ((j.category == "food") & (j.amount <= 50)) | ~j.category.isin(["food", "tech"]),
    ),
    (
        "date range",
        all_of(
            leaf("panel.bought_on", FilterOp.GE, "2026-03-01"),
            leaf("panel.bought_on", FilterOp.LT, "2026-04-01"),
        ),
        lambda j: (j.bought_on >= dt.date(2026, 3, 1)) & (j.bought_on < dt.date(2026, 4, 1)),
    ),
    (
        "numbers listed",
        leaf("bank.income", FilterOp.NOT_IN, "500", "9000"),
        lambda j: ~j.income.isin([500.0, 9000.0]),
    ),
]


@pytest.mark.parametrize(
    ("name", "condition", "truth"), FILTER_CASES, ids=[c[0] for c in FILTER_CASES]
)
def test_filters_match_the_ground_truth(
    world: World, name: str, condition: FilterSpec, truth: Callable[[pd.DataFrame], pd.Series]
) -> None:
    _, exact = _run(world, (_count_rows(), _people()), filters=(condition,))
    joined = _joined(world)
    # SQL's three-valued logic: a missing amount satisfies no comparison (pandas: NaN < x False).
    kept = joined[truth(joined).fillna(False).astype(bool)]
    assert exact.rows == [len(kept)]
    assert exact.people == [kept.email.nunique()]


def test_an_or_across_datasets_is_refused_naming_them(world: World) -> None:
    condition = any_of(
        leaf("bank.segment", FilterOp.IN, "mass"), leaf("panel.category", FilterOp.IN, "food")
    )
    with pytest.raises(InvalidArgumentError, match=r"OR mixes datasets \['bank', 'panel'\]"):
        _run(world, (_count_rows(),), filters=(condition,))


@pytest.mark.parametrize("period", ["month", "week", "day"])
def test_date_groupings_release_every_period_and_match_the_ground_truth(
    world: World, period: str
) -> None:
    plan, exact = _run(world, (_count_rows(), _people()), group_by=(f"{period}:panel.bought_on",))
    joined = _joined(world)
    inside = joined[
        (joined.bought_on >= BOUGHT.lower_date) & (joined.bought_on <= BOUGHT.upper_date)
    ]
    start = inside.bought_on.map(lambda d: derived.period_start(period, d).isoformat())
    rows = inside.groupby(start).size()
    people = inside.groupby(start).email.nunique()
    keys = [k[0] for k in plan.group_keys]
    # The cells are every period between the public bounds, whatever the data holds.
    expected_cells = {"month": 6, "week": 27, "day": 181}[period]
    assert len(keys) == expected_cells and keys == sorted(keys)
    assert keys[0] <= "2026-01-01" and keys[-1] <= "2026-06-30"
    assert exact.rows == [int(rows.get(k, 0)) for k in keys]
    assert exact.people == [int(people.get(k, 0)) for k in keys]


def test_bins_clamp_values_and_release_only_reachable_cells(world: World) -> None:
    spec = AggregateSpec("total", AggregateKind.SUM, "panel.amount")
    plan, exact = _run(
        world, (_count_rows(), spec), group_by=("bins:panel.amount:0,100,250,500,600",)
    )
    keys = [k[0] for k in plan.group_keys]
    # [0, 500] reaches [0, 100), [100, 250), [250, 500) and [500, 600) (500 itself); not < 0,
    # nor >= 600.
    assert keys == ["[0, 100)", "[100, 250)", "[250, 500)", "[500, 600)"]
    joined = _joined(world).dropna(subset=["amount"])
    clamped = joined.amount.clip(0, 500)
    cell = pd.cut(clamped, [-math.inf, 0, 100, 250, 500, 600, math.inf], right=False).astype(str)
    labels = {
        "[0.0, 100.0)": "[0, 100)",
        "[100.0, 250.0)": "[100, 250)",
        "[250.0, 500.0)": "[250, 500)",
        "[500.0, 600.0)": "[500, 600)",
    }
    truth = joined.assign(cell=cell.map(labels), units=(clamped / 0.01).round().astype(int))
    assert exact.rows == [int((truth.cell == k).sum()) for k in keys]
    assert exact.sums["panel.amount"] == [int(truth.units[truth.cell == k].sum()) for k in keys]


def test_bins_take_labels_like_a_case_expression(world: World) -> None:
    plan, exact = _run(
        world, (_count_rows(),), group_by=("bins:panel.amount:50,200:small|medium|large",)
    )
    assert [k[0] for k in plan.group_keys] == ["small", "medium", "large"]
    joined = _joined(world).dropna(subset=["amount"])
    clamped = joined.amount.clip(0, 500)
    assert exact.rows == [
        int((clamped < 50).sum()),
        int(((clamped >= 50) & (clamped < 200)).sum()),
        int((clamped >= 200).sum()),
    ]


def test_a_date_grouping_crossed_with_a_category(world: World) -> None:
    plan, exact = _run(world, (_count_rows(),), group_by=("bank.segment", "month:panel.bought_on"))
    assert len(plan.group_keys) == 3 * 6
    joined = _joined(world)
    inside = joined[
        (joined.bought_on >= BOUGHT.lower_date) & (joined.bought_on <= BOUGHT.upper_date)
    ]
    month = inside.bought_on.map(lambda d: d.replace(day=1).isoformat())
    rows = inside.groupby([inside.segment, month]).size()
    assert exact.rows == [int(rows.get(k, 0)) for k in plan.group_keys]


def test_stddev_costs_what_variance_costs_and_its_intervals_cover_the_truth(world: World) -> None:
    variance = AggregateSpec("v", AggregateKind.VARIANCE, "panel.amount", Epsilon.parse("5"))
    stddev = AggregateSpec("s", AggregateKind.STDDEV, "panel.amount", Epsilon.parse("5"))
    plan, exact = _run(world, (variance, stddev), group_by=("bank.segment",), epsilon="10")
    v, s = plan.aggregates
    assert [(m.component, m.sensitivity) for m in v.measurements] == [
        (m.component, m.sensitivity) for m in s.measurements
    ]
    joined = _joined(world).dropna(subset=["amount"])
    truth = joined.assign(x=joined.amount.clip(0, 500)).groupby("segment").x.std(ddof=0)
    # Each released interval holds the truth with probability >= 95%; over n independent
    # draws the misses are at most Binomial(n, 0.05), so more than `allowed` misses happen
    # with probability < 1e-6 when the intervals are right.
    draws = 150
    n = draws * len(plan.group_keys)
    allowed = int(binom.isf(1e-6, n, 0.05))
    misses = 0
    for _ in range(draws):
        for cell in release(plan, exact)[1].cells:
            assert cell.value is not None and cell.ci95_halfwidth is not None
            misses += abs(cell.value - truth[cell.group[0]]) > cell.ci95_halfwidth
    assert misses <= allowed, (misses, n)


@pytest.mark.parametrize(
    ("group_by", "message"),
    [
        ("month:panel.amount", "month needs a date column"),
        ("bins:panel.bought_on:1,2", "bins need a numeric column"),
        ("panel.bought_on", "group by month:, week: or day:panel.bought_on"),
        ("panel.amount", "group by its bins"),
        ("bins:panel.amount:5,1", "edges must increase strictly"),
        ("bins:panel.amount:1,x", "edges must be numbers"),
        ("bins:panel.amount:1,2:a|b", "2 edges make 3 bins, but 2 labels"),
        ("quarter:panel.bought_on", "unknown derivation 'quarter'"),
    ],
)
def test_derived_groupings_refuse_what_they_cannot_mean(
    world: World, group_by: str, message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        _run(world, (_count_rows(),), group_by=(group_by,))


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        (leaf("panel.category", FilterOp.LT, "b"), "lt needs a numeric or date column"),
        (leaf("panel.bought_on", FilterOp.GE, "March"), "is not an ISO date"),
        (leaf("panel.amount", FilterOp.IN, "ten"), "is not a number"),
        (leaf("panel.amount", FilterOp.GT, "1", "2"), "takes exactly one number"),
    ],
)
def test_filters_refuse_values_outside_their_column_kind(
    world: World, condition: FilterSpec, message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        _run(world, (_count_rows(),), filters=(condition,))


def test_grouping_labels_are_written_back_as_the_query_wrote_them() -> None:
    assert derived.bin_labels(Derivation("bins", (0.0, 50.5, 1e20))) == [
        "< 0",
        "[0, 50.5)",
        "[50.5, 1e+20)",
        ">= 1e+20",
    ]


def test_a_date_range_in_the_query_narrows_the_periods_it_releases(world: World) -> None:
    since_march = leaf("panel.bought_on", FilterOp.GE, "2026-03-01")
    before_may = leaf("panel.bought_on", FilterOp.LT, "2026-05-01")
    plan, exact = _run(
        world,
        (_count_rows(),),
        group_by=("month:panel.bought_on",),
        filters=(since_march, before_may),
    )
    assert [k[0] for k in plan.group_keys] == ["2026-03-01", "2026-04-01"]
    joined = _joined(world)
    march, may = dt.date(2026, 3, 1), dt.date(2026, 5, 1)
    kept = joined[(joined.bought_on >= march) & (joined.bought_on < may)]
    assert exact.rows == [
        int((kept.bought_on < dt.date(2026, 4, 1)).sum()),
        int((kept.bought_on >= dt.date(2026, 4, 1)).sum()),
    ]
    # A range inside an OR narrows nothing (it is not a condition on every row).
    either = any_of(since_march, leaf("panel.category", FilterOp.IN, "food"))
    plan, _ = _run(world, (_count_rows(),), group_by=("month:panel.bought_on",), filters=(either,))
    assert len(plan.group_keys) == 6
    after_june = leaf("panel.bought_on", FilterOp.GT, "2026-06-30")
    with pytest.raises(InvalidArgumentError, match="filters leave no period"):
        _run(world, (_count_rows(),), group_by=("week:panel.bought_on",), filters=(after_june,))


def test_one_date_grouped_by_its_month_and_its_week(world: World) -> None:
    plan, exact = _run(
        world, (_count_rows(),), group_by=("month:panel.bought_on", "week:panel.bought_on")
    )
    assert len(plan.group_keys) == 6 * 27  # public cells: every pair, possible or not
    joined = _joined(world)
    inside = joined[
        (joined.bought_on >= BOUGHT.lower_date) & (joined.bought_on <= BOUGHT.upper_date)
    ]
    month = inside.bought_on.map(lambda d: derived.period_start("month", d).isoformat())
    week = inside.bought_on.map(lambda d: derived.period_start("week", d).isoformat())
    rows = inside.groupby([month, week]).size()
    assert exact.rows == [int(rows.get(k, 0)) for k in plan.group_keys]
    with pytest.raises(InvalidArgumentError, match=r"month:panel\.bought_on appears twice"):
        _run(world, (_count_rows(),), group_by=("month:panel.bought_on",) * 2)
