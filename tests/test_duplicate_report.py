"""The duplicate-key report of an upload is exact, even for pseudonyms crafted to share a prefix.

The hub counts rows per pseudonym by aggregating whole pseudonyms (`stats.count_keys`). A
partner can craft keys that agree on a long prefix (the hub cannot verify the HMAC), which any
shortcut on a prefix would merge, so these tests draw keys from pools built to collide, on both
of the report's paths (mostly distinct keys, as a bank's, and mostly repeated keys, as a
panel's).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from entremise.server.crypto import DatasetCipher, Keyring
from entremise.server.domain.models import (
    ConsentSpec,
    DatasetSchema,
    IdentifierKind,
    KeyColumn,
)
from entremise.server.domain.ports import IngestResult
from entremise.server.files import SealedDatasetFiles

SCHEMA = DatasetSchema(
    keys=(KeyColumn("email", IdentifierKind.EMAIL), KeyColumn("phone", IdentifierKind.PHONE)),
    consents=(ConsentSpec("p", "ok"),),
    columns=(),
)


def _pool(size: int, shared_prefixes: int) -> list[str]:
    """Distinct pseudonyms; the first `shared_prefixes` agree on their first 16 hex digits."""
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(size)]
    for i in range(min(shared_prefixes, size)):
        keys[i] = "0123456789abcdef" + keys[i][16:]
    assert len(set(keys)) == size
    return keys


def _ingest(tmp: Path, email: Sequence[str | None], phone: Sequence[str]) -> IngestResult:
    files = SealedDatasetFiles(DatasetCipher(Keyring.load(tmp / "ring"), tmp / "keys"), tmp)
    table = pa.table(
        {
            "email": pa.array(email, pa.string()),
            "phone": pa.array(phone, pa.string()),
            "ok": pa.array([True] * len(email)),
        }
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        # Several record batches: the report must join chunks.
        for batch in table.to_batches(max_chunksize=max(1, len(email) // 3)):
            writer.write_batch(batch)
    payload = sink.getvalue().to_pybytes()
    return files.ingest("ds", 1, SCHEMA, [payload], hashlib.sha256(payload).hexdigest())


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_report_matches_an_exact_count(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    rows = data.draw(st.integers(1, 300), "rows")
    # A large pool keeps most keys distinct (the sorting path, as a bank's); a small one makes
    # them repeat (the hash-table path, as a panel's).
    pool_size = data.draw(st.sampled_from([3, 40, 2 * rows + 2, 10 * rows + 10]), "pool")
    pool = _pool(pool_size, data.draw(st.integers(0, pool_size), "shared prefixes"))
    email = data.draw(st.lists(st.none() | st.sampled_from(pool), min_size=rows, max_size=rows))
    phone = data.draw(st.lists(st.sampled_from(pool), min_size=rows, max_size=rows))
    result = _ingest(tmp_path_factory.mktemp("ingest"), email, phone)
    reports = {d.column: d for d in result.duplicates}
    for column, values in (("email", email), ("phone", phone)):
        counts = pd.Series([v for v in values if v is not None], dtype=object).value_counts()
        if counts.empty:
            assert column not in reports
            continue
        report = reports[column]
        assert report.duplicated_pseudonyms == int((counts > 1).sum())
        assert report.rows_involved == int(counts[counts > 1].sum())
        assert report.max_rows_per_pseudonym == int(counts.max())
    assert result.distinct_keys == len({v for v in email + phone if v is not None})
    assert result.row_count == rows


def test_ten_thousand_distinct_keys_with_crafted_prefix_collisions(tmp_path: Path) -> None:
    pool = _pool(10_000, 50)
    keys = pool + pool[:20] + pool[100:103]  # 20 repeats among the colliding prefixes, 3 others
    result = _ingest(tmp_path, keys, keys[::-1])
    for report in result.duplicates:
        assert (report.duplicated_pseudonyms, report.rows_involved) == (23, 46)
        assert report.max_rows_per_pseudonym == 2
    assert result.distinct_keys == 10_000
