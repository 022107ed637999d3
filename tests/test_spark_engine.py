"""SparkEngine computes exactly DuckDBEngine's aggregates, for every query kind.

Two sealed datasets of several segments each, with crafted properties: a bank (one identifier,
consent with an expiry, some expired) and a panel with two identifiers (email and phone) whose
rows link people, some known by their phone alone. People have many more rows than the row
cap and more group cells than the group cap, so the hash-chosen rows matter. Each query is
planned by the hub's planner and computed by both engines over the same stored versions; the
ExactAggregates must be equal.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

pytest.importorskip("pyspark")

from entremise.privacy.budget import Epsilon
from entremise.server.crypto import DatasetCipher, Keyring
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
    FilterOp,
    FilterSpec,
    IdentifierKind,
    KeyColumn,
    NumericColumn,
    QueryPlan,
    QuerySpec,
    TextColumn,
)
from entremise.server.domain.planner import plan_query
from entremise.server.engine import DuckDBEngine
from entremise.server.files import SealedDatasetFiles, StoredVersion
from entremise.server.spark import SparkEngine

PURPOSE = "research"
NOW = "2026-11-27T00:00:00+00:00"
SEGMENTS = ("mass", "affluent", "private")
CATEGORIES = ("food", "travel", "tech", "home", "books")
SHOPS = ("north", "south", "east", "west")

BANK = DatasetSchema(
    keys=(KeyColumn("email", IdentifierKind.EMAIL),),
    consents=(ConsentSpec(PURPOSE, "consent", "consent_until"),),
    columns=(
        CategoricalColumn("segment", SEGMENTS),
        NumericColumn("income", 0.0, 10000.0, 0.01),
    ),
)
PANEL = DatasetSchema(
    keys=(KeyColumn("email", IdentifierKind.EMAIL), KeyColumn("phone", IdentifierKind.PHONE)),
    consents=(ConsentSpec(PURPOSE, "consent"),),
    columns=(
        CategoricalColumn("category", CATEGORIES),
        NumericColumn("amount", 0.0, 500.0, 0.01),
        DateColumn("bought_on", "2026-01-01", "2026-06-30"),
        TextColumn("shop"),
    ),
)


def _pseudonym(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _bank(rng: np.random.Generator, people: int) -> pa.Table:
    """One row per email; some people have a second email (linked through the panel's phone)."""
    emails = [_pseudonym(f"e{i}") for i in range(people)]
    emails += [_pseudonym(f"e{i}'") for i in range(0, people, 7)]
    n = len(emails)
    until = [
        None if r < 0.6 else dt.datetime(2026, 6 if r < 0.8 else 12, 1, tzinfo=dt.UTC)
        for r in rng.random(n)
    ]  # a fifth expired before NOW
    return pa.table(
        {
            "email": emails,
            "consent": rng.random(n) < 0.9,
            "consent_until": pa.array(until, pa.timestamp("us", tz="UTC")),
            "segment": rng.choice(SEGMENTS, n).tolist(),
            "income": rng.uniform(-100, 12000, n).round(2),
        }
    )


def _panel(rng: np.random.Generator, people: int) -> pa.Table:
    """0-14 purchases each (the row cap is 3), in up to 5 categories (the group cap is 2)."""
    emails, phones = [], []
    for i in range(people):
        for r in range(int(rng.integers(0, 15))):
            email = _pseudonym(f"e{i}'" if i % 7 == 0 and r % 2 else f"e{i}")
            phone = _pseudonym(f"p{i}")
            shape = rng.random()
            emails.append(None if shape < 0.15 else email)  # known by the phone alone
            phones.append(None if 0.15 <= shape < 0.3 else phone)
    n = len(emails)
    days = rng.integers(-20, 200, n)
    amounts = rng.uniform(-40, 640, n).round(2).tolist()
    for i in range(0, n, 23):
        amounts[i] = None  # missing values stay missing
    return pa.table(
        {
            "email": pa.array(emails, pa.string()),
            "phone": pa.array(phones, pa.string()),
            "consent": rng.random(n) < 0.93,
            "category": rng.choice(CATEGORIES, n).tolist(),
            "amount": pa.array(amounts, pa.float64()),
            "bought_on": [dt.date(2026, 1, 1) + dt.timedelta(days=int(d)) for d in days],
            "shop": rng.choice(SHOPS, n).tolist(),
        }
    )


def _payload(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=64)
    return sink.getvalue().to_pybytes()


def store_world(
    tmp: Path, people: int = 160, seed: int = 7, segment_bytes: int = 8192
) -> tuple[SealedDatasetFiles, dict[str, pa.Table]]:
    """The bank and panel sealed in small segments (several per dataset), caching nothing."""
    cipher = DatasetCipher(Keyring.load(tmp / "ring"), tmp / "keys")
    files = SealedDatasetFiles(cipher, tmp / "data", segment_bytes=segment_bytes, cache_bytes=0)
    rng = np.random.default_rng(seed)
    tables = {"bank": _bank(rng, people), "panel": _panel(rng, people)}
    for name, schema in (("bank", BANK), ("panel", PANEL)):
        payload = _payload(tables[name])
        files.ingest(name, 1, schema, [payload], hashlib.sha256(payload).hexdigest())
        assert len(files.source(name, 1).location().spans) > 1
    return files, tables


def sources(files: SealedDatasetFiles) -> list[StoredVersion]:
    return [files.source("bank", 1), files.source("panel", 1)]


def plan(
    tables: dict[str, pa.Table],
    aggregates: tuple[AggregateSpec, ...],
    *,
    group_by: tuple[str, ...] = (),
    filters: tuple[FilterSpec, ...] = (),
    rows: int = 3,
    groups: int = 2,
    delta_units: int = 0,
    panel: DatasetSchema | None = None,
) -> QueryPlan:
    datasets = tuple(
        Dataset(
            name,
            name,
            f"p{i}",
            "ag",
            schema,
            len(tables[name]),
            len(tables[name]),
            1,
            "",
            NOW,
            "",
            0,
        )
        for i, (name, schema) in enumerate((("bank", BANK), ("panel", panel or PANEL)))
    )
    agreement = Agreement(
        "ag",
        "spark",
        PURPOSE,
        (DatasetSlot("p0", "bank"), DatasetSlot("p1", "panel")),
        ("analyst",),
        Epsilon.parse("100"),
        max_rows_per_person=rows,
        max_groups_per_person=groups,
        created_at=NOW,
        status=AgreementStatus.ACTIVE,
        total_delta_units=10**12,
    )
    spec = QuerySpec(
        "ag",
        aggregates,
        Epsilon.parse("1"),
        group_by=group_by,
        filters=filters,
        delta_units=delta_units,
    )
    return plan_query(spec, agreement, datasets)


def agg(kind: AggregateKind, column: str = "", **extra: object) -> AggregateSpec:
    name = f"{kind.value}_{column}".replace(".", "_").strip("_")
    return AggregateSpec(name, kind, column, **extra)  # type: ignore[arg-type]


def leaf(column: str, op: FilterOp, *values: str) -> FilterSpec:
    return FilterSpec(column, op, tuple(values))


def any_of(*terms: FilterSpec) -> FilterSpec:
    return FilterSpec("", FilterOp.IN, (), any_of=terms)


def all_of(*terms: FilterSpec) -> FilterSpec:
    return FilterSpec("", FilterOp.IN, (), all_of=terms)


@pytest.fixture(scope="module")
def spark() -> Iterator[SparkEngine]:
    engine = SparkEngine("local[2]", partitions=4)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[SealedDatasetFiles, dict[str, pa.Table]]:
    return store_world(tmp_path_factory.mktemp("spark"))


PEOPLE = agg(AggregateKind.COUNT)
ROWS = agg(AggregateKind.COUNT_ROWS)
AMOUNT = "panel.amount"

CASES = {
    # One query, every ungrouped kind: people, rows, sum, mean, variance, stddev, quantile.
    "every aggregate kind": dict(
        aggregates=(
            PEOPLE,
            ROWS,
            agg(AggregateKind.SUM, AMOUNT),
            agg(AggregateKind.MEAN, AMOUNT),
            agg(AggregateKind.VARIANCE, AMOUNT),
            agg(AggregateKind.STDDEV, "bank.income"),
            agg(AggregateKind.QUANTILE, AMOUNT, quantile=0.5),
        )
    ),
    "grouped by one": dict(aggregates=(PEOPLE, ROWS), group_by=("panel.category",)),
    "grouped by two": dict(
        aggregates=(
            ROWS,
            agg(AggregateKind.SUM, AMOUNT),
            agg(AggregateKind.QUANTILE, AMOUNT, quantile=0.9),
        ),
        group_by=("bank.segment", "panel.category"),
    ),
    "discovered keys": dict(aggregates=(PEOPLE, ROWS), group_by=("panel.shop",), delta_units=10**6),
    "filters": dict(
        aggregates=(ROWS, agg(AggregateKind.MEAN, AMOUNT)),
        group_by=("panel.category",),
        filters=(
            any_of(
                all_of(
                    leaf("panel.category", FilterOp.IN, "food", "tech"),
                    leaf(AMOUNT, FilterOp.LE, "300"),
                ),
                leaf(AMOUNT, FilterOp.GT, "450"),
            ),
            leaf("bank.segment", FilterOp.NOT_IN, "private"),
        ),
    ),
    "month buckets": dict(aggregates=(ROWS, PEOPLE), group_by=("month:panel.bought_on",)),
    "day buckets and a date filter": dict(
        aggregates=(ROWS,),
        group_by=("day:panel.bought_on",),
        filters=(leaf("panel.bought_on", FilterOp.GE, "2026-03-01"),),
        groups=40,
    ),
    "bins": dict(
        aggregates=(ROWS, agg(AggregateKind.SUM, "bank.income")),
        group_by=("bins:panel.amount:50,200:small|medium|large",),
    ),
    "caps that do not bite": dict(
        aggregates=(PEOPLE, ROWS), group_by=("panel.category",), rows=20, groups=5
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_spark_computes_exactly_what_duckdb_does(case: str, spark: SparkEngine, world) -> None:  # type: ignore[no-untyped-def]
    files, tables = world
    query = plan(tables, **CASES[case])  # type: ignore[arg-type]
    withdrawn = {
        _pseudonym("e3"),  # an email
        _pseudonym("p11"),  # a phone: the person's emails go too
        _pseudonym("e14'"),  # a second email, linked through a phone
        _pseudonym("nobody"),
    }
    expected = DuckDBEngine(threads=2).compute(query, sources(files), withdrawn, NOW)
    got = spark.compute(query, sources(files), withdrawn, NOW)
    assert got == expected
    assert sum(expected.rows) > 0


#: The panel known by its email alone (its phone column unused): no linking, bucketed reads.
PANEL_BY_EMAIL = DatasetSchema(keys=PANEL.keys[:1], consents=PANEL.consents, columns=PANEL.columns)


@pytest.mark.parametrize(
    "case", ["every aggregate kind", "grouped by two", "discovered keys", "filters"]
)
def test_one_identifier_per_dataset_is_what_duckdb_computes(
    case: str, spark: SparkEngine, world: tuple[SealedDatasetFiles, dict[str, pa.Table]]
) -> None:
    """Without linking, rows are bucketed by person as segments are read (no row in the JVM)."""
    files, tables = world
    query = plan(tables, **CASES[case], panel=PANEL_BY_EMAIL)  # type: ignore[arg-type]
    withdrawn = {_pseudonym("e3"), _pseudonym("e14'"), _pseudonym("nobody")}
    expected = DuckDBEngine(threads=2).compute(query, sources(files), withdrawn, NOW)
    assert spark.compute(query, sources(files), withdrawn, NOW) == expected
    assert sum(expected.rows) > 0


def test_a_single_identifier_join_needs_no_linking(spark: SparkEngine, tmp_path: Path) -> None:
    """Only the bank, whose one identifier is the person: pid is the email itself."""
    files, _ = store_world(tmp_path, people=60, seed=3, segment_bytes=2048)
    datasets = (Dataset("bank", "bank", "p0", "ag", BANK, 70, 70, 1, "", NOW, "", 0),)
    agreement = Agreement(
        "ag",
        "spark",
        PURPOSE,
        (DatasetSlot("p0", "bank"),),
        ("analyst",),
        Epsilon.parse("10"),
        max_rows_per_person=1,
        max_groups_per_person=1,
        created_at=NOW,
        status=AgreementStatus.ACTIVE,
    )
    spec = QuerySpec(
        "ag",
        (PEOPLE, agg(AggregateKind.SUM, "bank.income")),
        Epsilon.parse("1"),
        group_by=("bank.segment",),
    )
    query = plan_query(spec, agreement, datasets)
    bank = [files.source("bank", 1)]
    gone = {_pseudonym("e5")}
    assert spark.compute(query, bank, gone, NOW) == DuckDBEngine().compute(query, bank, gone, NOW)


def test_the_data_key_is_in_no_plan(spark: SparkEngine, world) -> None:  # type: ignore[no-untyped-def]
    files, tables = world
    query = plan(tables, (PEOPLE,), group_by=("panel.category",))
    location = files.source("panel", 1).location()
    frame = spark._read(spark.session, query, 1, files.source("panel", 1), NOW)
    shown = frame._jdf.queryExecution().toString()
    utils = spark.session.sparkContext._jvm.PythonSQLUtils  # type: ignore[union-attr]
    for mode in ("extended", "formatted", "cost"):
        shown += utils.explainString(frame._jdf.queryExecution(), mode)
    assert frame.count() > 0
    for text in (location.key.hex(), location.key.hex().upper()):
        assert text not in shown
    assert "entremise_sealed" in shown.lower() or "python" in shown.lower()


def test_a_hub_on_spark_releases_through_grpc(spark: SparkEngine, tmp_path: Path) -> None:
    """`engine="spark"`: a release through the SDK, charged as usual; exact values as DuckDB's."""
    from entremise.server import testing
    from entremise.server.domain.queries import exact_aggregates, withdrawn_people
    from tests.conftest import build_scenario, start_hub

    hub = start_hub(
        tmp_path / "hub",
        f"sqlite:///{tmp_path / 'hub.db'}",
        engine="spark",
        spark_master="local[2]",
    )
    try:
        core = hub.running.hub
        assert isinstance(core.engine, SparkEngine)
        s = build_scenario(hub, total_epsilon="5", n_bank=400, n_panel=200, overlap=120)
        result = s.analyst.sql_run(
            "SELECT bank.segment, COUNT(*) AS n FROM bank JOIN panel GROUP BY bank.segment",
            epsilon="1",
            agreement_id=s.agreement_id,
        )
        (aggregate,) = result.release.results
        assert aggregate.cells and all(c.value is not None for c in aggregate.cells)
        assert float(result.remaining_epsilon) == pytest.approx(4.0)
        assert not result.replayed
        spec = QuerySpec(s.agreement_id, (ROWS,), Epsilon.parse("1"), group_by=("bank.segment",))
        query = testing.plan(core, spec)
        gone = withdrawn_people(core.store.query_context(s.agreement_id))
        exact = exact_aggregates(core.files, DuckDBEngine(), query, gone)
        assert testing.exact_aggregates(core, query) == exact
        assert sum(exact.rows) > 0
    finally:
        hub.admin.close()
        hub.running.stop(grace=None)
        core.engine.close()  # type: ignore[attr-defined]
