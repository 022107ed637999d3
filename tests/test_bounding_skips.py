"""The post-join row window may be skipped only when no person can exceed the cap without it.

A crafted upload puts one person on many rows of both datasets. Each dataset brings at most
the cap into the join (`_dataset_rows`), so the join can hold cap x rows of the other dataset:
the window must then run, and the person still counts at most `cap` rows. When the product
cannot pass the cap (one row per client in the bank), skipping the window must give exactly
what running it gives (forced here by declaring the upload statistics unknown).
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from entremise.privacy.budget import Epsilon
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
    IdentifierKind,
    KeyColumn,
    QuerySpec,
)
from entremise.server.domain.planner import plan_query
from entremise.server.engine import DuckDBEngine

NOW = "2026-11-27T00:00:00+00:00"
CAP = 5
SCHEMA = DatasetSchema((KeyColumn("email", IdentifierKind.EMAIL),), (ConsentSpec("p", "ok"),), ())


def _rows(counts: dict[str, int]) -> pa.Table:
    emails = [e for e, n in counts.items() for _ in range(n)]
    return pa.table({"email": emails, "ok": [True] * len(emails)})


def _agreement(groups_cap: int) -> Agreement:
    return Agreement(
        "ag", "skips", "p", (DatasetSlot("p0", "bank"), DatasetSlot("p1", "panel")), ("a",),
        Epsilon.parse("10"), max_rows_per_person=CAP, max_groups_per_person=groups_cap,
        created_at=NOW, status=AgreementStatus.ACTIVE,
    )  # fmt: skip


def _count_rows(bank: dict[str, int], panel: dict[str, int], *, known: bool) -> int:
    """Rows released for these uploads; `known=False` hides the upload statistics."""
    datasets = tuple(
        Dataset(
            f"ds{i}", name, f"p{i}", "ag", SCHEMA, sum(c.values()), len(c), 1, "", NOW, "",
            max(c.values()) if known else 0,
        )
        for i, (name, c) in enumerate((("bank", bank), ("panel", panel)))
    )  # fmt: skip
    spec = QuerySpec("ag", (AggregateSpec("n", AggregateKind.COUNT_ROWS),), Epsilon.parse("1"))
    plan = plan_query(spec, _agreement(CAP), datasets)
    exact = DuckDBEngine(threads=1).compute(plan, [_rows(bank), _rows(panel)], set(), NOW)
    return exact.rows[0]


def test_a_person_on_many_rows_of_both_datasets_still_counts_at_most_the_cap() -> None:
    # 3 bank rows x (40 panel rows capped to 5 before the join) = 15 joined rows > CAP.
    crafted = _count_rows({"x": 3, "y": 1}, {"x": 40, "y": 2}, known=True)
    assert crafted == CAP + 2  # x at the cap, y's two rows


@pytest.mark.parametrize("panel_rows", [1, CAP, 40])
def test_skipping_the_window_changes_nothing_when_it_cannot_bite(panel_rows: int) -> None:
    bank = {"x": 1, "y": 1}  # one row per client: the join holds at most the panel's cap
    panel = {"x": panel_rows, "y": 2}
    assert _count_rows(bank, panel, known=True) == _count_rows(bank, panel, known=False)
    assert _count_rows(bank, panel, known=True) == min(panel_rows, CAP) + 2


CATEGORIES = tuple(f"c{k}" for k in range(10))


def _people_per_cell(panel_cells: dict[str, list[str]], groups_cap: int) -> dict[str, int]:
    """People counted per category when each bank client has one row, and the panel these."""
    category = CategoricalColumn("category", CATEGORIES)
    panel_schema = DatasetSchema(SCHEMA.keys, SCHEMA.consents, (category,))
    emails = [e for e, cells in panel_cells.items() for _ in cells]
    panel = pa.table(
        {
            "email": emails,
            "ok": [True] * len(emails),
            "category": [c for cells in panel_cells.values() for c in cells],
        }
    )
    bank = _rows(dict.fromkeys(panel_cells, 1))
    most = max(len(c) for c in panel_cells.values())
    datasets = (
        Dataset("ds0", "bank", "p0", "ag", SCHEMA, bank.num_rows, bank.num_rows, 1, "", NOW, "", 1),
        Dataset("ds1", "panel", "p1", "ag", panel_schema, len(emails), len(panel_cells), 1, "",
                NOW, "", most),
    )  # fmt: skip
    spec = QuerySpec(
        "ag",
        (AggregateSpec("n", AggregateKind.COUNT),),
        Epsilon.parse("1"),
        group_by=("panel.category",),
        max_groups_per_person=groups_cap,
    )
    plan = plan_query(spec, _agreement(groups_cap), datasets)
    exact = DuckDBEngine(threads=1).compute(plan, [bank, panel], set(), NOW)
    return dict(zip(CATEGORIES, exact.people, strict=True))


def test_a_person_in_many_cells_still_counts_in_at_most_the_group_cap() -> None:
    # x buys in all 10 categories: CAP rows (CAP cells) reach the join, more than 2 groups.
    counted = _people_per_cell({"x": list(CATEGORIES) * 4, "y": ["c0"]}, groups_cap=2)
    assert sum(counted.values()) == 2 + 1


def test_skipping_the_group_window_keeps_every_cell_the_row_cap_left() -> None:
    # CAP cells at most reach the join and the group cap is CAP: the window is skipped, and x
    # is still counted in exactly CAP cells (one row of each cell comes first in the row cap).
    counted = _people_per_cell({"x": list(CATEGORIES) * 4, "y": ["c0"]}, groups_cap=CAP)
    assert sum(counted.values()) == CAP + 1
