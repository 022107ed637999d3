"""DP SQL against the ground truth, through real gRPC: each supported form's released cells hold
the true value of the bounded query within their 95% intervals, at the rate the intervals
promise.

The truth is the partner-side consented join (`cli.demo.consented_join`: same consent, same
clamping); no one in the scenario has more rows than the cap, so bounding cuts nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import pytest
from scipy.stats import binom

from entremise.cli.demo import consented_join
from tests.conftest import Hub, build_scenario

#: WIDTH_BUCKET(amount, 0, 300, 6): the hub's labels of the bins [0, 300] can reach.
BUCKETS = ["[0, 50)", "[50, 100)", "[100, 150)", "[150, 200)", "[200, 250)", "[250, 300)", ">= 300"]
Truth = Callable[[pd.DataFrame], pd.Series | float]

#: (SQL, the true value per group key, as pandas computes it over the consented join).
FORMS: list[tuple[str, Truth]] = [
    (
        "SELECT COUNT(DISTINCT PERSON) AS people FROM bank JOIN panel",
        lambda j: j.email.nunique(),
    ),
    (
        "SELECT bank.segment, COUNT(*) AS n FROM bank JOIN panel GROUP BY bank.segment",
        lambda j: j.groupby("segment").size(),
    ),
    (
        "SELECT panel.category, SUM(panel.amount) AS total FROM bank JOIN panel "
        "WHERE panel.amount > 20 OR panel.category = 'travel' GROUP BY panel.category",
        lambda j: j[(j.amount > 20) | (j.category == "travel")].groupby("category").amount.sum(),
    ),
    (
        "SELECT bank.segment AS segment, AVG(panel.amount) AS mean FROM bank JOIN panel "
        "WHERE NOT panel.category IN ('grocery', 'beauty') GROUP BY 1",
        lambda j: j[~j.category.isin(["grocery", "beauty"])].groupby("segment").amount.mean(),
    ),
    (
        "SELECT STDDEV(panel.amount) AS sd FROM bank JOIN panel "
        "WHERE panel.amount BETWEEN 10 AND 200",
        lambda j: j[(j.amount >= 10) & (j.amount <= 200)].amount.std(ddof=0),
    ),
    (
        "SELECT VARIANCE(panel.amount) AS var FROM bank JOIN panel WHERE panel.amount < 150",
        lambda j: j[j.amount < 150].amount.var(ddof=0),
    ),
    (
        "SELECT WIDTH_BUCKET(panel.amount, 0, 300, 6) AS bucket, COUNT(*) AS n "
        "FROM bank JOIN panel GROUP BY 1",
        lambda j: j.groupby(
            pd.cut(j.amount, [0, 50, 100, 150, 200, 250, 300, 1e9], right=False)
            .cat.rename_categories(BUCKETS)
            .astype(str)
        ).size(),
    ),
    (
        "SELECT CASE WHEN panel.amount < 50 THEN 'small' WHEN panel.amount < 150 THEN 'medium' "
        "ELSE 'large' END AS size, SUM(panel.amount) AS total FROM bank JOIN panel GROUP BY 1",
        lambda j: j.groupby(
            pd.cut(
                j.amount, [-1, 50, 150, 1e9], right=False, labels=["small", "medium", "large"]
            ).astype(str)
        ).amount.sum(),
    ),
]


@pytest.fixture
def rich(hub: Hub):  # type: ignore[no-untyped-def]
    """The scenario with budget for every form at a high epsilon."""
    return build_scenario(hub, total_epsilon="100")


def test_released_sql_cells_hold_the_truth_at_the_promised_rate(rich) -> None:  # type: ignore[no-untyped-def]
    s = rich
    joined = consented_join(s.bank, s.panel)
    covered: list[bool] = []
    for sql, truth in FORMS:
        result = s.analyst.sql_run(sql, epsilon="8", agreement_id=s.agreement_id)
        expected = truth(joined)
        (aggregate,) = result.release.results
        assert aggregate.cells, sql
        for cell in aggregate.cells:
            assert cell.value is not None and cell.ci95_halfwidth is not None, (sql, cell)
            if isinstance(expected, pd.Series):
                value = float(expected.get(cell.group[0], 0.0))
            else:
                value = float(expected)
            covered.append(abs(cell.value - value) <= cell.ci95_halfwidth)
    # Each interval holds with probability >= 95%, independently: more misses than `allowed`
    # happen with probability < 1e-6 when the intervals are right.
    allowed = int(binom.isf(1e-6, len(covered), 0.05))
    assert len(covered) >= 25
    assert covered.count(False) <= allowed, (covered.count(False), len(covered))
