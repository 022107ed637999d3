"""What the hub learns from an accepted upload: row and pseudonym counts, duplicate keys.

Computed while an upload streams in (and when an erasure re-seals a version), and reported to
the uploading partner: it is their data, and duplicates or shared identifiers usually mean a
problem on their side (a placeholder phone, a join that repeated rows). Key columns are
tallied in memory up to a budget; past it they are counted again from the sealed segments by
a DuckDB that spills (encrypted) under the hub's memory limit, so any upload size works.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from entremise.server import spill
from entremise.server.domain.models import DatasetSchema, DuplicateReport
from entremise.server.domain.ports import IngestResult

#: Key-column bytes an upload may tally in memory before its keys are counted from disk.
DEFAULT_TALLY_BYTES = 1024**3


@dataclass(frozen=True)
class KeyColumnCounts:
    """Rows per pseudonym of one key column, summarised."""

    column: str
    distinct: int
    duplicated: int  # pseudonyms on more than one row
    rows_involved: int  # the rows of those
    max_rows: int
    shared: int = 0  # pseudonyms seen beside several values of another key column
    max_other: int = 0  # the most such values beside one pseudonym


@dataclass(frozen=True)
class KeyCounts:
    """Per key column, and the distinct pseudonyms over all of them (one may be in several)."""

    columns: tuple[KeyColumnCounts, ...]
    distinct: int


class KeyTally:
    """Key columns of an upload kept as they stream in, while they fit `max_bytes`."""

    def __init__(
        self, keys: list[str], max_bytes: int = DEFAULT_TALLY_BYTES, memory_limit: str | None = None
    ) -> None:
        self.keys, self.max_bytes, self.memory_limit = keys, max_bytes, memory_limit
        self._parts: list[pa.Table] | None = []
        self._bytes = 0

    def add(self, table: pa.Table) -> None:  # noqa: D102
        if self._parts is None:
            return
        part = table.select(self.keys)
        self._bytes += part.nbytes
        self._parts = None if self._bytes > self.max_bytes else [*self._parts, part]

    def result(self) -> KeyCounts | None:
        """The counts, or None if the keys outgrew the budget (count them from disk)."""
        if self._parts is None:
            return None
        if not self._parts:
            return KeyCounts((), 0)
        return count_keys(pa.concat_tables(self._parts), self.keys, self.memory_limit)


def count_keys(
    source: pa.Table | Iterable[pa.Table], keys: list[str], memory_limit: str | None
) -> KeyCounts:
    """Exact counts by DuckDB's hash aggregation over whole pseudonyms.

    Over a table in memory (the tally) or over parts read segment by segment, copied into
    DuckDB's own storage, which spills (encrypted) under `memory_limit`. 10M keys: ~0.1 s with
    50k distinct, ~1 s with 10M distinct, where sorting their bytes with numpy took 1.5-3 s.
    """
    with spill.connect(memory_limit=memory_limit) as conn:
        if isinstance(source, pa.Table):
            conn.register("upload", source)
        else:
            first = True
            for part in source:
                conn.register("part", part)
                verb = "CREATE TEMP TABLE upload AS" if first else "INSERT INTO upload"
                conn.execute(f"{verb} SELECT * FROM part")
                conn.unregister("part")
                first = False
            if first:
                return KeyCounts((), 0)
        shared = _shared_pseudonyms(conn, keys)
        columns = []
        for key in keys:
            row = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE n > 1), "
                "coalesce(sum(n) FILTER (WHERE n > 1), 0), coalesce(max(n), 0) "
                f'FROM (SELECT count(*) AS n FROM upload WHERE "{key}" IS NOT NULL '
                f'GROUP BY "{key}")'
            ).fetchone()
            assert row is not None
            if row[0]:
                distinct, duplicated, involved, most = (int(v) for v in row)
                columns.append(
                    KeyColumnCounts(key, distinct, duplicated, involved, most, *shared[key])
                )
        if len(keys) == 1:
            return KeyCounts(tuple(columns), columns[0].distinct if columns else 0)
        # The same pseudonym may appear under several identifiers; count it once.
        union = " UNION ALL ".join(
            f'SELECT "{k}" AS p FROM upload WHERE "{k}" IS NOT NULL' for k in keys
        )
        [(distinct,)] = conn.execute(f"SELECT count(DISTINCT p) FROM ({union})").fetchall()
    return KeyCounts(tuple(columns), int(distinct))


def _shared_pseudonyms(
    conn: duckdb.DuckDBPyConnection, keys: list[str]
) -> dict[str, tuple[int, int]]:
    """Per key column: pseudonyms seen beside several values of another key column, and the most.

    A phone found on the rows of 34 different emails is a shared line or a placeholder: it links
    those 34 records into one person. Reported to the uploading partner (it is their data).
    """
    out = {key: (0, 0) for key in keys}
    if len(keys) < 2:
        return out
    for key in keys:
        distinct = ", ".join(f'count(DISTINCT "{other}")' for other in keys if other != key)
        most = f"greatest({distinct})" if len(keys) > 2 else distinct
        row = conn.execute(
            f"SELECT count(*) FILTER (WHERE n > 1), coalesce(max(n), 0) FROM (SELECT "
            f'{most} AS n FROM upload WHERE "{key}" IS NOT NULL GROUP BY "{key}")'
        ).fetchone()
        assert row is not None
        out[key] = (int(row[0]), int(row[1]))
    return out


def upload_stats(
    counts: KeyCounts, schema: DatasetSchema, sha256: str, size: int, rows: int
) -> IngestResult:
    """Row and pseudonym counts, and the duplicate-key report of each key column."""
    duplicates = tuple(
        DuplicateReport(
            column=c.column,
            duplicated_pseudonyms=c.duplicated,
            rows_involved=c.rows_involved,
            max_rows_per_pseudonym=c.max_rows,
            shared_pseudonyms=c.shared,
            max_other_identifiers=c.max_other,
        )
        for c in counts.columns
    )
    most = max((c.max_rows for c in counts.columns), default=0)
    return IngestResult(
        row_count=rows,
        distinct_keys=counts.distinct,
        # With several identifiers per row, a person's rows are only known after linking.
        max_rows_per_key=most if len(schema.keys) == 1 else 0,
        content_sha256=sha256,
        size_bytes=size,
        duplicates=duplicates,
    )
