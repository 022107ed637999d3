"""Date and timestamp columns: declared in a schema file, prepared, uploaded, stored, listed.

The query side (date groupings and filters) has its own tests; these follow a date column from
the partner's file to the hub's stored table and schema, and back to the SDK and the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, date, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from entremise.partners import Client, PartnerKeys
from entremise.partners.prepare import PrepareError, prepare_table, read_table
from entremise.partners.schema import Consent, Date, Numeric, UploadSchema
from entremise.partners.synthetic import PANEL_SCHEMA, PURPOSE, SEASONS, generate
from entremise.sdk.query import aggregate, query
from entremise.server.api.serde import query_from_proto, schema_from_proto, schema_to_proto
from entremise.server.domain.codec import schema_from_dict, schema_to_dict
from entremise.server.domain.models import DateColumn
from entremise.server.schema_check import schema_document
from entremise.server.testing import exact_aggregates, plan
from tests.conftest import Hub, build_scenario, cli_bank

KEY = b"k" * 32
SCHEMA = UploadSchema(
    {"email": "email"},
    {PURPOSE: Consent("ok")},
    {
        "amount": Numeric(0, 100, 1),
        "bought_on": Date("2026-01-01", "2026-12-31"),
        "seen_at": Date("2026-01-01", "2026-12-31", timestamp=True),
    },
)


def _csv(tmp_path: Path, bought_on: list[str], seen_at: list[str]) -> Path:
    n = len(bought_on)
    frame = pd.DataFrame(
        {
            "email": [f"person{i}@example.org" for i in range(n)],
            "ok": ["true"] * n,
            "amount": [str(10 * i) for i in range(n)],
            "bought_on": bought_on,
            "seen_at": seen_at,
        }
    )
    path = tmp_path / "purchases.csv"
    frame.to_csv(path, index=False)
    return path


# -- the partner's side: reading and preparing the file -----------------------------------------


def test_csv_dates_become_date32_and_timestamps_utc_without_zone(tmp_path: Path) -> None:
    path = _csv(
        tmp_path,
        ["2026-03-14", "", "2025-07-01", " 2026-12-31 "],
        ["2026-03-14T10:00:00Z", "2026-03-14 23:30:00-05:00", "", "2026-03-14"],
    )
    table = prepare_table(read_table(path), SCHEMA, KEY).table
    assert table.schema.field("bought_on").type == pa.date32()
    assert table.schema.field("seen_at").type == pa.timestamp("us")  # no zone: UTC
    # Empty cells are missing; 2025-07-01 is before the lower bound and is sent all the same.
    assert table.column("bought_on").to_pylist() == [
        date(2026, 3, 14),
        None,
        date(2025, 7, 1),
        date(2026, 12, 31),
    ]
    assert table.column("seen_at").to_pylist() == [
        datetime(2026, 3, 14, 10, 0),
        datetime(2026, 3, 15, 4, 30),
        None,
        datetime(2026, 3, 14),
    ]


def test_an_unparseable_date_is_one_line_naming_the_column_and_rows(tmp_path: Path) -> None:
    path = _csv(tmp_path, ["2026-03-14", "14/03/2026", "2026-02-30", "2026-03"], [""] * 4)
    with pytest.raises(PrepareError) as info:
        prepare_table(read_table(path), SCHEMA, KEY)
    assert str(info.value) == (
        "date column 'bought_on' has 3 values that are not ISO 8601 dates (data rows 2, 3, 4)"
    )
    path = _csv(tmp_path, [""] * 7, ["soon", *["2026-01-01"] * 5, "later"])
    with pytest.raises(PrepareError) as info:
        prepare_table(read_table(path), SCHEMA, KEY)
    assert str(info.value) == (
        "date column 'seen_at' has 2 values that are not ISO 8601 dates or timestamps "
        "(data rows 1, 7)"
    )


def test_parquet_dates_and_zoned_timestamps(tmp_path: Path) -> None:
    # 02:00 UTC on the 14th is the 13th in New York: the UTC day and time are what is sent.
    instant = datetime(2026, 3, 14, 2, 0, tzinfo=UTC)
    table = pa.table(
        {
            "email": ["a@example.org", "b@example.org"],
            "ok": [True, False],
            "amount": [1.0, 2.0],
            "bought_on": pa.array([date(2026, 3, 14), None], pa.date32()),
            "seen_at": pa.array([instant, None], pa.timestamp("ns", tz="America/New_York")),
        }
    )
    path = tmp_path / "purchases.parquet"
    pq.write_table(table, path)
    sent = prepare_table(read_table(path), SCHEMA, KEY).table
    assert sent.column("bought_on").to_pylist() == [date(2026, 3, 14), None]
    assert sent.column("seen_at").to_pylist() == [datetime(2026, 3, 14, 2, 0), None]
    # A zoned timestamp in a date column keeps its UTC day.
    as_dates = UploadSchema(
        SCHEMA.keys, SCHEMA.consents, {"seen_at": Date("2026-01-01", "2026-12-31")}
    )
    frame = read_table(path).drop(columns=["amount", "bought_on"])
    sent = prepare_table(frame, as_dates, KEY).table
    assert sent.column("seen_at").to_pylist() == [date(2026, 3, 14), None]


# -- the hub's stored schema --------------------------------------------------------------------


def test_a_date_column_survives_the_wire_and_the_stored_schema() -> None:
    stored = schema_from_proto(SCHEMA.to_proto())
    assert stored.columns[1:] == (
        DateColumn("bought_on", "2026-01-01", "2026-12-31"),
        DateColumn("seen_at", "2026-01-01", "2026-12-31", timestamp=True),
    )
    assert schema_from_dict(json.loads(json.dumps(schema_to_dict(stored)))) == stored
    assert schema_to_proto(stored) == SCHEMA.to_proto()


# -- the demo's panel ---------------------------------------------------------------------------


def test_the_demo_panel_dates_its_purchases_with_seasons() -> None:
    assert PANEL_SCHEMA.columns["purchased_on"] == Date("2026-01-01", "2026-12-31")
    panel = generate(3000, 1500, 900, seed=3).panel
    assert generate(3000, 1500, 900, seed=3).panel.equals(panel)  # deterministic
    days = pd.to_datetime(panel["purchased_on"], format="%Y-%m-%d")
    assert days.min() >= pd.Timestamp("2026-01-01") and days.max() <= pd.Timestamp("2026-12-31")
    month = days.dt.month
    share = pd.crosstab(panel["category"], month, normalize="index")
    assert set(share.index) == set(SEASONS)
    assert share.loc["travel", [7, 8]].sum() > 2 * share.loc["travel", [1, 2]].sum()
    assert share.loc["electronics", [11, 12]].sum() > 0.3


# -- end to end, through gRPC -------------------------------------------------------------------


def test_a_date_column_is_uploaded_stored_and_listed_with_its_bounds(
    sqlite_hub: Hub, tmp_path: Path
) -> None:
    hub = sqlite_hub
    bank = cli_bank(hub, tmp_path, "dates", "1")
    path = _csv(
        tmp_path,
        ["2026-03-14", "", "2027-01-05", "2026-12-31"],
        ["2026-03-14T10:00:00+01:00", "", "2026-06-01", "2026-06-01T00:00:00Z"],
    )
    with Client.connect(hub.target, token=bank.token) as client:
        keys = PartnerKeys.load(bank.key_file)
        up = client.upload_dataset(bank.agreement_id, "bank", path, SCHEMA, keys=keys)
        (listed,) = client.list_datasets()
    assert up.dataset.dataset_id == listed.dataset_id
    dates = {c.name: c.date for c in listed.schema.columns if c.WhichOneof("kind") == "date"}
    assert [(n, d.lower, d.upper, d.timestamp) for n, d in dates.items()] == [
        ("bought_on", "2026-01-01", "2026-12-31", False),
        ("seen_at", "2026-01-01", "2026-12-31", True),
    ]
    assert UploadSchema.from_dict(schema_document(listed.schema)) == SCHEMA

    stored = hub.running.hub.files.read(listed.dataset_id, listed.version)
    assert stored.schema.field("bought_on").type == pa.date32()
    assert stored.schema.field("seen_at").type == pa.timestamp("us")
    assert stored.column("bought_on").to_pylist() == [
        date(2026, 3, 14),
        None,
        date(2027, 1, 5),  # outside the bounds: stored, left out of date groupings
        date(2026, 12, 31),
    ]
    assert stored.column("seen_at").to_pylist() == [
        datetime(2026, 3, 14, 9, 0),
        None,
        datetime(2026, 6, 1),
        datetime(2026, 6, 1),
    ]

    # The command line's JSON listing carries the bounds as the API gives them.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENTREMISE_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "entremise.cli",
            "partner",
            "list",
            "--json",
            *("--target", hub.target, "--token", bank.token),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**env, "NO_COLOR": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    (shown,) = json.loads(proc.stdout)
    columns = {c["name"]: c for c in shown["schema"]["columns"]}
    assert columns["seen_at"]["date"] == {
        "lower": "2026-01-01",
        "upper": "2026-12-31",
        "timestamp": True,
    }


def test_the_demo_panel_is_grouped_by_month_of_its_purchase_dates(sqlite_hub: Hub) -> None:
    s = build_scenario(sqlite_hub, n_bank=600, n_panel=300, overlap=200)
    by_month = query(
        s.agreement_id,
        "1",
        [aggregate("count_rows", name="rows")],
        group_by=["month:panel.purchased_on"],
    )
    released = s.analyst.run(by_month).release.results[0]
    assert [c.group[0][:7] for c in released.cells] == [f"2026-{m:02d}" for m in range(1, 13)]
    # Every demo date is inside the bounds: before noise, the months hold every joined row.
    hub = sqlite_hub.running.hub
    whole = query(s.agreement_id, "1", [aggregate("count_rows", name="rows")])
    monthly, total = (
        exact_aggregates(hub, plan(hub, query_from_proto(q))).rows for q in (by_month, whole)
    )
    assert len(monthly) == 12 and all(n > 0 for n in monthly)
    assert sum(monthly) == total[0] > 0
