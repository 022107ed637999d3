"""Out of core: a query under a memory limit streams segments, spills encrypted, and agrees.

The same bounded join runs twice over versions sealed in many small segments with the table
cache off (so they are streamed, never decrypted whole): once without a memory limit, once
under a limit far below what the join's windows need. The results must be identical, the
limited run must have spilled (else this test proves nothing), and what it spilled must not
hold a single pseudonym in clear.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

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
    IdentifierKind,
    KeyColumn,
    NumericColumn,
    QuerySpec,
)
from entremise.server.domain.planner import plan_query
from entremise.server.engine import DuckDBEngine
from entremise.server.files import SealedDatasetFiles

NOW = "2026-11-27T00:00:00+00:00"
PEOPLE = 80_000
CATEGORIES = tuple(f"c{i}" for i in range(12))
KEYS = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(PEOPLE)]


def _schema(linked: bool, *columns: object) -> DatasetSchema:
    keys = [KeyColumn("email", IdentifierKind.EMAIL)]
    if linked:
        keys.append(KeyColumn("phone", IdentifierKind.PHONE))
    return DatasetSchema(tuple(keys), (ConsentSpec("research", "ok"),), tuple(columns))  # type: ignore[arg-type]


def _seal(
    files: SealedDatasetFiles, dataset_id: str, table: pa.Table, schema: DatasetSchema
) -> Dataset:
    name = dataset_id.rstrip("2")
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=20_000)
    payload = sink.getvalue().to_pybytes()
    result = files.ingest(dataset_id, 1, schema, [payload], hashlib.sha256(payload).hexdigest())
    return Dataset(
        dataset_id,
        name,
        f"p-{name}",
        "ag",
        schema,
        result.row_count,
        result.distinct_keys,
        1,
        "",
        NOW,
        "",
        result.max_rows_per_key,
    )


@pytest.fixture(scope="module")
def stored(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[SealedDatasetFiles, dict[bool, tuple[Dataset, Dataset]]]:
    tmp = tmp_path_factory.mktemp("ooc")
    files = SealedDatasetFiles(
        DatasetCipher(Keyring.load(tmp / "ring"), tmp / "keys"),
        tmp / "data",
        cache_bytes=0,
        segment_bytes=1 << 20,
    )
    rng = np.random.default_rng(17)
    per_person = rng.integers(0, 9, PEOPLE)
    emails = np.repeat(np.array(KEYS), per_person)
    n = len(emails)
    category = CategoricalColumn("category", CATEGORIES)
    amount = NumericColumn("amount", 0.0, 500.0, 0.01)
    panel = pa.table(
        {
            "email": emails,
            "ok": rng.random(n) < 0.95,
            "category": rng.choice(CATEGORIES, n),
            "amount": rng.uniform(0, 600, n).round(2),
        }
    )
    bank = pa.table({"email": KEYS, "ok": rng.random(PEOPLE) < 0.9})
    # Linked: the bank knows a phone for most people; some phones are shared by two people.
    phones = [
        hashlib.sha256(f"tel{i // 2 if i % 50 == 0 else i}".encode()).hexdigest()
        for i in range(PEOPLE)
    ]
    bank_linked = bank.append_column("phone", pa.array(phones))
    datasets = {
        False: (
            _seal(files, "bank", bank, _schema(False)),
            _seal(files, "panel", panel, _schema(False, category, amount)),
        ),
        True: (
            _seal(files, "bank2", bank_linked.select(["email", "phone", "ok"]), _schema(True)),
            _seal(files, "panel2", panel, _schema(False, category, amount)),
        ),
    }
    return files, datasets


@pytest.mark.parametrize("linked", [False, True], ids=["one identifier", "linked identifiers"])
def test_a_query_under_a_memory_limit_spills_encrypted_and_agrees(
    stored: tuple[SealedDatasetFiles, dict[bool, tuple[Dataset, Dataset]]],
    linked: bool,
    tmp_path: Path,
) -> None:
    files, datasets = stored
    bank, panel = datasets[linked]
    agreement = Agreement(
        "ag",
        "ooc",
        "research",
        (DatasetSlot(bank.partner_id, bank.name), DatasetSlot(panel.partner_id, panel.name)),
        ("analyst",),
        Epsilon.parse("10"),
        max_rows_per_person=3,
        max_groups_per_person=2,
        created_at=NOW,
        status=AgreementStatus.ACTIVE,
    )
    spec = QuerySpec(
        "ag",
        (
            AggregateSpec("people", AggregateKind.COUNT),
            AggregateSpec("total", AggregateKind.SUM, "panel.amount"),
        ),
        Epsilon.parse("1"),
        group_by=("panel.category",),
    )
    plan = plan_query(spec, agreement, (bank, panel))
    sources = lambda: [files.source(d.dataset_id, d.version) for d in (bank, panel)]  # noqa: E731
    free = DuckDBEngine(threads=2).compute(plan, sources(), {KEYS[5], KEYS[6]}, NOW)
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    limit = "200MB" if linked else "40MB"
    limited = DuckDBEngine(threads=2, memory_limit=limit, temp_dir=str(spill_dir))
    # Aggregated in passes over buckets of people (linking itself is one pass: more room).
    assert linked or limited._buckets(sources()) > 1
    seen: list[bytes] = []
    done = threading.Event()

    def watch() -> None:  # what a copy of the disk would hold while the query runs
        while not done.is_set():
            for path in spill_dir.rglob("*"):
                if path.is_file():
                    try:
                        seen.append(path.read_bytes()[:4_000_000])
                    except OSError:
                        pass
            done.wait(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        bounded = limited.compute(plan, sources(), {KEYS[5], KEYS[6]}, NOW)
    finally:
        done.set()
        watcher.join()
    assert bounded == free
    assert sum(len(s) for s in seen) > 1_000_000, (
        "the limited run did not spill: raise the data size"
    )
    for blob in seen:
        for key in KEYS[:: PEOPLE // 200]:
            assert key[:24].encode() not in blob
