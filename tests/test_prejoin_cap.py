"""The per-person cap before the join, computed from counts, keeps exactly the rows the rule picks.

The rule (`engine._capped_rows`): each unit keeps at most `cap` rows, a row of each of its group
cells first (cells in hash order), then its other rows by hash of the unit and the row. When
the query reads no column of a dataset, or only its cells, rows that agree on those columns
are interchangeable, so the engine counts them per cell instead of sorting every row. These
tests hold that shortcut to the rule written plainly as two row windows, on data crafted to
hit its edges: units above and below the cap, more cells than the cap, many equal rows, and
units that others' rows must not affect.
"""

from __future__ import annotations

from collections import Counter

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from entremise.server.engine import _capped_rows

ROWS = "SELECT pid, d1_cell, d1_other FROM t"


def _plain_rule(columns: list[str], cells: list[str], cap: int) -> str:
    """The rule on individual rows: the cell's first row first, then hash order (two windows)."""
    picked = "".join(f", {c}" for c in columns)
    order = f"hash(pid{picked}){picked}"
    source = f"SELECT pid{picked} FROM t"
    if cells:
        source = (
            f"SELECT *, row_number() OVER (PARTITION BY pid, {', '.join(cells)} ORDER BY {order}) "
            f"AS cell_k FROM ({source})"
        )
        order = f"cell_k > 1, {order}"
    return (
        f"SELECT pid{picked} FROM (SELECT *, row_number() OVER (PARTITION BY pid ORDER BY {order})"
        f" AS k FROM ({source})) WHERE k <= {cap}"
    )


def _table(seed: int) -> pa.Table:
    """Units with 1 to 60 rows over up to 12 cells, many rows equal to one another."""
    rng = np.random.default_rng(seed)
    pids, cells, others = [], [], []
    for unit in range(40):
        n = int(rng.integers(1, 61))
        width = int(rng.integers(1, 13))
        pids += [f"u{unit:03d}"] * n
        cells += [f"c{c}" for c in rng.integers(0, width, n)]
        others += [int(v) for v in rng.integers(0, 3, n)]  # few values: many equal rows
    return pa.table({"pid": pids, "d1_cell": cells, "d1_other": others})


def _kept(table: pa.Table, sql: str) -> Counter[tuple[object, ...]]:
    with duckdb.connect() as conn:
        conn.register("t", table)
        return Counter(conn.execute(sql).fetchall())


@pytest.mark.parametrize("cap", [1, 3, 7, 50])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counted_cells_keep_what_the_row_windows_keep(seed: int, cap: int) -> None:
    table = _table(seed)
    columns, cells = ["d1_cell"], ["d1_cell"]
    shortcut = _capped_rows(f"(SELECT pid, d1_cell FROM ({ROWS}))", columns, cells, cap)
    assert "range(kept)" in shortcut  # the counted form is the one under test
    assert _kept(table, shortcut) == _kept(table, _plain_rule(columns, cells, cap))


@pytest.mark.parametrize("cap", [1, 7, 50])
def test_a_dataset_read_for_its_units_alone_keeps_the_cap_of_each(cap: int) -> None:
    table = _table(3)
    shortcut = _capped_rows(f"(SELECT pid FROM ({ROWS}))", [], [], cap)
    assert "range(kept)" in shortcut
    assert _kept(table, shortcut) == _kept(table, _plain_rule([], [], cap))
    per_unit = Counter(table.column("pid").to_pylist())
    assert _kept(table, shortcut) == Counter({(u,): min(n, cap) for u, n in per_unit.items()})


@pytest.mark.parametrize("cap", [3, 7])
def test_every_form_keeps_a_row_of_each_cell_and_at_most_the_cap(cap: int) -> None:
    """Both forms: a unit in at most `cap` cells keeps one in each; no unit passes the cap."""
    table = _table(4)
    forms = {
        "counted": (["d1_cell"], ["d1_cell"]),
        "windows": (["d1_cell", "d1_other"], ["d1_cell"]),
    }
    for columns, cells in forms.values():
        selected = ", ".join(columns)
        kept = _kept(
            table, _capped_rows(f"(SELECT pid, {selected} FROM ({ROWS}))", columns, cells, cap)
        )
        by_unit: dict[str, list[str]] = {}
        for row, n in kept.items():
            by_unit.setdefault(str(row[0]), []).extend([str(row[1])] * n)
        source_cells: dict[str, set[str]] = {}
        pairs = zip(table["pid"].to_pylist(), table["d1_cell"].to_pylist(), strict=True)
        for pid, cell in pairs:
            source_cells.setdefault(pid, set()).add(cell)
        for unit, unit_cells in source_cells.items():
            assert len(by_unit[unit]) <= cap
            if len(unit_cells) <= cap:
                assert set(by_unit[unit]) == unit_cells, (unit, columns)


def test_a_units_choice_does_not_depend_on_other_units() -> None:
    """Removing one unit leaves every other unit's kept rows as they were (the locality lemma)."""
    table = _table(5)
    sql = _capped_rows(f"(SELECT pid, d1_cell FROM ({ROWS}))", ["d1_cell"], ["d1_cell"], 7)
    full = _kept(table, sql)
    without = table.filter(pa.compute.not_equal(table.column("pid"), "u007"))
    assert _kept(without, sql) == Counter({r: n for r, n in full.items() if r[0] != "u007"})
